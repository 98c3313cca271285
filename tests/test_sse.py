"""SSE framing: the events never depend on where TCP splits the bytes."""

from hypothesis import given, strategies as st

from greyfox._sse import SSEParser, parse_event

STREAM = (
    b'data: {"a": 1}\n\n'
    b"event: response.output_text.delta\ndata: {\"delta\": \"hi\"}\n\n"
    b": keep-alive comment\n\n"
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"data:no-space\r\rdata: [DONE]\n\n"
)


def events_of(chunks):
    parser = SSEParser()
    out = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    tail = parser.flush()
    if tail is not None:
        out.append(tail)
    return out


def test_fields_and_raw_bytes():
    events = events_of([STREAM])
    assert [e.data for e in events] == ['{"a": 1}', '{"delta": "hi"}', None, "line one\nline two", "no-space", "[DONE]"]
    assert events[1].event == "response.output_text.delta"
    assert b"".join(e.raw for e in events) == STREAM


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_any_split_gives_the_same_events(cuts):
    cuts = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0] + cuts, cuts + [len(STREAM)])]
    assert events_of(chunks) == events_of([STREAM])


def test_unterminated_tail_is_returned_by_flush():
    parser = SSEParser()
    assert parser.feed(b"data: x\n\ndata: partial") [0].data == "x"
    assert parser.flush().data == "partial"


def test_oversized_event_is_passed_raw():
    parser = SSEParser(max_event_bytes=10)
    [event] = parser.feed(b"data: " + b"y" * 50)
    assert event.data is None and event.raw == b"data: " + b"y" * 50


def test_parse_event_ignores_unknown_fields():
    assert parse_event(b"id: 7\nretry: 10\ndata: z\n\n").data == "z"


LF_STREAM = (
    b'data: {"a": 1}\n\n'
    b"data: x\n\n\n"  # an extra blank line
    b"event: e\ndata: two\ndata: lines\n\n"
    b": comment\n\n"
    b"data: [DONE]\n\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(LF_STREAM)), max_size=30))
def test_any_split_of_an_lf_stream_gives_the_same_events(cuts):
    """LF-only streams (what LLM APIs send) take a faster path: same events."""
    cuts = sorted(set(cuts))
    chunks = [LF_STREAM[a:b] for a, b in zip([0] + cuts, cuts + [len(LF_STREAM)])]
    events = events_of(chunks)
    assert events == events_of([LF_STREAM])
    assert b"".join(e.raw for e in events) == LF_STREAM
    assert [e.data for e in events] == ['{"a": 1}', "x", "two\nlines", None, "[DONE]"]
