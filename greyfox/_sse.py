# -*- test-case-name: tests.test_sse -*-
"""Incremental Server-Sent Events framing, sans I/O.

Bytes go in as TCP delivers them; complete events come out with their raw
bytes (so they are relayed unchanged) and their parsed ``event``/``data``
fields.  Where TCP splits the bytes never changes the events.
"""

from __future__ import annotations

import re

import attr

# Two line terminators in a row end an event.  A lone CR only counts when it is
# not the first half of a CRLF.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_LINE = re.compile(rb"\r\n|\n|\r")

#: An event larger than this (or growing past it without ending) is relayed raw, unparsed.
MAX_EVENT_BYTES = 4 * 1024 * 1024


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Event:
    """One SSE event: its bytes on the wire and its fields.

    :ivar data: the joined ``data:`` lines, or ``None`` when it had none
        (a comment or keep-alive), or when it was too large to parse.
    """

    raw: bytes
    event: str | None = None
    data: str | None = None


def parse_event(raw: bytes) -> Event:
    """Parse one complete event's bytes."""
    if raw.startswith(b"data: ") and raw.find(b"\n", 6) == len(raw) - 2 and raw.endswith(b"\n\n") and b"\r" not in raw:
        return Event(raw, None, raw[6:-2].decode("utf-8", "replace"))  # the usual shape: one data line
    name: str | None = None
    data: list[str] = []
    for line in _LINE.split(raw):
        if not line or line.startswith(b":"):
            continue
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return Event(raw, name, "\n".join(data) if data else None)


class SSEParser:
    """Feed bytes, get complete events; :meth:`flush` returns what is left."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buf = b""
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list[Event]:
        limit = self._max
        return [Event(raw) if len(raw) > limit else parse_event(raw) for raw in self.feed_raw(data)]

    def feed_raw(self, data: bytes) -> list[bytes]:
        """The bytes of each event completed by ``data``, unparsed (the relay
        parses only the events that matter to it)."""
        buf = self._buf + data if self._buf else data
        events: list[bytes] = []
        start = 0
        # Only search from a little before the new bytes: an end can straddle.
        pos = max(0, len(self._buf) - 3)
        if b"\r" not in buf:  # LF only, as every LLM API sends: no regex needed
            while True:
                end = buf.find(b"\n\n", pos)
                if end < 0:
                    break
                end += 2
                events.append(buf[start:end])
                start = pos = end
        else:
            while True:
                m = _EVENT_END.search(buf, pos)
                if m is None or (m.end() == len(buf) and buf.endswith(b"\r")):
                    break  # a final CR may be the first half of a CRLF: wait for the next byte
                events.append(buf[start : m.end()])
                start = pos = m.end()
        rest = buf[start:]
        if len(rest) > self._max:
            events.append(rest)
            rest = b""
        self._buf = rest
        return events

    def flush(self) -> Event | None:
        """The unterminated tail at end of stream, parsed, if any."""
        rest, self._buf = self._buf, b""
        if not rest.strip():
            return Event(rest) if rest else None
        return parse_event(rest)
