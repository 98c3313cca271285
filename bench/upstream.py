"""A fast fake OpenAI-compatible upstream for the benchmark (asyncio, raw HTTP/1.1).

It must never be the bottleneck, so it parses only what it needs and answers
from canned bytes:

* a chat completion as JSON, with ``usage``;
* ``"stream": true``: SSE, 40 content chunks, a usage chunk when asked, [DONE],
  in one write;
* model ``paced``: the same stream, but the first chunk alone and the rest
  5 ms later, as a model sends its first token before the others;
* model ``big-N``: an SSE stream of N MiB, written as fast as the reader takes it;
* model ``think-N``: the chat completion after N ms on average (uniformly N/2
  to 3N/2), as a model takes its time, so that concurrent clients do not
  saturate the proxy.  The time varies as a model's does: with a fixed one,
  clients stay in lockstep and every answer arrives in a burst with all the
  others.

Usage: ``python bench/upstream.py PORT``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

CHAT = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the benchmark upstream."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
}).encode()
JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(CHAT)) + CHAT


def _sse(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKS = [_sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}]}) for i in range(40)]
USAGE_CHUNK = _sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini", "choices": [],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}})
DONE = b"data: [DONE]\n\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_WORDS = ("the proxy relays every token as it arrives and counts what it costs while a slow reader "
          "pauses the upstream so memory stays flat ").split()
BIG_EVENT = _sse({"choices": [{"index": 0, "delta": {"content": " ".join(_WORDS[i % len(_WORDS)] for i in range(600))}}]})


class Upstream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].lower()
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                length = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None].strip())
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4 : head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length :]
            self.answer(body, close=b"connection: close" in head)

    def answer(self, body: bytes, close: bool) -> None:
        if b'"model":"think-' in body:
            ms = int(body.split(b'"model":"think-')[1].split(b'"')[0])
            asyncio.get_running_loop().call_later(ms * random.uniform(0.5, 1.5) / 1000, self._later, JSON_RESPONSE, close)
            return
        if b'"stream":true' not in body.replace(b" ", b""):
            self.transport.write(JSON_RESPONSE)
        elif b'"model":"big-' in body.replace(b" ", b""):
            mib = int(body.split(b"big-")[1].split(b'"')[0])
            asyncio.ensure_future(self.big(mib * 1024 * 1024, close))
            return
        else:
            parts = [SSE_HEAD] + [_chunked(c) for c in CHUNKS]
            if b'"include_usage":true' in body.replace(b" ", b""):
                parts.append(_chunked(USAGE_CHUNK))
            parts += [_chunked(DONE), b"0\r\n\r\n"]
            if b'"model":"paced"' in body.replace(b" ", b""):
                self.transport.write(b"".join(parts[:2]))
                rest = b"".join(parts[2:])
                asyncio.get_running_loop().call_later(0.005, self._later, rest, close)
                return
            self.transport.write(b"".join(parts))
        if close:
            self.transport.close()

    def _later(self, data: bytes, close: bool) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)
            if close:
                self.transport.close()

    async def big(self, total: int, close: bool) -> None:
        self.transport.write(SSE_HEAD)
        chunk = _chunked(BIG_EVENT * 16)
        sent = 0
        self.paused = asyncio.Event()
        self.paused.set()
        while sent < total:
            await self.paused.wait()
            self.transport.write(chunk)
            sent += len(BIG_EVENT) * 16
        self.transport.write(_chunked(DONE) + b"0\r\n\r\n")
        if close:
            self.transport.close()

    def pause_writing(self) -> None:
        if hasattr(self, "paused"):
            self.paused.clear()

    def resume_writing(self) -> None:
        if hasattr(self, "paused"):
            self.paused.set()


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
