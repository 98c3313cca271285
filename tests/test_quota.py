"""Quotas and budgets: refuse before the money is spent, even under concurrency."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock

from greyfox._quota import Limits, Overrides, Quotas, Refused, conversation_fingerprint, duration

from . import fakeupstream
from .conftest import eventually, in_thread, post_json, sleep, threads_counting
from .test_ledger import get_json, rows
from .test_proxy import _wait, hang_up_after

P, C = fakeupstream.PROMPT_TOKENS, fakeupstream.COMPLETION_TOKENS
NY = ZoneInfo("America/New_York")


def chat(i: int = 0, max_tokens: int = 20, model: str = "gpt-4o-mini") -> dict[str, Any]:
    """Distinct requests (no cache hits) whose reservation covers the fake's real usage."""
    return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"Say hello #{i}"}]}


def quotas(clock: Clock, limits: Limits = Limits(), budget: float = 0.0, tz: str = "UTC", repeats: int = 0) -> Quotas:
    return Quotas(limits, budget, tz, repeats, 600, clock.seconds())


# -- the arithmetic, with a fake clock --


def test_reservations_hold_until_settled_and_settle_to_the_real_usage():
    clock = Clock()
    q = quotas(clock, Limits(daily_tokens=100))
    a = q.admit("alice", 60, 0, None, clock.seconds())
    with pytest.raises(Refused) as refused:
        q.admit("alice", 50, 0, None, clock.seconds())
    assert refused.value.code == "daily_token_limit" and refused.value.remaining == 40
    q.settle(a, 30, 0)
    assert q.remaining("alice", clock.seconds()) == 70
    q.admit("alice", 50, 0, None, clock.seconds())
    assert q.remaining("bob", clock.seconds()) == 100


def test_a_running_request_overruns_when_its_use_so_far_passes_what_others_left():
    clock = Clock()
    q = quotas(clock, Limits(daily_tokens=100), budget=1.0)
    other = q.admit("alice", 30, 0.2, None, 0)
    running = q.admit("alice", 20, 0.1, None, 0)
    assert q.overrun(running, 70, 0.5) is None  # 30 held by the other + 70 = the limit
    assert q.overrun(running, 71, 0.5) == "daily_token_limit"
    q.settle(other, 5, 0.05)
    assert q.overrun(running, 95, 0.5) is None
    assert q.overrun(q.admit("bob", 5, 0, None, 0), 100, 0) is None  # bob has his own 100
    assert q.overrun(running, 95, 0.96) == "daily_budget"  # $0.05 spent + 0.96 > $1
    q.settle(running, 96, 0.5)
    assert q.overrun(running, 1000, 9) is None  # settled: nothing runs any more


def test_streams_running_past_their_reservations_see_each_others_use():
    """Each stream holds what it used, not just what it reserved: two of them
    cannot each take the whole room left."""
    clock = Clock()
    q = quotas(clock, Limits(daily_tokens=100))
    a = q.admit("alice", 10, 0, None, 0)
    b = q.admit("alice", 10, 0, None, 0)
    assert q.overrun(a, 60, 0) is None
    assert q.overrun(b, 40, 0) is None  # 60 + 40
    assert q.overrun(b, 41, 0) == "daily_token_limit"
    assert q.remaining("alice", 0) == 0
    q.settle(a, 60, 0)
    q.settle(b, 41, 0)
    assert q.users(0)[0]["used"] == 101 and q.users(0)[0]["reserved"] == 0


def test_a_failed_call_gives_its_reservation_back():
    clock = Clock()
    q = quotas(clock, Limits(daily_tokens=100))
    r = q.admit("alice", 90, 0, None, 0)
    q.settle(r, 0, 0)
    assert q.remaining("alice", 0) == 100


def test_requests_per_minute_window():
    clock = Clock()
    q = quotas(clock, Limits(rpm=2))
    q.admit("alice", 0, 0, None, clock.seconds())
    clock.advance(10)
    q.admit("alice", 0, 0, None, clock.seconds())
    clock.advance(10)
    with pytest.raises(Refused) as refused:
        q.admit("alice", 0, 0, None, clock.seconds())
    assert refused.value.code == "rate_limit" and refused.value.retry_after == pytest.approx(40)
    q.admit("bob", 0, 0, None, clock.seconds())
    clock.advance(40.5)
    q.admit("alice", 0, 0, None, clock.seconds())


def test_tokens_per_minute_window_uses_settled_usage():
    clock = Clock()
    q = quotas(clock, Limits(tpm=100))
    r = q.admit("alice", 80, 0, None, clock.seconds())
    with pytest.raises(Refused):
        q.admit("alice", 30, 0, None, clock.seconds())
    q.settle(r, 20, 0)  # it used far less than reserved
    q.admit("alice", 30, 0, None, clock.seconds())
    clock.advance(61)
    q.admit("alice", 100, 0, None, clock.seconds())


def test_day_rolls_over_at_midnight_in_the_configured_time_zone():
    clock = Clock()
    clock.advance(datetime(2026, 11, 27, 23, 59, 0, tzinfo=NY).timestamp())
    q = quotas(clock, Limits(daily_tokens=10), tz="America/New_York")
    q.settle(q.admit("alice", 10, 0, None, clock.seconds()), 10, 0)
    with pytest.raises(Refused) as refused:
        q.admit("alice", 1, 0, None, clock.seconds())
    assert refused.value.retry_after == pytest.approx(60)  # 00:00 New York, not UTC
    clock.advance(61)
    q.admit("alice", 10, 0, None, clock.seconds())
    assert q.day_of(clock.seconds()) == "2026-11-28"


def test_global_budget_refuses_everyone():
    clock = Clock()
    q = quotas(clock, budget=1.0)
    q.settle(q.admit("alice", 0, 0.6, None, 0), 0, 0.9)
    with pytest.raises(Refused) as refused:
        q.admit("bob", 0, 0.2, None, 0)
    assert refused.value.code == "daily_budget"


def test_loop_breaker_trips_per_conversation_and_resets():
    clock = Clock()
    q = quotas(clock, repeats=3)
    loop = conversation_fingerprint("m", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
    grown = conversation_fingerprint("m", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}]})
    assert loop == grown
    for _ in range(3):
        q.admit("alice", 0, 0, loop, clock.seconds())
    with pytest.raises(Refused) as refused:
        q.admit("alice", 0, 0, loop, clock.seconds())
    assert refused.value.code == "runaway_loop"
    q.admit("alice", 0, 0, "another-conversation", clock.seconds())
    q.admit("bob", 0, 0, loop, clock.seconds())
    clock.advance(100)
    with pytest.raises(Refused):
        q.admit("alice", 0, 0, loop, clock.seconds())  # still inside the window
    assert q.reset_breaker("alice") == 1
    q.admit("alice", 0, 0, loop, clock.seconds())


def test_loop_breaker_window_slides_and_forgets_passed_conversations():
    clock = Clock()
    q = quotas(clock, repeats=3)
    for _ in range(3):
        q.admit("alice", 0, 0, "loop", clock.seconds())
        clock.advance(250)
    q.admit("alice", 0, 0, "loop", clock.seconds())  # the first call left the 600 s window
    for i in range(10_000):  # a sweep of distinct conversations, then quiet
        q.admit("ci", 0, 0, f"conversation {i}", clock.seconds())
    clock.advance(601)
    for i in range(10_000):
        q.admit("ci", 0, 0, f"later {i}", clock.seconds())
    assert q.conversations <= 10_000 + 4096  # the passed ones were forgotten, not kept forever
    with pytest.raises(Refused):  # the breaker still counts what is in the window
        for _ in range(4):
            q.admit("ci", 0, 0, "later 1", clock.seconds())


def test_overrides_and_duration_format():
    clock = Clock()
    q = quotas(clock, Limits(daily_tokens=10))
    q.overrides["vip"] = Overrides(daily_tokens=1000)
    q.admit("vip", 500, 0, None, 0)
    assert duration(3725) == "1h2m5s" and duration(59.6) == "1m0s" and duration(5) == "5s"


# -- through the proxy --


async def spend_until_refused(http: Any, proxy: Any, user: str, limit: int = 50) -> list[int]:
    codes = []
    for i in range(limit):
        response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(i), {"x-app-user-id": user})
        codes.append(response.code)
        if response.code == 429:
            break
    return codes


@pytest_twisted.ensureDeferred
async def test_user_spends_until_refused_and_the_sdk_does_not_retry(start_proxy, http):
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS=str(3 * 28))
    await proxy.service.encodings.load()
    codes = await spend_until_refused(http, proxy, "alice")
    assert codes[-1] == 429 and codes.count(200) >= 2
    seen = len(proxy.upstream.received)

    def refused_call() -> Any:
        client = openai.OpenAI(base_url=proxy.v1, api_key="x", default_headers={"X-App-User-Id": "alice"})  # default retries
        try:
            client.chat.completions.create(**chat(99))
        except openai.RateLimitError as e:
            return e
        raise AssertionError("not refused")

    error = await in_thread(refused_call)
    assert error.status_code == 429
    body = error.body if isinstance(error.body, dict) and "code" in error.body else error.body.get("error", error.body)
    assert body["type"] == "quota_exceeded" and body["code"] == "daily_token_limit"
    headers = error.response.headers
    assert headers["x-should-retry"] == "false" and int(headers["retry-after"]) > 0
    assert headers["x-ratelimit-limit-tokens"] == str(3 * 28) and "x-ratelimit-remaining-tokens" in headers
    assert len(proxy.upstream.received) == seen, "a refused request reached the upstream"
    refused_rows = await rows(http, proxy, user="alice", status=429)
    assert len(refused_rows) == 2  # the loop's refusal and exactly one SDK attempt
    assert all(r["cost_usd"] == 0 and r["total_tokens"] == 0 for r in refused_rows)
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(1), {"x-app-user-id": "bob"})
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-ratelimit-remaining-tokens")


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_requests_cannot_overshoot(start_proxy, http):
    per_request = 28  # the reservation of chat(i): about 8 prompt + 20 max_tokens
    limit = 5 * per_request + 10
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS=str(limit))
    await proxy.service.encodings.load()
    proxy.upstream.delay = 0.2
    calls = [Deferred.fromCoroutine(post_json(http, proxy.v1 + "/chat/completions", chat(i), {"x-app-user-id": "ci"}))
             for i in range(50)]
    results = await DeferredList(calls, fireOnOneErrback=True)
    codes = [r.code for ok, (r, _) in results]
    assert codes.count(200) == len(proxy.upstream.received) == 5
    assert codes.count(429) == 45
    code, view = await get_json(http, proxy.url + "/api/quotas")
    [ci] = view["users"]
    assert ci["used"] == 5 * (P + C) <= limit and ci["reserved"] == 0


@pytest_twisted.ensureDeferred
async def test_global_budget_refuses_every_user_once_spent(start_proxy, http):
    proxy = await start_proxy(GREYFOX_DAILY_BUDGET_USD="0.00002")
    await proxy.service.encodings.load()
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(1), {"x-app-user-id": "alice"})
    assert response.code == 200
    for user in ("alice", "bob"):
        response, body = await post_json(http, proxy.v1 + "/chat/completions", chat(2), {"x-app-user-id": user})
        assert response.code == 429 and json.loads(body)["error"]["code"] == "daily_budget"
    code, view = await get_json(http, proxy.url + "/api/quotas")
    assert view["global"]["spent_usd"] == pytest.approx((9 * 0.15 + 4 * 0.075 + 11 * 0.60) / 1e6, abs=1e-9)
    # Raising the budget takes effect at once.
    response = await http.put(proxy.url + "/api/quotas", data=json.dumps({"daily_budget_usd": 1}).encode())
    assert response.code == 200
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(3), {"x-app-user-id": "bob"})
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_dollars_are_reserved_in_flight_only_against_a_budget(start_proxy, http, tmp_path):
    """A token limit alone reserves tokens, not dollars: pricing the worst case
    is work for every request, and only a budget reads it."""
    for n, (env, reserves_usd) in enumerate((({"GREYFOX_DAILY_TOKENS": "100000"}, False),
                                             ({"GREYFOX_DAILY_TOKENS": "100000", "GREYFOX_DAILY_BUDGET_USD": "5"}, True))):
        proxy = await start_proxy(db=str(tmp_path / f"{n}.db"), **env)
        await proxy.service.encodings.load()
        proxy.upstream.delay = 0.5
        call = Deferred.fromCoroutine(post_json(http, proxy.v1 + "/chat/completions", chat(n), {"x-app-user-id": "u"}))
        await eventually(lambda: len(proxy.upstream.received) == n + 1)
        code, view = await get_json(http, proxy.url + "/api/quotas")
        [u] = view["users"]
        assert u["reserved"] > 0
        assert (view["global"]["reserved_usd"] > 0) is reserves_usd
        response, _ = await call
        assert response.code == 200
        code, view = await get_json(http, proxy.url + "/api/quotas")
        assert view["global"]["reserved_usd"] == 0 and view["users"][0]["reserved"] == 0


@pytest_twisted.ensureDeferred
async def test_reservation_is_released_when_the_upstream_fails_or_the_client_leaves(start_proxy, http):
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="1000")
    await proxy.service.encodings.load()
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(1, model="fail-500"), {"x-app-user-id": "u"})
    assert response.code == 500
    await hang_up_after(proxy, dict(chat(2), stream=True), 3, b"X-App-User-Id: u\r\n")
    await _wait(proxy.upstream.lost[1], 2)
    await eventually(lambda: proxy.service.ledger.written >= 2)
    code, view = await get_json(http, proxy.url + "/api/quotas")
    [u] = view["users"]
    aborted = [r for r in await rows(http, proxy) if r["status"] == 499][0]
    assert u["reserved"] == 0
    assert u["used"] == aborted["total_tokens"] > 0  # the failed call cost nothing; the abort what it produced


@pytest_twisted.ensureDeferred
async def test_agent_loop_trips_the_breaker_and_an_admin_resets_it(start_proxy, http):
    proxy = await start_proxy(GREYFOX_LOOP_MAX_REPEATS="3")
    url = proxy.v1 + "/chat/completions"
    conversation = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Fix the bug."}]
    for turn in range(3):  # the loop resends a growing conversation
        conversation += [{"role": "assistant", "content": f"Try {turn}"}, {"role": "user", "content": "Still failing."}]
        response, _ = await post_json(http, url, {"model": "gpt-4o-mini", "messages": conversation}, {"x-app-user-id": "agent"})
        assert response.code == 200
    conversation += [{"role": "assistant", "content": "Try 3"}, {"role": "user", "content": "Still failing."}]
    response, body = await post_json(http, url, {"model": "gpt-4o-mini", "messages": conversation}, {"x-app-user-id": "agent"})
    assert response.code == 429 and json.loads(body)["error"]["code"] == "runaway_loop"
    # Other users and other conversations go on.
    response, _ = await post_json(http, url, {"model": "gpt-4o-mini", "messages": conversation}, {"x-app-user-id": "human"})
    assert response.code == 200
    response, _ = await post_json(http, url, chat(7), {"x-app-user-id": "agent"})
    assert response.code == 200
    code, view = await get_json(http, proxy.url + "/api/quotas")
    assert [u for u in view["users"] if u["user"] == "agent"][0]["breaker_until"] is not None
    response = await http.delete(proxy.url + "/api/quotas/agent/breaker")
    assert json.loads(await response.content())["reset"] == 1
    response, _ = await post_json(http, url, {"model": "gpt-4o-mini", "messages": conversation}, {"x-app-user-id": "agent"})
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_cache_hits_do_not_count_towards_the_loop_breaker(start_proxy, http):
    proxy = await start_proxy(GREYFOX_LOOP_MAX_REPEATS="2")
    for _ in range(5):
        response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(1), {"x-app-user-id": "ci"})
        assert response.code == 200
        await eventually(lambda: len(proxy.service.cache) == 1)
    assert len(proxy.upstream.received) == 1


@pytest_twisted.ensureDeferred
async def test_restart_keeps_the_days_spend_and_put_takes_effect_at_once(start_proxy, http, tmp_path):
    db = str(tmp_path / "quota.db")
    proxy = await start_proxy(db=db, GREYFOX_DAILY_TOKENS="1000")
    for i in range(3):
        await post_json(http, proxy.v1 + "/chat/completions", chat(i), {"x-app-user-id": "alice"})
    await proxy.stop()
    again = await start_proxy(db=db, GREYFOX_DAILY_TOKENS="1000")
    code, view = await get_json(http, again.url + "/api/quotas")
    [alice] = view["users"]
    assert alice["used"] == 3 * (P + C) and alice["remaining"] == 1000 - 3 * (P + C)
    assert alice["resets_at"].endswith("+00:00")
    response = await http.put(again.url + "/api/quotas/alice", data=json.dumps({"daily_tokens": 50}).encode())
    assert response.code == 200
    response, body = await post_json(http, again.v1 + "/chat/completions", chat(9), {"x-app-user-id": "alice"})
    assert response.code == 429 and json.loads(body)["error"]["code"] == "daily_token_limit"
    response = await http.put(again.url + "/api/quotas/alice", data=json.dumps({"daily_tokens": None}).encode())
    response, _ = await post_json(http, again.v1 + "/chat/completions", chat(9), {"x-app-user-id": "alice"})
    assert response.code == 200
    for bad in (b"{", b'{"daily_tokens": -1}', b'{"daily_tokens": "lots"}', b'{"colour": 1}'):
        response = await http.put(again.url + "/api/quotas/alice", data=bad)
        assert response.code == 400, bad
        await response.content()


@pytest_twisted.ensureDeferred
async def test_a_large_prompt_is_counted_off_the_reactor_thread_and_still_enforced(start_proxy, http):
    """tiktoken needs ~0.3 µs a token: an agent's 100k-token context counted on
    the reactor would stall every other connection, so large bodies are counted
    in a thread; the count still decides admission."""
    import threading

    from greyfox._tokens import estimate_prompt_tokens

    words = " ".join(f"item{i}" for i in range(8000))  # ~50 KB
    big = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": words}]}
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="1000000")
    await proxy.service.encodings.load()
    prompt = estimate_prompt_tokens(proxy.service.encodings.for_model("gpt-4o-mini"), big)
    assert prompt > 10_000
    await proxy.stop()
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS=str(prompt))  # the prompt fits; with max_tokens it does not
    await proxy.service.encodings.load()
    threads = threads_counting(proxy)
    response, body = await post_json(http, proxy.v1 + "/chat/completions", big, {"x-app-user-id": "agent"})
    assert response.code == 429 and json.loads(body)["error"]["code"] == "daily_token_limit"
    half = dict(big, messages=[{"role": "user", "content": words[: len(words) // 2]}])
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", half, {"x-app-user-id": "agent"})
    assert response.code == 200
    assert len(threads) == 2 and threading.get_ident() not in threads
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(1), {"x-app-user-id": "other"})
    assert response.code == 200 and len(threads) == 2  # small bodies are counted in place


# -- the mid-stream cut-off, end to end --


@pytest_twisted.ensureDeferred
async def test_a_stream_that_would_pass_the_daily_limit_is_cut_off_there(start_proxy, http):
    """No max_tokens (the default of 10 is reserved), an answer of 6,000 words:
    the stream ends at the limit with one error event, overshooting it by at
    most one event, and what was produced is billed."""
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="200", GREYFOX_DEFAULT_MAX_TOKENS="10")
    await proxy.service.encodings.load()
    doc = {"model": "no-usage-long", "stream": True, "messages": [{"role": "user", "content": "Say hello"}]}
    response, body = await post_json(http, proxy.v1 + "/chat/completions", doc, {"x-app-user-id": "alice"})
    assert response.code == 200
    events = [e[len(b"data: "):] for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    error = json.loads(events[-1])["error"]
    assert (error["type"], error["code"]) == ("quota_exceeded", "daily_token_limit")
    assert b"[DONE]" not in body and b"word5999" not in body
    [row] = await rows(http, proxy)
    assert row["error"] == "cut_off: daily_token_limit" and row["usage_source"] == "estimated"
    enc = proxy.service.encodings.for_model("no-usage-long")
    one_event = max(len(enc.encode_ordinary(w)) for w in fakeupstream.LONG_PIECES)
    assert 200 < row["total_tokens"] <= 200 + one_event
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.startswith(b"{"))
    assert row["completion_tokens"] == len(enc.encode_ordinary(text))  # billed what the client got
    code, view = await get_json(http, proxy.url + "/api/quotas")
    [alice] = [u for u in view["users"] if u["user"] == "alice"]
    assert alice["used"] == row["total_tokens"] and alice["reserved"] == 0
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", doc, {"x-app-user-id": "alice"})
    assert response.code == 429  # and the next one is refused before it costs anything


@pytest_twisted.ensureDeferred
async def test_inflight_lists_a_running_stream_with_its_tokens_so_far(start_proxy, http):
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from .test_proxy import RawClient, raw_post

    proxy = await start_proxy()
    await proxy.service.encodings.load()
    port = proxy.service.port.getHost().port
    client = RawClient(raw_post(port, dict(chat(), model="stall-after-2", stream=True), b"X-App-User-Id: carol\r\n"))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await eventually(lambda: client.received.count(b"data: ") >= 2)
    code, doc = await get_json(http, proxy.url + "/api/inflight")
    [running] = doc["requests"]
    assert (running["user"], running["model"], running["endpoint"], running["upstream"]) == (
        "carol", "stall-after-2", "/v1/chat/completions", "openai")
    enc = proxy.service.encodings.for_model("stall-after-2")
    assert running["tokens"] == len(enc.encode_ordinary("".join(fakeupstream.REPLY_PIECES[:1])))
    assert running["cache"] == "MISS" and "T" in running["started"] and running["tokens_per_s"] >= 0
    client.transport.abortConnection()
    await eventually(lambda: not proxy.service.proxy.calls)
    code, doc = await get_json(http, proxy.url + "/api/inflight")
    assert doc == {"requests": []}


@pytest_twisted.ensureDeferred
async def test_limits_set_through_another_instance_apply_here_within_two_seconds(start_proxy, http, database, engine):
    if engine != "postgresql":
        pytest.skip("instances share a PostgreSQL database")
    from greyfox._engines import Connection, engine_for
    from greyfox._store import set_budget_txn, set_override_txn

    proxy = await start_proxy()
    await sleep(0.5)  # (past the look at start)
    other = Connection(engine_for(database))  # another instance's admin API writes to the shared database
    with other.transaction():
        set_override_txn(other.cursor(), "alice", (5, None, None))
        set_budget_txn(other.cursor(), 3.5)
    other.close()
    view: dict[str, Any] = {}
    for _ in range(40):
        code, view = await get_json(http, proxy.url + "/api/quotas")
        if view["global"]["daily_budget_usd"] == 3.5:
            break
        await sleep(0.05)
    assert view["global"]["daily_budget_usd"] == 3.5
    assert {u["user"]: u["daily_tokens"] for u in view["users"]}["alice"] == 5
    response, body = await post_json(http, proxy.v1 + "/chat/completions", chat(1), {"x-app-user-id": "alice"})
    assert response.code == 429 and json.loads(body)["error"]["code"] == "daily_token_limit"
