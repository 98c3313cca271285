"""Every request becomes one ledger row with exact tokens and dollars."""

from __future__ import annotations

import json
import socket
from typing import Any

import openai
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, fail

from . import fakeupstream
from .conftest import eventually, in_thread, post_json, sleep, threads_counting
from .test_proxy import CHAT, hang_up_after

P, C, CACHED = fakeupstream.PROMPT_TOKENS, fakeupstream.COMPLETION_TOKENS, fakeupstream.CACHED_TOKENS


def distinct(i: int) -> dict[str, Any]:
    """A chat request no other one shares (so the cache answers none of them)."""
    return dict(CHAT, messages=[{"role": "user", "content": f"Say hello #{i}"}])


async def get_json(http: Any, url: str) -> Any:
    response = await http.get(url)
    return response.code, json.loads(await response.content())


async def rows(http: Any, proxy: Any, **query: Any) -> list[dict[str, Any]]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    code, doc = await get_json(http, f"{proxy.url}/api/requests?{qs}")
    assert code == 200, doc
    return doc["requests"]


@pytest.mark.parametrize(
    "path, body, prompt, completion",
    [
        ("/chat/completions", CHAT, P, C),
        ("/chat/completions", dict(CHAT, stream=True), P, C),
        ("/completions", {"model": "gpt-4o-mini", "prompt": "Say hello"}, P, C),
        ("/completions", {"model": "gpt-4o-mini", "prompt": "Say hello", "stream": True}, P, C),
        ("/embeddings", {"model": "text-embedding-3-small", "input": "hello"}, 5, 0),
        ("/responses", {"model": "gpt-4o-mini", "input": "Say hello"}, 9, 11),
        ("/responses", {"model": "gpt-4o-mini", "input": "Say hello", "stream": True}, 9, 11),
    ],
)
@pytest_twisted.ensureDeferred
async def test_exact_upstream_usage_is_recorded(start_proxy, http, path, body, prompt, completion):
    proxy = await start_proxy()
    response, _ = await post_json(http, proxy.v1 + path, body, {"x-app-user-id": "alice"})
    assert response.code == 200
    request_id = int(response.headers.getRawHeaders(b"x-greyfox-request-id")[0])
    [row] = await rows(http, proxy)
    assert row["id"] == request_id
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (prompt, completion, prompt + completion)
    assert row["usage_source"] == "upstream"
    assert row["user"] == "alice" and row["status"] == 200 and row["stream"] == bool(body.get("stream"))
    assert row["endpoint"] == "/v1" + path and row["upstream"] == "openai"
    assert row["cost_usd"] > 0
    assert row["cache"] == "MISS" and row["model"] == body["model"] and row["error"] is None
    assert 0 < row["ttfb_ms"] <= row["latency_ms"]  # (catches the two swapped in the positional LedgerRow)
    assert row["time"].endswith("+00:00")


@pytest_twisted.ensureDeferred
async def test_a_v1_request_on_a_connection_twisted_web_serves_is_metered_the_same(start_proxy, http):
    """After a console request, /v1 on the same connection is served through
    twisted.web's Request and Headers (the bridge): same user, same forwarding rules."""
    proxy = await start_proxy()
    host, port = proxy.url.split("//")[1].split(":")
    body = json.dumps(CHAT).encode()

    def exchange() -> bytes:
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"X-App-User-Id: carol\r\nOpenAI-Organization: org-1\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    raw = await in_thread(exchange)
    assert raw.count(b"HTTP/1.1 200 ") == 2 and b"x-greyfox-cache: miss" in raw.lower()
    [seen] = proxy.upstream.received
    assert seen.header("openai-organization") == "org-1" and seen.header("x-app-user-id") is None
    [row] = await rows(http, proxy)
    assert row["user"] == "carol" and row["status"] == 200 and row["usage_source"] == "upstream"


@pytest_twisted.ensureDeferred
async def test_cost_uses_the_price_table_and_unknown_models_are_flagged(start_proxy, http):
    proxy = await start_proxy()
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="deepseek/my-private-model"))
    unknown, known = await rows(http, proxy)
    assert known["cost_usd"] == pytest.approx(((P - CACHED) * 0.15 + CACHED * 0.075 + C * 0.60) / 1e6)
    assert known["cached_tokens"] == CACHED
    assert unknown["model"] == "my-private-model" and unknown["upstream"] == "deepseek"
    assert unknown["cost_usd"] is None and unknown["cost_known"] is False
    code, usage = await get_json(http, proxy.url + "/api/usage?group=model")
    by_model = {r["key"]: r for r in usage["rows"]}
    assert by_model["my-private-model"]["unpriced_requests"] == 1
    assert by_model["gpt-4o-mini"]["cost_usd"] == pytest.approx(known["cost_usd"], abs=1e-6)


@pytest_twisted.ensureDeferred
async def test_usage_details_and_cost_sources_reach_rows_totals_and_metrics(start_proxy, http):
    proxy = await start_proxy(OPENROUTER_API_KEY="sk-or")
    client = openai.OpenAI(base_url=proxy.v1, api_key="sk-client", max_retries=0)

    def calls() -> list[Any]:
        return [
            client.chat.completions.create(model="o3-mini", messages=CHAT["messages"]),
            client.responses.create(model="o3-mini", input="Say hello"),
            client.chat.completions.create(model="deepseek/deepseek-chat", messages=CHAT["messages"]),
            client.chat.completions.create(model="openrouter/anthropic/claude-sonnet-4", messages=CHAT["messages"]),
        ]

    answers = await in_thread(calls)
    assert answers[0].usage.completion_tokens_details.reasoning_tokens == fakeupstream.REASONING_TOKENS
    assert proxy.upstream.received[3].body["usage"] == {"include": True}  # OpenRouter's usage accounting, asked for
    router, deepseek, responses, chat = await rows(http, proxy)
    assert (chat["reasoning_tokens"], chat["cached_tokens"], chat["cost_source"]) == (fakeupstream.REASONING_TOKENS, CACHED, "table")
    assert (responses["reasoning_tokens"], responses["cached_tokens"]) == (fakeupstream.REASONING_TOKENS, 3)
    assert deepseek["cached_tokens"] == CACHED  # from prompt_cache_hit_tokens
    assert (router["cost_usd"], router["cost_source"]) == (fakeupstream.OPENROUTER_COST, "upstream")
    code, usage = await get_json(http, proxy.url + "/api/usage?group=model")
    o3 = {r["key"]: r for r in usage["rows"]}["o3-mini"]
    assert (o3["reasoning_tokens"], o3["cached_tokens"]) == (2 * fakeupstream.REASONING_TOKENS, CACHED + 3)
    response = await http.get(proxy.url + "/metrics")
    text = (await response.content()).decode()
    assert f'greyfox_tokens_total{{kind="reasoning",upstream="openai"}} {2 * fakeupstream.REASONING_TOKENS}.0' in text


@pytest_twisted.ensureDeferred
async def test_stream_without_include_usage_still_records_exact_usage(start_proxy, http):
    proxy = await start_proxy()
    response, body = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, stream=True))
    assert b'"choices": []' not in body
    [row] = await rows(http, proxy)
    assert (row["total_tokens"], row["usage_source"]) == (P + C, "upstream")


@pytest_twisted.ensureDeferred
async def test_upstream_ignoring_include_usage_gets_counted_locally(start_proxy, http):
    proxy = await start_proxy()
    await proxy.service.encodings.load()
    await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="no-usage", stream=True))
    [row] = await rows(http, proxy)
    enc = proxy.service.encodings.for_model("no-usage")
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == len(enc.encode_ordinary(fakeupstream.REPLY))
    assert row["prompt_tokens"] == 3 + len(enc.encode_ordinary("Say hello")) + 3


@pytest_twisted.ensureDeferred
async def test_a_stream_without_usage_before_the_tokenizers_load_is_billed_its_exact_count(start_proxy, http):
    """No limits set, so the tokenizers load on first need, in a thread: the
    first stream is counted roughly while they load, and billed exactly once
    they are in (40 one-token words are 40 tokens, not a guess from their size)."""
    proxy = await start_proxy()
    assert not proxy.service.encodings.ready
    response, body = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="no-usage-words", stream=True))
    assert response.code == 200 and body.count(b" word") == 40
    await eventually(lambda: proxy.service.ledger.pending == 0 and proxy.service.ledger.written == 1)
    [row] = await rows(http, proxy)
    assert (row["completion_tokens"], row["usage_source"]) == (40, "estimated")


@pytest_twisted.ensureDeferred
async def test_streams_are_counted_as_they_pass_and_the_difference_to_upstream_usage_is_a_metric(start_proxy, http):
    proxy = await start_proxy()
    await proxy.service.encodings.load()
    await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, stream=True))
    [row] = await rows(http, proxy)
    assert (row["completion_tokens"], row["usage_source"]) == (C, "upstream")  # the upstream's usage is billed
    response = await http.get(proxy.url + "/metrics")
    text = (await response.content()).decode()
    enc = proxy.service.encodings.for_model("gpt-4o-mini")
    ours = len(enc.encode_ordinary(fakeupstream.REPLY))
    assert 'greyfox_stream_count_difference_tokens_bucket{le="+Inf"} 1.0' in text
    from bisect import bisect_left

    from greyfox._metrics import DIFFERENCE_BUCKETS

    first = DIFFERENCE_BUCKETS[bisect_left(DIFFERENCE_BUCKETS, ours - C)]  # the first bucket that holds it
    assert f'greyfox_stream_count_difference_tokens_bucket{{le="{float(first)}"}} 1.0' in text


@pytest.mark.parametrize("stream", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_long_answer_without_usage_is_counted_off_the_reactor_thread(start_proxy, http, stream):
    """Counting 40 KB of generated JSON text takes milliseconds of tiktoken: it
    runs in a thread, the client is answered meanwhile, and the row gets the
    count.  A stream's text is counted as it passes, exactly all the same."""
    import threading

    proxy = await start_proxy()
    await proxy.service.encodings.load()
    threads = threads_counting(proxy)
    response, body = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="no-usage-long", stream=stream))
    assert response.code == 200
    assert (b"word5999" in body) and (b"[DONE]" in body) == stream
    got: list[Any] = []
    for _ in range(100):  # the row is queued once the count is done
        got = await rows(http, proxy)
        if got:
            break
        await sleep(0.05)
    [row] = got
    assert len(threads) == (0 if stream else 1)  # (a stream's text is counted as it passes)
    enc = proxy.service.encodings.for_model("no-usage-long")
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == len(enc.encode_ordinary(fakeupstream.LONG_REPLY))
    assert row["prompt_tokens"] == 3 + len(enc.encode_ordinary("Say hello")) + 3
    assert threading.get_ident() not in threads


@pytest_twisted.ensureDeferred
async def test_shutdown_waits_for_a_long_answers_count_before_closing_the_database(start_proxy, http, monkeypatch, tmp_path):
    """Stopped just after a long answer without usage (twistd on SIGTERM): the
    client has its answer, the count still runs in a thread, and the row it
    completes is written before the database closes."""
    import sqlite3
    import time

    from greyfox import _flight

    count = _flight.count_answer

    def slow_count(*args: Any) -> Any:
        time.sleep(0.5)  # (in the thread pool)
        return count(*args)

    monkeypatch.setattr(_flight, "count_answer", slow_count)
    db = str(tmp_path / "stopping.db")
    proxy = await start_proxy(db=db)
    await proxy.service.encodings.load()
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="no-usage-long"))
    assert response.code == 200
    await proxy.service.stopService()
    conn = sqlite3.connect(db)
    got = conn.execute("SELECT status, usage_source, completion_tokens FROM ledger").fetchall()
    conn.close()
    enc = proxy.service.encodings.for_model("no-usage-long")
    assert got == [(200, "estimated", len(enc.encode_ordinary(fakeupstream.LONG_REPLY)))]


@pytest_twisted.ensureDeferred
async def test_embeddings_without_usage_get_their_prompt_counted_locally(start_proxy, http):
    proxy = await start_proxy()
    await proxy.service.encodings.load()
    await post_json(http, proxy.v1 + "/embeddings", {"model": "no-usage", "input": "hello there"})
    [row] = await rows(http, proxy)
    enc = proxy.service.encodings.for_model("no-usage")
    assert row["usage_source"] == "estimated"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (len(enc.encode_ordinary("hello there")), 0)


@pytest_twisted.ensureDeferred
async def test_client_abort_records_the_tokens_seen_so_far(start_proxy, http):
    proxy = await start_proxy()
    await proxy.service.encodings.load()
    await hang_up_after(proxy, dict(CHAT, stream=True), 3)
    assert await proxy.upstream.lost[0] is True
    await eventually(lambda: proxy.service.ledger.written >= 1)
    [row] = await rows(http, proxy)
    assert row["status"] == 499 and row["usage_source"] == "estimated"
    assert 1 <= row["completion_tokens"] < C
    assert row["prompt_tokens"] > 0


@pytest_twisted.ensureDeferred
async def test_errors_and_refusals_are_rows_too(start_proxy, http):
    proxy = await start_proxy()
    await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="fail-500"))
    await http.request("POST", proxy.v1 + "/chat/completions", data=b"{", headers={b"content-type": [b"application/json"]})
    got = await rows(http, proxy)
    assert [r["status"] for r in got] == [400, 500]
    assert all(r["total_tokens"] == 0 and r["cost_usd"] == 0 for r in got)
    assert (await rows(http, proxy, status=500))[0]["model"] == "fail-500"


@pytest_twisted.ensureDeferred
async def test_200_concurrent_requests_are_200_rows_and_survive_a_restart(start_proxy, http, tmp_path):
    db = str(tmp_path / "restart.db")
    proxy = await start_proxy(db=db)
    results = await DeferredList(
        [Deferred.fromCoroutine(post_json(http, proxy.v1 + "/chat/completions", distinct(i), {"x-app-user-id": f"u{i % 7}"})) for i in range(200)],
        fireOnOneErrback=True,
    )
    ids = {int(r[0].headers.getRawHeaders(b"x-greyfox-request-id")[0]) for ok, r in results}
    assert len(ids) == 200
    await proxy.stop()
    again = await start_proxy(db=db)
    seen = []
    before = ""
    while True:
        code, page = await get_json(http, f"{again.url}/api/requests?limit=70{before}")
        seen += [r["id"] for r in page["requests"]]
        if page["next"] is None:
            break
        before = f"&before={page['next']}"
    assert set(seen) == ids and len(seen) == 200
    code, usage = await get_json(http, again.url + "/api/usage?group=user")
    assert sum(r["requests"] for r in usage["rows"]) == 200
    assert sum(r["total_tokens"] for r in usage["rows"]) == 200 * (P + C)
    # New ids continue after the old ones.
    response, _ = await post_json(http, again.v1 + "/chat/completions", CHAT)
    assert int(response.headers.getRawHeaders(b"x-greyfox-request-id")[0]) > max(ids)


@pytest_twisted.ensureDeferred
async def test_database_failure_degrades_health_but_loses_nothing(start_proxy, http):
    proxy = await start_proxy()
    ledger = proxy.service.ledger
    working = ledger._run
    ledger._run = lambda *a: fail(OSError("database is locked"))
    for _ in range(3):
        response, body = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
        assert response.code == 200 and json.loads(body)["choices"]
    await eventually(lambda: ledger.degraded is not None)
    code, health = await get_json(http, proxy.url + "/healthz")
    assert code == 503 and health["status"] == "degraded" and "locked" in health["reason"]
    ledger._run = working
    await eventually(lambda: ledger.degraded is None and ledger.pending == 0, timeout=10)
    code, health = await get_json(http, proxy.url + "/healthz")
    assert code == 200
    assert len(await rows(http, proxy)) == 3


@pytest_twisted.ensureDeferred
async def test_usage_groups_and_date_range(start_proxy, http):
    proxy = await start_proxy()
    await post_json(http, proxy.v1 + "/chat/completions", distinct(1), {"x-app-user-id": "alice"})
    await post_json(http, proxy.v1 + "/chat/completions", distinct(2), {"x-app-user-id": "bob"})
    await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="deepseek/deepseek-chat"), {"x-app-user-id": "bob"})
    await post_json(http, proxy.v1 + "/chat/completions", distinct(1), {"x-app-user-id": "bob"})  # a cache hit
    code, doc = await get_json(http, proxy.url + "/api/usage")
    assert doc["group"] == "user"
    by_user = {r["key"]: r for r in doc["rows"]}
    assert {k: r["requests"] for k, r in by_user.items()} == {"alice": 1, "bob": 3}
    assert (by_user["bob"]["total_tokens"], by_user["bob"]["cache_hits"], by_user["bob"]["saved_tokens"]) == (2 * (P + C), 1, P + C)
    assert by_user["bob"]["saved_usd"] == pytest.approx(by_user["alice"]["cost_usd"], abs=1e-6)
    code, doc = await get_json(http, proxy.url + "/api/usage?group=upstream")
    assert {r["key"]: r["total_tokens"] for r in doc["rows"]} == {"openai": 2 * (P + C), "deepseek": P + C}
    code, doc = await get_json(http, proxy.url + "/api/usage?group=day")
    assert len(doc["rows"]) == 1 and doc["rows"][0]["requests"] == 4
    code, doc = await get_json(http, proxy.url + "/api/usage?from=2000-01-01&to=2000-01-02")
    assert doc["rows"] == []
    for bad in ("group=colour", "from=yesterday", "from=2026-02-02&to=2026-02-01"):
        code, doc = await get_json(http, proxy.url + "/api/usage?" + bad)
        assert code == 400 and doc["error"]["type"] == "invalid_request_error"


@pytest_twisted.ensureDeferred
async def test_status_metrics_and_admin_token(start_proxy, http):
    proxy = await start_proxy(GREYFOX_ADMIN_TOKEN="gf-admin")
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    for path in ("/api/status", "/api/usage", "/api/requests", "/metrics", "/api/nothing"):
        response = await http.get(proxy.url + path)
        assert response.code == 401, path
        await response.content()
    auth = {b"authorization": [b"Bearer gf-admin"]}
    response = await http.get(proxy.url + "/api/status", headers=auth)
    status = json.loads(await response.content())
    assert status["mode"] == "record"
    assert status["db"]["size_bytes"] > 0 if status["db"]["engine"] == "sqlite" else status["db"]["size_bytes"] is None
    assert {u["name"] for u in status["upstreams"]} == {"openai", "deepseek", "openrouter", "anthropic"}
    response = await http.get(proxy.url + "/metrics", headers=auth)
    text = (await response.content()).decode()
    assert 'greyfox_requests_total{cache="MISS",status_class="2xx",upstream="openai"} 1.0' in text
    response = await http.get(proxy.url + "/healthz")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_rows_the_database_refuses_at_shutdown_are_kept_and_inserted_at_next_start(start_proxy, http, tmp_path):
    db = str(tmp_path / "spill.db")
    proxy = await start_proxy(db=db)
    ledger = proxy.service.ledger
    ledger._run = lambda *a: fail(OSError("disk I/O error"))
    for _ in range(2):
        await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    await proxy.stop()
    assert (tmp_path / "spill.db.unsaved.jsonl").exists()
    again = await start_proxy(db=db)
    assert len(await rows(http, again)) == 2
    assert not (tmp_path / "spill.db.unsaved.jsonl").exists()


@pytest_twisted.ensureDeferred
async def test_usage_per_hour_and_split_by_model(start_proxy, http):
    proxy = await start_proxy(GREYFOX_TZ="Asia/Kolkata")  # a half-hour UTC offset
    await post_json(http, proxy.v1 + "/chat/completions", distinct(1))
    await post_json(http, proxy.v1 + "/chat/completions", dict(distinct(2), model="gpt-4o"))
    code, doc = await get_json(http, proxy.url + "/api/usage?group=hour")
    [row] = doc["rows"]
    from datetime import datetime
    from zoneinfo import ZoneInfo

    assert row["key"] == datetime.now(ZoneInfo("Asia/Kolkata")).strftime("%Y-%m-%dT%H:00")
    code, doc = await get_json(http, proxy.url + "/api/usage?group=day&split=model")
    assert sorted(r["split"] for r in doc["rows"]) == ["gpt-4o", "gpt-4o-mini"]
    assert {r["key"] for r in doc["rows"]} == {doc["from"]}
    code, doc = await get_json(http, proxy.url + "/api/usage?group=model&split=model")
    assert code == 400


@pytest_twisted.ensureDeferred
async def test_wrong_methods_get_openai_shaped_errors(start_proxy, http):
    proxy = await start_proxy()
    response = await http.post(proxy.url + "/api/usage", data=b"{}")
    doc = json.loads(await response.content())
    assert response.code == 404 and "POST /api/usage" in doc["error"]["message"]
    response = await http.post(proxy.url + "/healthz", data=b"{}")
    doc = json.loads(await response.content())
    assert response.code == 405 and doc["error"]["code"] == "method_not_allowed"
    assert b"GET" in response.headers.getRawHeaders(b"allow")[0]


# -- no request can stop the books --


async def post_raw_json(http: Any, url: str, body: bytes) -> tuple[Any, Any]:
    response = await http.request("POST", url, data=body, headers={b"content-type": [b"application/json"]})
    return response, json.loads(await response.content())


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a \\udfff lone surrogate"}]}',
        b'{"model": "gpt-4o-mini", "temperature": NaN, "messages": []}',
        b'{"model": "gpt-4o-mini", "temperature": 1e999, "messages": []}',
        b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        '{"model": "deepseek/x", "messages": [{"role": "user", "content": "\ud800"}]}'.encode("utf-16", "surrogatepass"),
    ],
    ids=["surrogate-model", "surrogate-content", "nan", "overflow", "deep", "utf16-surrogate"],
)
@pytest_twisted.ensureDeferred
async def test_a_body_greyfox_cannot_record_is_a_400_and_the_ledger_keeps_writing(start_proxy, http, body):
    proxy = await start_proxy()
    response, doc = await post_raw_json(http, proxy.v1 + "/chat/completions", body)
    assert response.code == 400 and doc["error"]["code"] == "invalid_json", doc
    assert not proxy.upstream.received
    ok, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert ok.code == 200
    assert [r["status"] for r in await rows(http, proxy)] == [200, 400]
    code, health = await get_json(http, proxy.url + "/healthz")
    assert code == 200, health


@pytest_twisted.ensureDeferred
async def test_usage_past_sqlites_integers_is_stored_flagged_and_the_ledger_keeps_writing(start_proxy, http):
    proxy = await start_proxy()
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="huge-usage"))
    assert response.code == 200
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    second, first = await rows(http, proxy)
    assert first["prompt_tokens"] == 2**63 - 1 and "unstorable values replaced" in first["error"]
    assert second["status"] == 200 and second["error"] is None
    code, health = await get_json(http, proxy.url + "/healthz")
    assert code == 200, health


@pytest_twisted.ensureDeferred
async def test_a_database_locked_by_another_process_is_degraded_not_a_freeze(start_proxy, http, tmp_path):
    """Another process holds the write lock: requests are answered, /healthz
    says degraded within seconds, API reads answer, and once the lock goes
    every row is written."""
    import sqlite3
    import time

    db = str(tmp_path / "locked.db")
    proxy = await start_proxy(db=db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(3):
            response, _ = await post_json(http, proxy.v1 + "/chat/completions", distinct(i))
            assert response.code == 200
        await sleep(1.5)
        code, health = await get_json(http, proxy.url + "/healthz")
        assert code == 503 and health["status"] == "degraded", health
        started = time.monotonic()
        code, _ = await get_json(http, proxy.url + "/api/requests")
        assert code == 200 and time.monotonic() - started < 2.5  # (not the 5 s a locked write waits)
    finally:
        holder.execute("COMMIT")
        holder.close()
    await eventually(lambda: proxy.service.ledger.pending == 0, timeout=15)
    code, health = await get_json(http, proxy.url + "/healthz")
    assert code == 200
    assert len(await rows(http, proxy)) == 3


@pytest_twisted.ensureDeferred
async def test_rows_spilled_in_an_outage_reach_the_database_when_it_is_back(start_proxy, http, tmp_path):
    db = str(tmp_path / "outage.db")
    proxy = await start_proxy(db=db)
    ledger = proxy.service.ledger
    ledger.MAX_QUEUED = 4
    working = ledger._run
    ledger._run = lambda *a: fail(OSError("disk I/O error"))
    for i in range(10):
        response, _ = await post_json(http, proxy.v1 + "/chat/completions", distinct(i))
        assert response.code == 200
    await eventually(lambda: ledger.spilled > 0, timeout=10)
    assert (tmp_path / "outage.db.unsaved.jsonl").exists()
    ledger._run = working
    await eventually(lambda: ledger.pending == 0 and not (tmp_path / "outage.db.unsaved.jsonl").exists(), timeout=15)
    assert len(await rows(http, proxy)) == 10


@pytest_twisted.ensureDeferred
async def test_every_row_names_the_instance_that_served_it(start_proxy, http):
    import socket

    proxy = await start_proxy()
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    [row] = await rows(http, proxy)
    assert row["instance"] == f"{socket.gethostname()}:{proxy.service.port.getHost().port}"
    await proxy.stop()
    named = await start_proxy(GREYFOX_INSTANCE="gf-east-1")
    await post_json(http, named.v1 + "/chat/completions", dict(CHAT, seed=1))
    assert [r["instance"] for r in await rows(http, named)] == ["gf-east-1", row["instance"]]


@pytest_twisted.ensureDeferred
async def test_losing_the_postgresql_connection_keeps_serving_and_loses_no_row(start_proxy, http, database, engine,
                                                                              observe_errors):
    if engine != "postgresql":
        pytest.skip("a lost server connection is PostgreSQL's")
    import psycopg

    from .conftest import POSTGRES

    proxy = await start_proxy()
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    await eventually(lambda: proxy.service.ledger.written == 1)
    with psycopg.connect(POSTGRES, autocommit=True) as admin:  # the server drops every connection of the database
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                      (database.rsplit("/", 1)[1],))
    for i in range(5):
        response, _ = await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, seed=i))
        assert response.code == 200  # served whatever the database says
    await eventually(lambda: proxy.service.ledger.pending == 0 and proxy.service.ledger.written == 6, timeout=20)
    assert sorted((r["id"], r["status"]) for r in await rows(http, proxy)) == [(i, 200) for i in range(1, 7)]
    # (adbapi logs each lost connection it replaces, the lease pool's too, once it
    # is used again; nothing else may be logged as an error)
    for _ in range(2):
        await proxy.service.leases.sync()
    assert proxy.service.leases.failing is None
    observe_errors[:] = [e for e in observe_errors if e.get("why") != "Rollback failed"]
