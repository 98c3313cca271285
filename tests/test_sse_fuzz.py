"""Seeded hostile upstream streams through the relay: whatever an upstream
streams, the client gets its bytes or a clean error, GreyFox logs no error,
and the ledger goes on writing."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest_twisted

from .conftest import eventually, post_json

EVENT_DOCS = [
    {"choices": [{"delta": {"content": "word"}}]},
    {"choices": [{"delta": {"content": "\ud800"}}]},
    {"choices": [{"delta": {"content": None, "tool_calls": [{"function": "x"}, {"function": {"arguments": 5}}]}}]},
    {"choices": "nope"},
    {"choices": [], "usage": {"prompt_tokens": 2**64, "completion_tokens": -3}},
    {"choices": [], "usage": {"prompt_tokens": "ten", "prompt_tokens_details": [1]}},
    {"choices": [], "usage": None},
    {"type": "response.completed", "response": {"usage": {"input_tokens": 1e308, "output_tokens": True}}},
    {"type": "response.output_text.delta", "delta": ["not", "text"]},
    {"error": {"message": "upstream says no"}},
    [1, 2, 3],
    "just a string",
]


def hostile_stream(rnd: random.Random) -> bytes:
    parts = []
    for _ in range(rnd.randrange(1, 12)):
        kind = rnd.randrange(10)
        if kind < 5:
            doc = rnd.choice(EVENT_DOCS)
            text = json.dumps(doc)
            parts.append(b"data: " + text.encode("utf-8", "surrogatepass") + rnd.choice([b"\n\n", b"\r\n\r\n", b"\r\r"]))
        elif kind == 5:
            parts.append(b"data: [DONE]\n\n")
        elif kind == 6:
            parts.append(b": ping\n\nevent: odd\nid: 7\nretry: x\n\n")
        elif kind == 7:
            parts.append(b"data: " + bytes(rnd.randrange(256) for _ in range(rnd.randrange(40))) + b"\n\n")
        elif kind == 8:
            parts.append(b"data: {\"choices\": [{\"delta\": {\"content\": \"" + b"x" * rnd.choice([10, 70_000]) + b"\"}}]}\n\n")
        else:
            parts.append(b"data: {\"choices\": [{\"delta\"")  # cut mid-event
    return b"".join(parts)


@pytest_twisted.ensureDeferred
async def test_hostile_upstream_streams_never_break_the_relay_or_the_books(start_proxy, http):
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="100000000", GREYFOX_LOOP_MAX_REPEATS="0")
    await proxy.service.encodings.load()
    rnd = random.Random(20261204)
    sent = 0
    for i in range(150):
        raw = hostile_stream(rnd)
        cuts = [rnd.randrange(1, len(raw) + 1) for _ in range(rnd.randrange(4))]
        doc: dict[str, Any] = {"model": "echo-sse", "stream": True, "messages": [{"role": "user", "content": f"#{i}"}],
                               "x_sse": base64.b64encode(raw).decode(), "x_cuts": cuts}
        response, body = await post_json(http, proxy.v1 + "/chat/completions", doc, {"x-app-user-id": f"fuzz{i}"})
        sent += 1
        assert response.code == 200, (i, body[:300])
        assert body.replace(b'"usage": null', b"").count(b"data: ") <= raw.count(b"data: ") + 1, i
    await eventually(lambda: proxy.service.ledger.pending == 0 and proxy.service.ledger.written == sent, timeout=10)
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", {"model": "gpt-4o-mini", "messages": []})
    assert response.code == 200
    health = await http.get(proxy.url + "/healthz")
    assert health.code == 200
    await health.content()
