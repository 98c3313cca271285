# -*- test-case-name: tests.test_usage -*-
"""What a response cost in tokens: the upstream's ``usage``, or our own count.

Pure functions and a sans-I/O :class:`StreamMeter` that watches SSE events go
by, takes the usage when the upstream sends it, counts the streamed text as a
fallback, and says which events the client should not see.
"""

from __future__ import annotations

import json
from typing import Any

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
    """Watches a streamed response's events as they pass: the generated
    text (counted as it comes), the usage when the upstream sends it, the end.

    :param counter: counts the streamed text; its total is the live count
        of a running stream (``/api/inflight``, the mid-stream cut-off) and the
        row's completion tokens when no usage arrives.
    """

    def __init__(self, counter: IncrementalCounter) -> None:
        self.counter = counter
        self.usage: Usage | None = None
        self.done = False  # saw [DONE] or a terminal Responses event

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
        return self._parse(data)

    def on_raw(self, raw: bytes) -> bool:
        """:meth:`on_event` for an event's bytes."""
        if len(raw) > MAX_EVENT_BYTES:
            return False  # relayed unparsed (see _sse)
        return self.on_event(parse_event(raw))

    def _parse(self, data: str) -> bool:
        try:
            doc = json.loads(data)
        except ValueError:
            return False
        if not isinstance(doc, dict):
            return False
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
