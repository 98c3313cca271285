"""Instances sharing one database share its daily limits by leases (SPEC §8)."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from greyfox._engines import Connection, engine_for
from greyfox._leases import USD, Elsewhere, LeaseBook, Want, leases_txn, tokens_subject
from greyfox._store import migrate

from . import fakeupstream
from .conftest import eventually, post_json, sleep
from .test_ledger import get_json, rows
from .test_quota import chat

P, C = fakeupstream.PROMPT_TOKENS, fakeupstream.COMPLETION_TOKENS
ALICE = tokens_subject("alice")


# -- the arithmetic --


def test_a_lease_asks_for_what_waits_plus_two_seconds_of_demand_and_shrinks_when_idle():
    book = LeaseBook("2026-12-04")
    book.note(ALICE, 30)
    book.ask(ALICE, 50)
    [want] = book.wants({ALICE: (10.0, 40.0)}, lambda s: 1000)
    assert want == Want(ALICE, 10.0, 40.0, 40 + 50 + 2 * 30, 1000)
    book.sent([want])
    book.ask(ALICE, 100)
    assert book.wants({ALICE: (10.0, 40.0)}, lambda s: 1000)[0].target == 40 + 100 + 100  # at least as much again
    book.note(ALICE, 70)
    assert book.wants({ALICE: (10.0, 40.0)}, lambda s: 1000)[0].target == 40 + 100 + 2 * (30 + 70)
    book.asked.clear()
    book.apply("2026-12-04", [want], {ALICE: 150.0}, {})
    assert book.room(ALICE, 40.0) == 110
    book.next_interval()
    book.next_interval()
    [shrink] = book.wants({ALICE: (10.0, 40.0)}, lambda s: 1000)
    assert shrink.target == 40  # idle for an interval: down to what it holds
    book.sent([shrink])
    assert book.room(ALICE, 40.0) == 0  # smaller at once, before the database hears of it


def test_an_unchanged_subject_is_not_reported_again_and_an_unlimited_one_only_reports():
    book = LeaseBook("2026-12-04")
    [want] = book.wants({"tokens:bob": (5.0, 5.0)}, lambda s: 0)
    assert want.target == 5.0 and want.limit == 0
    book.sent([want])
    book.apply("2026-12-04", [want], {"tokens:bob": 5.0}, {})
    assert book.wants({"tokens:bob": (5.0, 5.0)}, lambda s: 0) == []
    assert len(book.wants({"tokens:bob": (7.0, 7.0)}, lambda s: 0)) == 1


def test_a_new_day_starts_with_no_lease():
    book = LeaseBook("2026-12-04")
    book.granted[ALICE] = 100.0
    book.roll("2026-12-05")
    assert book.room(ALICE, 0.0) == 0.0


# -- the transaction, on every engine --


def _connection(database: str) -> Connection:
    conn = Connection(engine_for(database))
    migrate(conn)
    return conn


def _grant(conn: Connection, instance: str, *wants: Want) -> tuple[dict[str, float], dict[str, Elsewhere]]:
    with conn.transaction():
        return leases_txn(conn.cursor(), "2026-12-04", instance, wants, 1.0)


def test_grants_never_take_the_sum_past_the_limit_and_count_what_each_really_used(database):
    conn = _connection(database)
    try:
        granted, _ = _grant(conn, "a", Want(ALICE, 0, 0, 700, 1000))
        assert granted[ALICE] == 700
        granted, elsewhere = _grant(conn, "b", Want(ALICE, 0, 0, 700, 1000))
        assert granted[ALICE] == 300 and elsewhere[ALICE] == Elsewhere(0, 0)
        # a's charges ran 50 past its lease: they are counted, and not granted to anyone
        granted, _ = _grant(conn, "a", Want(ALICE, 750, 750, 800, 1000))
        assert granted[ALICE] == 700  # (a's stream stops: it may not go on past its lease)
        granted, elsewhere = _grant(conn, "b", Want(ALICE, 0, 0, 400, 1000))
        assert granted[ALICE] == 300 and elsewhere[ALICE] == Elsewhere(750, 750)  # keeps its own, gets no more
        # b gives back what it does not use: a may have it
        _grant(conn, "b", Want(ALICE, 100, 100, 100, 1000))
        granted, elsewhere = _grant(conn, "a", Want(ALICE, 750, 750, 2000, 1000))
        assert granted[ALICE] == 900 and elsewhere[ALICE] == Elsewhere(100, 100)
    finally:
        conn.close()


def test_dollars_are_leased_like_tokens(database):
    conn = _connection(database)
    try:
        granted, _ = _grant(conn, "a", Want(USD, 0.5, 0.5, 0.75, 1.0))
        assert granted[USD] == 0.75
        granted, _ = _grant(conn, "b", Want(USD, 0, 0, 0.75, 1.0))
        assert granted[USD] == pytest.approx(0.25)
    finally:
        conn.close()


# -- instances racing, on one PostgreSQL --


async def _two(start_proxy: Any, engine: str, **env: str) -> list[Any]:
    if engine != "postgresql":
        pytest.skip("instances share a PostgreSQL database")
    proxies = [await start_proxy(GREYFOX_INSTANCE=name, **env) for name in ("one", "two")]
    for proxy in proxies:
        await proxy.service.encodings.load()
    return proxies


async def _used(http: Any, proxies: list[Any], user: str) -> int:
    """Tokens charged to ``user`` by every instance, from the shared ledger."""
    for proxy in proxies:
        await proxy.service.ledger.flush()
    return sum(r["total_tokens"] for r in await rows(http, proxies[0], user=user, limit=500))


@pytest_twisted.ensureDeferred
async def test_requests_racing_over_two_instances_never_overshoot_the_daily_limit(start_proxy, http, engine):
    """The reservation covers the answer, so no request has an excess: the
    limit holds exactly, and the leases strand no more than one request's room."""
    per_request = 28  # the reservation of chat(i): about 8 prompt + 20 max_tokens
    limit = 12 * per_request + 10
    proxies = await _two(start_proxy, engine, GREYFOX_DAILY_TOKENS=str(limit))
    proxies[0].upstream.delay = 0.05
    calls = [Deferred.fromCoroutine(post_json(http, proxies[i % 2].v1 + "/chat/completions", chat(i),
                                              {"x-app-user-id": "ci"}))
             for i in range(60)]
    results = await DeferredList(calls, fireOnOneErrback=True)
    codes = [r.code for ok, (r, _) in results]
    assert set(codes) == {200, 429}
    assert codes.count(200) == len(proxies[0].upstream.received)
    used = await _used(http, proxies, "ci")
    assert used == codes.count(200) * (P + C) <= limit
    assert codes.count(200) >= 10  # each instance strands less than one request's room of its lease
    refused = [json.loads(body)["error"] for ok, (r, body) in results if r.code == 429]
    assert {e["code"] for e in refused} == {"daily_token_limit"}


@pytest_twisted.ensureDeferred
async def test_streams_racing_over_two_instances_are_cut_off_within_one_event_each(start_proxy, http, engine):
    """No max_tokens: each stream runs past its reservation, so every instance
    renews its lease mid-stream, and the cut-off holds across both."""
    limit = 400
    proxies = await _two(start_proxy, engine, GREYFOX_DAILY_TOKENS=str(limit), GREYFOX_DEFAULT_MAX_TOKENS="10")
    doc = {"model": "no-usage-long", "stream": True, "messages": [{"role": "user", "content": "Say hello"}]}
    calls = [Deferred.fromCoroutine(post_json(http, proxies[i % 2].v1 + "/chat/completions", dict(doc, n=i),
                                              {"x-app-user-id": "alice"}))
             for i in range(6)]
    results = await DeferredList(calls, fireOnOneErrback=True)
    enc = proxies[0].service.encodings.for_model("no-usage-long")
    one_event = max(len(enc.encode_ordinary(w)) for w in fakeupstream.LONG_PIECES)
    streams = [body for ok, (r, body) in results if r.code == 200]
    assert streams and all(b"word5999" not in body for body in streams)
    assert sum(b'"quota_exceeded"' in body for body in streams) == len(streams)  # every stream was cut, none ran on
    used = await _used(http, proxies, "alice")
    assert used <= limit + len(streams) * one_event  # the bound: one event past the limit per stream
    # A stream is cut when its instance gets no more lease; what the other
    # holds then and does not use is small (a few events).
    assert used >= 0.9 * limit
    served = {r["instance"] for r in await rows(http, proxies[1], user="alice")}
    assert served == {"one", "two"}


@pytest_twisted.ensureDeferred
async def test_a_budget_spent_through_one_instance_refuses_on_the_other(start_proxy, http, engine):
    proxies = await _two(start_proxy, engine, GREYFOX_DAILY_BUDGET_USD="0.00007")  # five reservations of chat(i)
    response, _ = await post_json(http, proxies[0].v1 + "/chat/completions", chat(1), {"x-app-user-id": "alice"})
    assert response.code == 200
    refused = None
    for i in range(2, 40):
        response, body = await post_json(http, proxies[1].v1 + "/chat/completions", chat(i), {"x-app-user-id": "bob"})
        if response.code == 429:
            refused = json.loads(body)["error"]["code"]
            break
    assert refused == "daily_budget"
    for proxy in proxies:
        await proxy.service.ledger.flush()
    spent = sum(r["cost_usd"] for r in await rows(http, proxies[0], limit=500) if r["status"] == 200)
    assert 3 * 0.0000085 < spent <= 0.00007


@pytest_twisted.ensureDeferred
async def test_usage_through_one_instance_shows_in_the_others_quotas_within_two_seconds(start_proxy, http, engine):
    proxies = await _two(start_proxy, engine, GREYFOX_DAILY_TOKENS="1000")
    response, _ = await post_json(http, proxies[0].v1 + "/chat/completions", chat(1), {"x-app-user-id": "alice"})
    assert response.code == 200
    await proxies[0].service.ledger.flush()

    async def used_on_two() -> int:
        code, view = await get_json(http, proxies[1].url + "/api/quotas")
        return {u["user"]: u["used"] for u in view["users"]}.get("alice", 0)

    for _ in range(40):
        if await used_on_two() == P + C:
            break
        await sleep(0.05)
    assert await used_on_two() == P + C
    response, _ = await post_json(http, proxies[1].v1 + "/chat/completions", chat(2), {"x-app-user-id": "alice"})
    assert int(response.headers.getRawHeaders(b"x-ratelimit-remaining-tokens")[0]) <= 1000 - 2 * (P + C)


@pytest_twisted.ensureDeferred
async def test_a_stopped_instance_hands_back_its_lease_and_a_restart_keeps_its_spend(start_proxy, http, engine):
    proxies = await _two(start_proxy, engine, GREYFOX_DAILY_TOKENS="1000")
    for i in range(5):
        response, _ = await post_json(http, proxies[0].v1 + "/chat/completions", chat(i), {"x-app-user-id": "alice"})
        assert response.code == 200
    await proxies[0].stop()
    conn = Connection(engine_for(proxies[1].service.settings.db))
    try:
        [(granted, used)] = conn.execute("SELECT granted, used FROM leases WHERE instance = 'one' AND subject = 'tokens:alice'").fetchall()
    finally:
        conn.close()
    assert granted == used == 5 * (P + C)
    again = await start_proxy(GREYFOX_INSTANCE="one", GREYFOX_DAILY_TOKENS="1000")
    code, view = await get_json(http, again.url + "/api/quotas")
    assert {u["user"]: u["used"] for u in view["users"]}["alice"] == 5 * (P + C)
    await eventually(lambda: again.service.quotas.remaining("alice", again.service.reactor.seconds()) == 1000 - 5 * (P + C))


@pytest_twisted.ensureDeferred
async def test_the_loop_breaker_counts_calls_across_instances_and_a_reset_reaches_them_all(start_proxy, http, engine):
    proxies = await _two(start_proxy, engine, GREYFOX_LOOP_MAX_REPEATS="6")
    conversation = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Fix the bug."}]

    async def turn(proxy: Any) -> Any:
        conversation.extend([{"role": "assistant", "content": f"Try {len(conversation)}"},
                             {"role": "user", "content": "Still failing."}])
        response, body = await post_json(http, proxy.v1 + "/chat/completions",
                                         {"model": "gpt-4o-mini", "messages": conversation}, {"x-app-user-id": "agent"})
        return response.code, body

    for _ in range(3):
        assert (await turn(proxies[0]))[0] == 200
    quotas_two = proxies[1].service.quotas
    await eventually(lambda: sum(quotas_two.loops_elsewhere.values()) == 3, timeout=3)
    for _ in range(3):  # 3 there + 3 here: the limit
        assert (await turn(proxies[1]))[0] == 200
    code, body = await turn(proxies[1])
    assert code == 429 and json.loads(body)["error"]["code"] == "runaway_loop"
    response = await http.delete(proxies[0].url + "/api/quotas/agent/breaker")
    assert response.code == 200
    await response.content()
    await eventually(lambda: not quotas_two.tripped("agent", proxies[1].service.reactor.seconds()), timeout=3)
    assert (await turn(proxies[1]))[0] == 200


@pytest_twisted.ensureDeferred
async def test_two_daemons_on_one_database_share_ledger_cache_and_limits(tmp_path, upstream, http, database, engine):
    """Two ``twistd -n greyfox`` processes, started at once on one PostgreSQL."""
    if engine != "postgresql":
        pytest.skip("instances share a PostgreSQL database")
    from .test_daemon import Daemon

    limit = 10 * 28 + 10  # ten reservations of chat(i)
    for name in ("east", "west"):
        (tmp_path / name).mkdir()
    daemons = [Daemon(tmp_path / name, upstream, db=database, GREYFOX_INSTANCE=name, GREYFOX_DAILY_TOKENS=str(limit))
               for name in ("east", "west")]
    try:
        for d in daemons:
            await d.ready(http)
        upstream.delay = 0.05
        calls = [Deferred.fromCoroutine(post_json(http, daemons[i % 2].url + "/v1/chat/completions", chat(i),
                                                  {"x-app-user-id": "ci"}))
                 for i in range(30)]
        results = await DeferredList(calls, fireOnOneErrback=True)
        codes = [r.code for ok, (r, _) in results]
        assert 9 <= codes.count(200) <= 10 and codes.count(429) == 30 - codes.count(200)
        upstream.delay = 0.0

        # an answer recorded by one is a hit on the other within 2 s
        doc = dict(chat(100), max_tokens=5)
        response, _ = await post_json(http, daemons[0].url + "/v1/chat/completions", doc, {"x-app-user-id": "bob"})
        assert response.headers.getRawHeaders(b"x-greyfox-cache") == [b"MISS"]
        seen = len(upstream.received)
        for _ in range(50):
            await sleep(0.05)
            response, _ = await post_json(http, daemons[1].url + "/v1/chat/completions", doc, {"x-app-user-id": "bob"})
            if response.headers.getRawHeaders(b"x-greyfox-cache") == [b"HIT"]:
                break
        assert response.headers.getRawHeaders(b"x-greyfox-cache") == [b"HIT"]
        assert len(upstream.received) - seen <= 2  # (the misses before the other had learnt it)

        # one ledger: each shows the other's rows
        await sleep(0.3)  # (the last rows' flush)
        shown = json.loads(await (await http.get(daemons[1].url + "/api/requests?limit=500&user=ci")).content())
        assert {r["instance"] for r in shown["requests"]} == {"east", "west"}
        assert sum(r["total_tokens"] for r in shown["requests"]) == codes.count(200) * (P + C) <= limit
        for d in daemons:
            d.proc.send_signal(signal.SIGTERM)
        for d in daemons:
            assert await d.exit_code() in (0, -signal.SIGTERM), d.output()
            assert "Traceback" not in d.output(), d.output()
    finally:
        for d in daemons:
            d.kill()


@pytest_twisted.ensureDeferred
async def test_an_instance_that_loses_the_database_serves_within_its_lease_then_refuses(start_proxy, http, engine):
    from twisted.internet.defer import fail

    if engine != "postgresql":
        pytest.skip("instances share a PostgreSQL database")
    proxy = await start_proxy(GREYFOX_DAILY_TOKENS="100000")
    await proxy.service.encodings.load()
    for i in range(4):
        response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(i), {"x-app-user-id": "alice"})
        assert response.code == 200
    keeper = proxy.service.leases
    keeper._run = lambda *args: fail(ConnectionError("the database went away"))
    book = proxy.service.quotas.leases
    room = book.room(ALICE, 4 * (P + C))
    assert room > 0  # what it holds of the limit beyond what it used
    codes = []
    for i in range(4, 40):
        response, body = await post_json(http, proxy.v1 + "/chat/completions", chat(i), {"x-app-user-id": "alice"})
        codes.append(response.code)
        if response.code != 200:
            assert response.code == 429 and json.loads(body)["error"]["code"] == "daily_token_limit"
            break
    assert codes[0] == 200 and codes[-1] == 429  # served within the lease, then refused, far from the limit
    assert (len(codes) - 1) * (P + C) <= room
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", chat(4), {"x-app-user-id": "alice"})
    assert response.headers.getRawHeaders(b"x-greyfox-cache") == [b"HIT"]  # what it can decide alone


def test_admission_asks_for_a_lease_where_it_has_none_and_a_new_day_has_none():
    from greyfox._quota import LeaseShort, Limits, Quotas

    quotas = Quotas(Limits(daily_tokens=100), 0.0, "UTC", 0, 600, 0.0)
    quotas.leases = LeaseBook(quotas.day_of(0.0))
    quotas.leases.granted[ALICE] = 50.0
    quotas.admit("alice", 40, 0.0, None, 0.0)
    with pytest.raises(LeaseShort):
        quotas.admit("alice", 20, 0.0, None, 1.0)
    assert quotas.leases.asked == {ALICE: 20}
    tomorrow = 86400.0 + 1
    with pytest.raises(LeaseShort):
        quotas.admit("alice", 10, 0.0, None, tomorrow)
    assert quotas.leases.day == "1970-01-02" and quotas.leases.asked == {ALICE: 10}
