"""Reading usage from every API shape; the stream meter."""

import json

from greyfox._sse import Event
from greyfox._tokens import IncrementalCounter
from greyfox._flight import _json_of
from greyfox._usage import StreamMeter, Usage, is_usage_only, parse_usage, usage_of


def test_usage_shapes():
    assert parse_usage({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                        "prompt_tokens_details": {"cached_tokens": 2}}) == Usage(5, 7, 2)
    assert parse_usage({"prompt_tokens": 5, "total_tokens": 5}) == Usage(5, 0)  # embeddings
    assert parse_usage({"input_tokens": 3, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 1}}) == Usage(3, 4, 1)
    assert parse_usage({"prompt_tokens": 9, "completion_tokens": 1, "prompt_cache_hit_tokens": 8}) == Usage(9, 1, 8)
    assert parse_usage(None) is None and parse_usage({"foo": 1}) is None


def test_usage_details_of_every_provider_are_kept():
    # OpenAI chat: cached prompt tokens, reasoning tokens (already inside completion_tokens)
    assert parse_usage({"prompt_tokens": 50, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 20},
                        "completion_tokens_details": {"reasoning_tokens": 12}}) == Usage(50, 30, 20, 0, 12)
    # Responses API
    assert parse_usage({"input_tokens": 50, "output_tokens": 30, "input_tokens_details": {"cached_tokens": 20},
                        "output_tokens_details": {"reasoning_tokens": 12}}) == Usage(50, 30, 20, 0, 12)
    # Anthropic: input_tokens leaves the cache out; the prompt is all three
    assert parse_usage({"input_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 300,
                        "output_tokens": 7}) == Usage(405, 7, 300, 100)
    # OpenRouter's own cost
    assert parse_usage({"prompt_tokens": 5, "completion_tokens": 7, "cost": 0.0012}).cost_usd == 0.0012
    assert parse_usage({"prompt_tokens": 5, "completion_tokens": 7, "cost": "free"}).cost_usd is None
    # details never exceed what they detail
    assert parse_usage({"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9},
                        "completion_tokens_details": {"reasoning_tokens": 9}}) == Usage(5, 1, 5, 0, 1)


def test_a_messages_stream_is_metered_from_message_start_and_the_cumulative_message_delta():
    meter = StreamMeter(IncrementalCounter(None))
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 5, "cache_read_input_tokens": 300,
                                                        "cache_creation_input_tokens": 100, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}},
        {"type": "ping"},
    ]
    for doc in events:
        assert meter.on_event(chunk(doc)) is False
    assert meter.usage is None and meter.started_usage == Usage(405, 1, 300, 100)  # (output not final yet)
    assert meter.counter.total > 0
    meter.on_event(chunk({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}))
    assert meter.usage == Usage(405, 9, 300, 100) and not meter.done
    meter.on_event(chunk({"type": "message_stop"}))
    assert meter.done


def test_usage_from_bodies():
    # (as the flight reads a kept answer: parsed once, then its usage taken)
    assert usage_of(_json_of(json.dumps({"object": "response", "usage": {"input_tokens": 1, "output_tokens": 2}}).encode())) == Usage(1, 2)
    assert usage_of(_json_of(b"not json")) is None
    assert usage_of(_json_of(b"[]")) is None


def chunk(doc):
    return Event(b"data: " + json.dumps(doc).encode() + b"\n\n", None, json.dumps(doc))


def test_meter_takes_usage_and_marks_only_the_usage_only_chunk():
    meter = StreamMeter(IncrementalCounter(None))
    assert not meter.on_event(chunk({"choices": [{"delta": {"content": "abcd"}}], "usage": None}))
    assert meter.on_event(chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}))
    assert not meter.on_event(Event(b"data: [DONE]\n\n", None, "[DONE]"))
    assert meter.usage == Usage(3, 1) and meter.done


def test_usage_only_detection_without_a_meter():
    assert is_usage_only(chunk({"choices": [], "usage": {"prompt_tokens": 3}}))
    assert not is_usage_only(chunk({"choices": [{"delta": {}}], "usage": None}))
    assert not is_usage_only(Event(b": ping\n\n"))


def test_meter_counts_every_text_chunk_as_it_passes():
    meter = StreamMeter(IncrementalCounter(None))
    events = [chunk({"choices": [{"delta": {"content": "aaaa"}}], "usage": None}),
              chunk({"choices": [{"delta": {"content": "bbbb"}}], "usage": None})]
    assert not meter.on_event(events[0])
    assert meter.counter.total == 1 and meter.usage is None
    assert not meter.on_event(events[1])
    assert meter.counter.total == 2


def test_meter_counts_text_of_every_api_shape():
    meter = StreamMeter(IncrementalCounter(None))
    meter.on_event(chunk({"choices": [{"delta": {"content": "aaaa", "tool_calls": [{"function": {"arguments": "bbbb"}}]}}]}))
    meter.on_event(chunk({"choices": [{"text": "cccc"}]}))
    meter.on_event(chunk({"type": "response.output_text.delta", "delta": "dddd"}))
    assert meter.counter.total == 4
    meter.on_event(chunk({"type": "response.completed", "response": {"usage": {"input_tokens": 2, "output_tokens": 5}}}))
    assert meter.usage == Usage(2, 5) and meter.done


def test_meter_on_raw_bytes_gives_what_on_event_gives():
    """The relay hands the meter raw event bytes."""
    stream = [chunk({"choices": [{"delta": {"content": "aaaa"}}], "usage": None}),
              chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
              Event(b"data: [DONE]\n\n", None, "[DONE]")]
    by_raw, by_event = StreamMeter(IncrementalCounter(None)), StreamMeter(IncrementalCounter(None))
    assert [by_raw.on_raw(e.raw) for e in stream] == [by_event.on_event(e) for e in stream] == [False, True, False]
    assert (by_raw.usage, by_raw.done) == (by_event.usage, by_event.done) == (Usage(3, 1), True)
    assert by_raw.counter.total == by_event.counter.total == 1
