"""A fake OpenAI-compatible upstream on a real loopback socket.

It answers chat, completions, embeddings, responses and models like the real
API, records every request it receives, and misbehaves on demand, chosen by
the model name:

* ``fail-500`` / ``fail-429``: an error status with an OpenAI error body;
* ``hang``: never answers (response-headers timeout);
* ``reset``: resets the connection; ``garbage``: answers bytes that are not
  HTTP; ``invalid-json``: a 200 whose JSON body does not parse;
* ``drop-after-2``: streams two chunks, then drops the connection;
* ``stall-after-2``: streams two chunks, then goes silent (idle timeout);
* ``big-N``: streams N MiB of SSE through a push producer that honours
  pause/resume, counting how often it was paused;
* ``no-usage``: streams without ever sending usage (ignores stream_options),
  and answers embeddings without usage; ``no-usage-words`` streams 40
  one-token words that way;
* ``no-usage-long``: no usage either, and the reply is ``LONG_REPLY`` (about
  40 KB): as JSON, or as a stream written at once;
* ``set-cookie``: answers normally but sets a cookie;
* ``truncate``: a JSON answer that breaks off before its Content-Length;
* ``huge-usage``: a chat answer whose usage counts 2**64 prompt tokens;
* ``bad-gzip``: an answer that says it is gzip and is not;
* ``echo-sse``: streams back the bytes in the request's ``x_sse`` (base64),
  cut at ``x_cuts``: the tests' way to send any stream;
* ``o3-mini``: chat and responses usage with reasoning tokens.

Paths under ``/anthropic/v1/`` answer as the Anthropic Messages API does:
the real event sequence (``message_start`` ... ``message_stop``, ``ping``
included) with prompt-caching usage, ``count_tokens``, and Anthropic-shaped
errors for ``fail-N``; ``metadata.user_id: "fake-words"`` streams 40
one-token words.  Under ``/deepseek/`` usage reports DeepSeek's
``prompt_cache_hit_tokens``; under ``/openrouter/`` it carries ``cost`` when
the request asks for OpenRouter's usage accounting.
"""

from __future__ import annotations

import json
from typing import Any

import attr
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

REPLY = "Hello from the fake upstream, streamed in small pieces."
REPLY_PIECES = ["Hello", " from", " the", " fake", " upstream", ",", " streamed", " in", " small", " pieces", "."]
LONG_PIECES = [f" word{i}" for i in range(6000)]
WORD_PIECES = [" word"] * 40  # one token each
LONG_REPLY = "".join(LONG_PIECES)
PROMPT_TOKENS = 13
COMPLETION_TOKENS = 11
CACHED_TOKENS = 4
REASONING_TOKENS = 6
OPENROUTER_COST = 0.00042
#: A Messages answer's usage: input beside the cache, cache writes and reads, output.
ANTHROPIC_USAGE = {"input_tokens": 21, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 3000,
                   "output_tokens": 11}
COUNT_TOKENS = 42


@attr.s(auto_attribs=True)
class Received:
    method: str
    path: str
    headers: dict[str, list[str]]
    body: Any

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def _usage(include_cached: bool = True) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }
    if include_cached:
        usage["prompt_tokens_details"] = {"cached_tokens": CACHED_TOKENS}
    return usage


def sse(doc: Any) -> bytes:
    return b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"


@implementer(IPushProducer)
class BigStream:
    """Writes ``total`` bytes of SSE as fast as the consumer lets it."""

    def __init__(self, request: Any, total: int, upstream: "FakeUpstream") -> None:
        self.request = request
        self.remaining = total
        self.upstream = upstream
        self.paused = False
        self.stopped = False
        delta = {"choices": [{"index": 0, "delta": {"content": "x" * 900}}]}
        self.event = sse(delta)

    def start(self) -> None:
        self.request.registerProducer(self, True)
        global_reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        while not self.paused and not self.stopped and self.remaining > 0:
            self.request.write(self.event)
            self.remaining -= len(self.event)
            self.upstream.big_written += len(self.event)
        if self.remaining <= 0 and not self.stopped:
            self.stopped = True
            self.request.write(sse(b"[DONE]"))
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True
        self.upstream.big_pauses += 1

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            global_reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.stopped = True


class FakeUpstream(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        #: One per request: fires True when the client (the proxy) hung up early, False when answered.
        self.lost: list[Deferred[bool]] = []
        self.big_written = 0
        self.big_pauses = 0
        self.port: Any = None
        self.delay = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def render(self, request: Any) -> Any:
        raw = request.content.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        headers = {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        path = request.path.decode()
        self.received.append(Received(request.method.decode(), path, headers, body))
        lost: Deferred[bool] = Deferred()
        self.lost.append(lost)
        request.notifyFinish().addCallbacks(lambda _: lost.callback(False), lambda _: lost.callback(True))
        if self.delay:
            global_reactor.callLater(self.delay, self._answer_later, request, path, body)
            return NOT_DONE_YET
        return self._answer(request, path, body)

    def _answer_later(self, request: Any, path: str, body: Any) -> None:
        if request.finished or request._disconnected:
            return
        result = self._answer(request, path, body)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()

    def _answer(self, request: Any, path: str, body: Any) -> Any:
        model = body.get("model", "") if isinstance(body, dict) else ""
        if path.startswith("/anthropic/"):
            return self._anthropic(request, path, body, model)
        if path.endswith("/models"):
            return self._json(request, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "fake"}]})
        if model.startswith("fail-"):
            status = int(model[5:])
            request.setResponseCode(status)
            return self._json(request, {"error": {"message": f"fake failure {status}", "type": "server_error", "code": None, "param": None}}, code=status)
        if model == "hang":
            return NOT_DONE_YET
        if model == "reset":  # the connection reset, no response at all
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        if model == "garbage":  # bytes that are not HTTP, then the end
            request.channel.transport.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\xfe garbage\r\n\r\n")
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if model == "invalid-json":
            request.setHeader(b"content-type", b"application/json")
            return b'{"id": "chatcmpl-bad", "choices": [oops'
        if model == "truncate":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"1000")
            request.write(b'{"id": "chatcmpl-cut", "choices": [')
            global_reactor.callLater(0.05, request.channel.transport.loseConnection)
            return NOT_DONE_YET
        if model == "bad-gzip":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"gzip")
            return b"this is not gzip at all" * 10
        if model == "set-cookie":
            request.addCookie(b"session", b"upstream-secret", path=b"/")
        stream = isinstance(body, dict) and body.get("stream") is True
        if path.endswith("/chat/completions"):
            return self._chat(request, body, model, stream)
        if path.endswith("/completions"):
            return self._completions(request, body, model, stream)
        if path.endswith("/embeddings"):
            doc = {"object": "list", "model": model, "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}
            if model != "no-usage":
                doc["usage"] = {"prompt_tokens": 5, "total_tokens": 5}
            return self._json(request, doc)
        if path.endswith("/responses"):
            return self._responses(request, model, stream)
        return self._json(request, {"echo": path, "method": request.method.decode(), "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})

    def _json(self, request: Any, doc: Any, code: int = 200) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        body = json.dumps(doc).encode()
        if isinstance(doc, dict) and doc.get("model") == "gzip":  # (asked for or not, as some servers do)
            import gzip

            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(body)
        return body

    # -- the Anthropic Messages API --

    def _anthropic(self, request: Any, path: str, body: Any, model: str) -> Any:
        if path == "/anthropic/v1/messages/count_tokens":
            return self._json(request, {"input_tokens": COUNT_TOKENS})
        if path != "/anthropic/v1/messages":
            return _anthropic_error(request, 404, "not_found_error", f"no such path {path}")
        if model.startswith("fail-"):
            status = int(model[5:])
            kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error" if status >= 500 else "invalid_request_error")
            return _anthropic_error(request, status, kind, f"fake failure {status}")
        if model == "hang":
            return NOT_DONE_YET
        if isinstance(body, dict) and body.get("stream") is True:
            request.setHeader(b"content-type", b"text/event-stream")
            words = (body.get("metadata") or {}).get("user_id") == "fake-words"  # 40 one-token words
            pieces = WORD_PIECES if words else REPLY_PIECES
            self._stream(request, anthropic_events(model, pieces), model)
            return NOT_DONE_YET
        return self._json(request, {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": REPLY}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": ANTHROPIC_USAGE,
        })

    # -- chat --

    def _chat(self, request: Any, body: dict[str, Any], model: str, stream: bool) -> Any:
        if model == "no-usage-long":
            return self._long(request, model, stream)
        if not stream:
            usage = _usage()
            if model == "huge-usage":  # past SQLite's INTEGER range
                usage["prompt_tokens"] = usage["total_tokens"] = 18446744073709551616
            if model == "o3-mini":
                usage["completion_tokens_details"] = {"reasoning_tokens": REASONING_TOKENS}
            if request.path.startswith(b"/deepseek/"):
                del usage["prompt_tokens_details"]
                usage["prompt_cache_hit_tokens"] = CACHED_TOKENS
            if request.path.startswith(b"/openrouter/") and (body.get("usage") or {}).get("include"):
                usage["cost"] = OPENROUTER_COST
            return self._json(request, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
                "usage": usage,
            })
        request.setHeader(b"content-type", b"text/event-stream")
        if model == "echo-sse":  # the request's own bytes, in the request's own pieces
            import base64

            raw = base64.b64decode(body["x_sse"])
            cuts = sorted(set(c for c in body.get("x_cuts", []) if 0 < c < len(raw)))
            pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
            for piece in pieces:
                request.write(piece)
            return NOT_DONE_YET if body.get("x_hold") else b""
        if model.startswith("big-"):
            BigStream(request, int(model[4:]) * 1024 * 1024, self).start()
            return NOT_DONE_YET
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not model.startswith("no-usage")
        pieces = WORD_PIECES if model == "no-usage-words" else REPLY_PIECES
        events = []
        first = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        events.append(first)
        for piece in pieces:
            events.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                           "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        events.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if include_usage:
            for e in events:
                e["usage"] = None
            events.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                           "choices": [], "usage": _usage()})
        self._stream(request, [sse(e) for e in events] + [sse(b"[DONE]")], model)
        return NOT_DONE_YET

    def _long(self, request: Any, model: str, stream: bool) -> Any:
        if not stream:
            return self._json(request, {
                "id": "chatcmpl-long", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": LONG_REPLY}, "finish_reason": "stop"}],
            })
        request.setHeader(b"content-type", b"text/event-stream")
        chunks = [sse({"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                  for piece in LONG_PIECES]
        return b"".join(chunks) + sse(b"[DONE]")

    def _stream(self, request: Any, chunks: list[bytes], model: str) -> None:
        """Write chunks 10 ms apart, so they travel as separate reads."""
        if model in ("drop-after-2", "stall-after-2"):
            chunks = chunks[:2]

        def step(i: int) -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            if i < len(chunks):
                request.write(chunks[i])
                global_reactor.callLater(0.01, step, i + 1)
            elif model == "drop-after-2":
                request.channel.transport.abortConnection()
            elif model == "stall-after-2":
                pass
            else:
                request.finish()

        step(0)

    # -- completions --

    def _completions(self, request: Any, body: dict[str, Any], model: str, stream: bool) -> Any:
        if not stream:
            return self._json(request, {
                "id": "cmpl-fake", "object": "text_completion", "created": 1, "model": model,
                "choices": [{"index": 0, "text": REPLY, "finish_reason": "stop", "logprobs": None}],
                "usage": _usage(include_cached=False),
            })
        request.setHeader(b"content-type", b"text/event-stream")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = [sse({"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": model,
                       "choices": [{"index": 0, "text": p, "finish_reason": None, "logprobs": None}]}) for p in REPLY_PIECES]
        if include_usage:
            chunks.append(sse({"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": model,
                               "choices": [], "usage": _usage(include_cached=False)}))
        self._stream(request, chunks + [sse(b"[DONE]")], model)
        return NOT_DONE_YET

    # -- responses --

    def _responses(self, request: Any, model: str, stream: bool) -> Any:
        usage = {"input_tokens": 9, "output_tokens": 11, "total_tokens": 20, "input_tokens_details": {"cached_tokens": 0}}
        if model == "o3-mini":
            usage["input_tokens_details"] = {"cached_tokens": 3}
            usage["output_tokens_details"] = {"reasoning_tokens": REASONING_TOKENS}
        done = {"id": "resp_fake", "object": "response", "status": "completed", "model": model, "created_at": 1,
                "output": [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": REPLY, "annotations": []}]}],
                "usage": usage}
        if not stream:
            return self._json(request, done)
        request.setHeader(b"content-type", b"text/event-stream")
        chunks = [b"event: response.created\n" + sse({"type": "response.created", "sequence_number": 0,
                                                      "response": dict(done, status="in_progress", output=[], usage=None)})]
        for n, piece in enumerate(REPLY_PIECES):
            chunks.append(b"event: response.output_text.delta\n" + sse({
                "type": "response.output_text.delta", "sequence_number": n + 1, "item_id": "msg_fake",
                "output_index": 0, "content_index": 0, "delta": piece}))
        chunks.append(b"event: response.completed\n" + sse({"type": "response.completed", "sequence_number": 99, "response": done}))
        self._stream(request, chunks, model)
        return NOT_DONE_YET


def _anthropic_error(request: Any, status: int, kind: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def anthropic_events(model: str, pieces: list[str] = REPLY_PIECES) -> list[bytes]:
    """A Messages stream as the API sends it, one SSE event each."""
    start_usage = dict(ANTHROPIC_USAGE, output_tokens=1)
    message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": message}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": piece}}) for piece in pieces]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [b"event: " + name.encode() + b"\n" + sse(doc) for name, doc in events]


def start(upstream: FakeUpstream | None = None, idle_timeout: float | None = None) -> FakeUpstream:
    """Listen on a free loopback port; ``idle_timeout``: close keep-alive connections idle that long."""
    upstream = upstream or FakeUpstream()
    site = Site(upstream) if idle_timeout is None else Site(upstream, timeout=idle_timeout)
    upstream.port = global_reactor.listenTCP(0, site, interface="127.0.0.1")
    return upstream
