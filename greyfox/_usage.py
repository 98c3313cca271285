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
    """Tokens of one answer, details kept (SPEC §5).

    ``prompt_tokens`` counts every input token, cached ones and, for the
    Messages API, cache writes included; ``completion_tokens`` includes the
    reasoning tokens.  ``cost_usd`` is the upstream's own figure, when it
    reports one (OpenRouter).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _detail(details: Any, key: str) -> int:
    return _int(details.get(key)) if isinstance(details, dict) else 0


def _cost(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
        return float(value)
    return None


def parse_usage(usage: Any) -> Usage | None:
    """Normalise a ``usage`` block of chat, completions, embeddings, responses or messages."""
    if not isinstance(usage, dict):
        return None
    cache_write = 0
    if "input_tokens" in usage or "output_tokens" in usage:  # Responses and Messages APIs
        completion = _int(usage.get("output_tokens"))
        reasoning = _detail(usage.get("output_tokens_details"), "reasoning_tokens")
        # Messages: input_tokens leaves out what was read from and written to the cache.
        cached = _int(usage.get("cache_read_input_tokens"))
        cache_write = _int(usage.get("cache_creation_input_tokens"))
        prompt = _int(usage.get("input_tokens")) + cached + cache_write
        cached = cached or _detail(usage.get("input_tokens_details"), "cached_tokens")
    elif "prompt_tokens" in usage or "completion_tokens" in usage:
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        if not completion and "completion_tokens" not in usage:
            # embeddings: only prompt and total
            completion = max(0, _int(usage.get("total_tokens")) - prompt)
        # DeepSeek reports its context cache as prompt_cache_hit_tokens.
        cached = _detail(usage.get("prompt_tokens_details"), "cached_tokens") or _int(usage.get("prompt_cache_hit_tokens"))
        reasoning = _detail(usage.get("completion_tokens_details"), "reasoning_tokens")
    else:
        return None
    return Usage(prompt, completion, min(cached, prompt), min(cache_write, prompt), min(reasoning, completion),
                 _cost(usage.get("cost")))


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
        self.done = False  # saw [DONE], a terminal Responses event or message_stop
        self._message_usage: dict[str, Any] = {}  # a Messages stream's usage so far
        #: A Messages stream's usage as ``message_start`` gave it: the prompt's, final; the output's, not.
        self.started_usage: Usage | None = None

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
        kind = doc.get("type")
        if isinstance(kind, str) and "." not in kind:  # Messages API ("response.*" is the Responses API)
            self._message_event(kind, doc)
            return False
        text = _delta_text(doc)
        if text:
            self.counter.feed(text)
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


    def _message_event(self, kind: str, doc: dict[str, Any]) -> None:
        """A Messages API event: text deltas are counted; the usage is the one of
        ``message_start``, updated by each (cumulative) ``message_delta``."""
        if kind == "content_block_delta":
            delta = doc.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "partial_json", "thinking"):
                    if isinstance(delta.get(key), str):
                        self.counter.feed(delta[key])
            return
        if kind == "message_start":
            message = doc.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            usage = doc.get("usage")
        else:
            if kind == "message_stop":
                self.done = True
            return
        if isinstance(usage, dict):
            self._message_usage.update(usage)
            if kind == "message_start":  # (its output_tokens is a placeholder: the count is not final)
                self.started_usage = parse_usage(self._message_usage)
            else:
                self.usage = parse_usage(self._message_usage)


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
