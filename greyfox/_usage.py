# -*- test-case-name: tests.test_usage -*-
"""What a response cost in tokens: the upstream's ``usage``, or our own count.

Pure functions and a sans-I/O :class:`StreamMeter` that watches SSE events go
by, takes the usage when the upstream sends it, counts the streamed text as a
fallback, and says which events the client should not see.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import attr

from ._sse import MAX_EVENT_BYTES, Event, parse_event
from ._tokens import IncrementalCounter


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_usage(usage: Any) -> Usage | None:
    """Normalise a ``usage`` block of chat, completions, embeddings or responses."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:  # Responses API
        prompt = _int(usage.get("input_tokens"))
        completion = _int(usage.get("output_tokens"))
        details = usage.get("input_tokens_details")
    elif "prompt_tokens" in usage or "completion_tokens" in usage:
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        if not completion and "completion_tokens" not in usage:
            # embeddings: only prompt and total
            completion = max(0, _int(usage.get("total_tokens")) - prompt)
        details = usage.get("prompt_tokens_details")
    else:
        return None
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    # DeepSeek reports its context cache this way.
    cached = cached or _int(usage.get("prompt_cache_hit_tokens"))
    return Usage(prompt, completion, min(cached, prompt))


def usage_of(doc: Any) -> Usage | None:
    """The usage of a parsed JSON response (chat, completions, embeddings or responses), if it has one."""
    if not isinstance(doc, dict):
        return None
    if doc.get("object") == "response" or ("usage" not in doc and isinstance(doc.get("response"), dict)):
        inner = doc if "usage" in doc else doc["response"]
        return parse_usage(inner.get("usage"))
    return parse_usage(doc.get("usage"))


def _delta_text(doc: dict[str, Any]) -> str:
    """Generated text in one streamed chunk (chat, completions or responses)."""
    kind = doc.get("type")
    if isinstance(kind, str):
        # Responses API: output text, refusals, tool-call arguments, reasoning.
        if kind.endswith(".delta") and isinstance(doc.get("delta"), str):
            return doc["delta"]
        return ""
    parts = []
    choices = doc.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):
                parts.append(choice["text"])
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for key in ("content", "reasoning_content", "reasoning", "refusal"):
                    if isinstance(delta.get(key), str):
                        parts.append(delta[key])
                calls = delta.get("tool_calls")
                if isinstance(calls, list):
                    for call in calls:
                        fn = call.get("function") if isinstance(call, dict) else None
                        if isinstance(fn, dict):
                            for key in ("name", "arguments"):
                                if isinstance(fn.get(key), str):
                                    parts.append(fn[key])
    return "".join(parts)


class StreamMeter:
    """Watches a streamed response's events: usage, generated text, the end.

    Lazy by default: an event is only parsed when it can carry usage or end
    the stream, so a stream whose upstream reports usage costs no JSON
    parsing of its text chunks and no tokenizer work.  When no usage came,
    :meth:`catch_up` counts the kept events afterwards; a relay that cannot
    keep them all (a very long stream) switches the meter to ``eager``
    before it drops them.

    :param counter: counts the streamed text for when no usage arrives.
    """

    def __init__(self, counter: IncrementalCounter, eager: bool = False, expect_usage: bool = False) -> None:
        self.counter = counter
        self.eager = eager
        self.expect_usage = expect_usage
        self.blind = False
        self.unseen_chars = 0
        self.unseen_events = 0
        self.usage: Usage | None = None
        self.done = False  # saw [DONE] or a terminal Responses event

    def overflow(self, kept: Iterable[bytes]) -> None:
        """The relay stops keeping events (a very long stream).

        If the upstream was asked for usage, trust it will come and stop
        looking at text (counting a 100 MB stream costs seconds of CPU);
        should it not come, :meth:`rough_tokens` estimates from the size.
        Otherwise count what was kept and every event from now on.
        """
        if self.expect_usage:
            self.blind = True
            for raw in kept:
                self.unseen_chars += len(raw)
                self.unseen_events += 1
        else:
            self.catch_up(kept)
            self.eager = True

    def rough_tokens(self) -> int:
        """Tokens of the text not looked at: ~4 characters a token, JSON framing left out."""
        return max(0, self.unseen_chars - 160 * self.unseen_events) // 4

    def on_event(self, event: Event) -> bool:
        """Account for one event; return whether it is the usage-only chat chunk.

        That chunk (``choices: []`` plus ``usage``) is the one GreyFox may
        have asked for on the client's behalf and then hides again.
        """
        data = event.data
        if data is None:
            return False
        if data == "[DONE]":
            self.done = True
            return False
        if self.blind:
            self.unseen_chars += len(data)
            self.unseen_events += 1
        if not self.eager and not _may_matter(data):
            return False
        return self._parse(data, count_text=self.eager)

    def on_raw(self, raw: bytes) -> bool:
        """:meth:`on_event` for an event's bytes, parsed only when it can matter:
        most chunks of a stream whose upstream reports usage are never parsed."""
        if len(raw) > MAX_EVENT_BYTES:
            return False  # relayed unparsed (see _sse)
        if not self.eager and b'"usage"' not in raw and b'"response.' not in raw and b"[DONE]" not in raw:
            if self.blind and raw.startswith(b"data"):
                self.unseen_chars += len(raw) - 8  # less "data: " and the blank line
                self.unseen_events += 1
            return False
        return self.on_event(parse_event(raw))

    def catch_up(self, raws: Iterable[bytes]) -> None:
        """Count the text of events seen lazily (their raw bytes, in order)."""
        for raw in raws:
            event = parse_event(raw)
            if event.data is not None and event.data != "[DONE]":
                self._parse(event.data, count_text=True)

    def _parse(self, data: str, count_text: bool) -> bool:
        try:
            doc = json.loads(data)
        except ValueError:
            return False
        if not isinstance(doc, dict):
            return False
        if count_text:
            text = _delta_text(doc)
            if text:
                self.counter.feed(text)
        kind = doc.get("type")
        if isinstance(kind, str):
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self.done = True
                response = doc.get("response")
                if isinstance(response, dict):
                    self.usage = parse_usage(response.get("usage")) or self.usage
            return False
        usage = parse_usage(doc.get("usage"))
        if usage is not None:
            self.usage = usage
            return doc.get("choices") == []
        return False


_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _may_matter(data: str) -> bool:
    """Whether an event may carry usage or end a stream (cheap substring checks)."""
    if '"usage"' in data and '"usage": null' not in data and '"usage":null' not in data:
        return True
    return '"response.' in data and any(t in data for t in _TERMINAL)


def is_usage_only(event: Event) -> bool:
    """Whether an event is the usage-only chat chunk, without metering it."""
    data = event.data
    if data is None or '"usage"' not in data or "[]" not in data.replace(" ", ""):
        return False
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)
