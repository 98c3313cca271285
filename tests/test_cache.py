"""Pay for a prompt once: cache hits, controls, coalescing, replay mode and cassettes."""

from __future__ import annotations

import json
import zlib
from typing import Any

import openai
import pytest
import pytest_twisted
from hypothesis import given, strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock

from greyfox._cache import Cache, CacheEntry, pack_body, unpack_body
from greyfox._cachekey import SHARED, cache_key, canonical_json, credential_scope
from greyfox._cli import main as cli

from . import fakeupstream
from .conftest import PROXY_KEY, eventually, in_thread, post_json, sleep
from .test_ledger import get_json, rows
from .test_proxy import RawClient, _wait, hang_up_after, raw_post

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
P, C = fakeupstream.PROMPT_TOKENS, fakeupstream.COMPLETION_TOKENS


def sdk(proxy: Any, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.v1, api_key=kw.pop("api_key", "sk-client"), max_retries=0, **kw)


def chat_raw(client: openai.OpenAI, **body: Any) -> tuple[str, str, Any]:
    raw = client.chat.completions.with_raw_response.create(**body)
    return raw.headers.get("x-greyfox-cache"), raw.headers.get("age"), raw.parse()


async def stored(proxy: Any, n: int) -> None:
    """Wait until the cache holds ``n`` entries (stores are written off the request path)."""
    await eventually(lambda: len(proxy.service.cache) == n)


# -- keys (pure) --


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.text(min_size=1, max_size=8), json_values, min_size=1, max_size=6)


@given(bodies)
def test_key_ignores_key_order_and_whitespace(body):
    shuffled = dict(reversed(list(body.items())))
    reparsed = json.loads(json.dumps(body, indent=3))
    assert cache_key("openai", "/chat/completions", body) == cache_key("openai", "/chat/completions", shuffled)
    assert cache_key("openai", "/chat/completions", body) == cache_key("openai", "/chat/completions", reparsed)


@given(bodies, st.data())
def test_any_changed_value_changes_the_key(body, data):
    field = data.draw(st.sampled_from(sorted(body)))
    new_value = data.draw(json_values.filter(lambda v: canonical_json(v) != canonical_json(body[field])))
    if field == "stream_options":
        return  # the one field that never splits entries
    changed = dict(body, **{field: new_value})
    assert cache_key("openai", "/chat/completions", body) != cache_key("openai", "/chat/completions", changed)


def test_key_covers_upstream_and_path_but_not_stream_options_or_usage_accounting():
    body = dict(CHAT, stream=True)
    key = cache_key("openai", "/chat/completions", body)
    assert key != cache_key("deepseek", "/chat/completions", body)
    assert key != cache_key("openai", "/completions", body)
    assert key == cache_key("openai", "/chat/completions", dict(body, stream_options={"include_usage": True}))
    assert key == cache_key("openai", "/chat/completions", dict(body, usage={"include": True}))  # (OpenRouter's)


def test_credential_fingerprint_is_keyed_and_hides_the_credential():
    a = credential_scope(b"secret-1", b"Bearer sk-alice")
    assert a != credential_scope(b"secret-2", b"Bearer sk-alice")
    assert a != credential_scope(b"secret-1", b"Bearer sk-bob")
    assert "sk-alice" not in a


# -- the index (no reactor) --


def entry(key: str, size_hint: int = 0, created: float = 0.0, model: str = "m") -> CacheEntry:
    return CacheEntry(key, SHARED, "openai", "/chat/completions", model, False, 200, "application/json", created, created)


class FakeDB:
    def __init__(self) -> None:
        self.bodies: dict[tuple[str, str], bytes] = {}

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        name = fn.__name__
        if name == "_store_many_txn":
            sizes = []
            for row, data, _request in args[0]:  # rows in _COLUMNS order: key, scope first
                self.bodies[(row[0], row[1])] = data
                sizes.append(len(data))
            return succeed(sizes)
        if name == "_delete_txn":
            for k in args[0]:
                self.bodies.pop(k, None)
            return succeed(None)
        if name == "_body_txn":
            return succeed(self.bodies.get(args))
        return succeed(None)


def test_ttl_expires_entries():
    clock = Clock()
    cache = Cache(FakeDB().run, clock, ttl=60)
    cache.store(entry("a" * 64, created=0), b"{}")
    clock.advance(0.1)
    assert cache.lookup("a" * 64, [SHARED]) is not None
    clock.advance(61)
    assert cache.lookup("a" * 64, [SHARED]) is None and len(cache) == 0


def test_entries_and_bytes_are_one_snapshot():
    """An answer is served from memory before its write: until the write, it
    counts in neither the stored entries nor their bytes."""
    clock = Clock()
    cache = Cache(FakeDB().run, clock)
    cache.store(entry("a" * 64), b"x" * 100)
    clock.advance(Cache.WRITE_DELAY)
    cache.store(entry("b" * 64), b"y" * 50)
    assert cache.lookup("b" * 64, [SHARED]) is not None  # served already
    assert (cache.stored, cache.bytes) == (1, 100)
    clock.advance(Cache.WRITE_DELAY)
    assert (cache.stored, cache.bytes) == (2, 150)
    cache.store(entry("a" * 64), b"z" * 10)  # replaced: the old bytes go, the new wait for their write
    assert (cache.stored, cache.bytes) == (1, 50)
    clock.advance(Cache.WRITE_DELAY)
    assert (cache.stored, cache.bytes) == (2, 60)
    cache.clear()
    assert (cache.stored, cache.bytes) == (0, 0)


def test_size_cap_evicts_least_recently_used():
    clock, db = Clock(), FakeDB()
    cache = Cache(db.run, clock, max_bytes=250)
    for name in "abc":
        cache.store(entry(name * 64), b"x" * 100)
        clock.advance(1)  # each store is written after Cache.WRITE_DELAY
    # a and b are stored, c pushed a out... unless a was used: use b, then store d
    assert cache.lookup("a" * 64, [SHARED]) is None
    Deferred.fromCoroutine(cache.body(cache.lookup("b" * 64, [SHARED])))
    cache.store(entry("d" * 64), b"x" * 100)
    clock.advance(0.1)
    assert cache.lookup("b" * 64, [SHARED]) is not None
    assert cache.lookup("c" * 64, [SHARED]) is None
    assert cache.bytes <= 250 and ("c" * 64, SHARED) not in db.bodies


# -- through the proxy --


@pytest_twisted.ensureDeferred
async def test_second_identical_request_is_a_hit_and_the_upstream_is_paid_once(start_proxy):
    proxy = await start_proxy()
    client = sdk(proxy)
    first = await in_thread(chat_raw, client, **CHAT)
    await stored(proxy, 1)
    second = await in_thread(chat_raw, client, **CHAT)
    assert first[0] == "MISS" and second[0] == "HIT"
    assert second[1] is not None and int(second[1]) >= 0
    assert second[2].choices[0].message.content == fakeupstream.REPLY
    assert second[2].usage.total_tokens == P + C  # the upstream's own usage block
    assert len(proxy.upstream.received) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o"},
        {"messages": [{"role": "user", "content": "Say hello!"}]},
        {"temperature": 0.5},
        {"seed": 7},
        {"max_tokens": 20},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]},
    ],
)
@pytest_twisted.ensureDeferred
async def test_any_output_relevant_change_is_a_miss(start_proxy, change):
    proxy = await start_proxy()
    client = sdk(proxy)
    await in_thread(chat_raw, client, **CHAT)
    await stored(proxy, 1)
    outcome, _, _ = await in_thread(chat_raw, client, **dict(CHAT, **change))
    assert outcome == "MISS"
    assert len(proxy.upstream.received) == 2


@pytest_twisted.ensureDeferred
async def test_streamed_hit_replays_the_same_text_as_sse(start_proxy):
    proxy = await start_proxy()
    client = sdk(proxy)

    def stream(**extra: Any) -> tuple[str, str, list[Any]]:
        raw = client.chat.completions.with_raw_response.create(**CHAT, stream=True, **extra)
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return raw.headers.get("x-greyfox-cache"), text, chunks

    miss = await in_thread(stream)
    await stored(proxy, 1)
    hit = await in_thread(stream)
    with_usage = await in_thread(stream, stream_options={"include_usage": True})
    assert (miss[0], hit[0], with_usage[0]) == ("MISS", "HIT", "HIT")
    assert miss[1] == hit[1] == with_usage[1] == fakeupstream.REPLY
    assert all(c.choices for c in hit[2])  # no usage chunk: this client did not ask
    assert with_usage[2][-1].usage.total_tokens == P + C  # this one did, and gets the original
    assert len(proxy.upstream.received) == 1


@pytest.mark.parametrize("model", ["drop-after-2", "fail-500", "fail-429"])
@pytest_twisted.ensureDeferred
async def test_truncated_streams_and_errors_are_not_stored(start_proxy, http, model):
    proxy = await start_proxy()
    body = dict(CHAT, model=model, stream=model.startswith("drop"))
    for _ in range(2):
        response = await http.post(proxy.v1 + "/chat/completions", data=json.dumps(body).encode(),
                                   headers={b"content-type": [b"application/json"]})
        assert response.headers.getRawHeaders(b"x-greyfox-cache") == [b"MISS"]
        await response.collect(lambda data: None).addErrback(lambda f: None)  # (a dropped stream is aborted)
    assert len(proxy.service.cache) == 0
    assert len(proxy.upstream.received) == 2


@pytest_twisted.ensureDeferred
async def test_aborted_stream_is_not_stored(start_proxy, http):
    proxy = await start_proxy()
    await hang_up_after(proxy, dict(CHAT, stream=True), 2)
    assert await _wait(proxy.upstream.lost[0], 2) is True
    await eventually(lambda: proxy.service.ledger.written >= 1)
    assert len(proxy.service.cache) == 0


@pytest_twisted.ensureDeferred
async def test_controls_bypass_refresh_no_cache_no_store(start_proxy, http):
    proxy = await start_proxy()
    url = proxy.v1 + "/chat/completions"

    async def outcome(headers: dict[str, str]) -> str:
        response, _ = await post_json(http, url, CHAT, headers)
        return response.headers.getRawHeaders(b"x-greyfox-cache")[0].decode()

    assert await outcome({"cache-control": "no-store"}) == "MISS"
    assert len(proxy.service.cache) == 0
    assert await outcome({"x-greyfox-cache": "bypass"}) == "BYPASS"
    assert len(proxy.service.cache) == 0
    assert await outcome({"x-greyfox-cache": "refresh"}) == "REFRESH"
    await stored(proxy, 1)
    assert await outcome({}) == "HIT"
    assert await outcome({"cache-control": "no-cache"}) == "REFRESH"
    assert await outcome({"x-greyfox-cache": "bypass"}) == "BYPASS"
    assert len(proxy.upstream.received) == 5
    got = await rows(http, proxy)
    assert [r["cache"] for r in got] == ["BYPASS", "REFRESH", "HIT", "REFRESH", "BYPASS", "MISS"]


@pytest_twisted.ensureDeferred
async def test_passthrough_mode_never_caches(start_proxy, http):
    proxy = await start_proxy(GREYFOX_MODE="passthrough")
    for _ in range(2):
        response, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
        assert response.headers.getRawHeaders(b"x-greyfox-cache") == [b"BYPASS"]
    assert len(proxy.upstream.received) == 2 and len(proxy.service.cache) == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_twenty_identical_concurrent_requests_pay_once(start_proxy, http, stream):
    proxy = await start_proxy()
    proxy.upstream.delay = 0.3
    body = dict(CHAT, stream=stream)
    calls = [Deferred.fromCoroutine(post_json(http, proxy.v1 + "/chat/completions", body, {"x-app-user-id": f"u{i}"}))
             for i in range(20)]
    results = await DeferredList(calls, fireOnOneErrback=True)
    assert len(proxy.upstream.received) == 1
    outcomes = sorted(r.headers.getRawHeaders(b"x-greyfox-cache")[0] for ok, (r, _) in results)
    assert outcomes == [b"HIT"] * 19 + [b"MISS"]
    for ok, (response, data) in results:
        assert response.code == 200
        if stream:
            assert b"[DONE]" in data and b'"choices": []' not in data
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                           for line in data.split(b"\n\n") if line.startswith(b"data: {"))
            assert text == fakeupstream.REPLY
        else:
            assert json.loads(data)["choices"][0]["message"]["content"] == fakeupstream.REPLY
    got = await rows(http, proxy)
    charged = [r for r in got if r["cache"] != "HIT"]
    assert len(got) == 20 and len(charged) == 1 and charged[0]["total_tokens"] == P + C
    assert all(r["cost_usd"] == 0 and r["saved_tokens"] == P + C for r in got if r["cache"] == "HIT")


@pytest_twisted.ensureDeferred
async def test_a_pipelined_repeat_right_after_the_answer_is_a_hit(start_proxy):
    """A repeat read before the first answer is out (HTTP pipelining) waits
    its turn and is answered from the cache, never paying twice."""
    proxy = await start_proxy()
    port = proxy.service.port.getHost().port
    # Both in one write: the second is read before the first is answered.
    client = RawClient(raw_post(port, CHAT, close=False) + raw_post(port, CHAT))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await _wait(client.closed, 5)
    answers = client.received.split(b"HTTP/1.1 ")[1:]
    assert [a.split(b" ", 1)[0] for a in answers] == [b"200", b"200"]
    assert b"x-greyfox-cache: miss" in answers[0].lower() and b"x-greyfox-cache: hit" in answers[1].lower()
    assert answers[0].split(b"\r\n\r\n", 1)[1] == answers[1].split(b"\r\n\r\n", 1)[1]
    assert len(proxy.upstream.received) == 1
    await eventually(lambda: proxy.service.ledger.written >= 2)


@pytest_twisted.ensureDeferred
async def test_an_answer_stored_just_before_a_shutdown_is_replayed_after_the_restart(start_proxy, http, tmp_path):
    """Stopped within the cache's write delay (a CI job recording, then done):
    the last answer is written before the database closes, not dropped."""
    db = str(tmp_path / "restart.db")
    proxy = await start_proxy(db=db)
    response, first = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert response.code == 200
    await rows(http, proxy)  # (an API read writes the ledger at once: the shutdown finds no row to wait for)
    await proxy.service.stopService()
    again = await start_proxy(db=db, GREYFOX_MODE="replay")
    response, body = await post_json(http, again.v1 + "/chat/completions", CHAT)
    assert response.code == 200 and response.headers.getRawHeaders(b"x-greyfox-cache") == [b"HIT"]
    assert body == first and len(proxy.upstream.received) == 1


@pytest_twisted.ensureDeferred
async def test_coalesced_followers_share_the_leaders_error_and_nothing_is_stored(start_proxy, http):
    proxy = await start_proxy()
    proxy.upstream.delay = 0.3
    body = dict(CHAT, model="fail-500")
    results = await DeferredList([Deferred.fromCoroutine(post_json(http, proxy.v1 + "/chat/completions", body)) for _ in range(5)])
    assert len(proxy.upstream.received) == 1
    assert all(r.code == 500 and json.loads(d)["error"]["message"] == "fake failure 500" for ok, (r, d) in results)
    assert len(proxy.service.cache) == 0


@pytest_twisted.ensureDeferred
async def test_replay_mode_never_calls_the_upstream(start_proxy, http, tmp_path):
    db = str(tmp_path / "replay.db")
    recorder = await start_proxy(db=db)
    await post_json(http, recorder.v1 + "/chat/completions", CHAT)
    await stored(recorder, 1)
    # The same request in replay mode, by header: a hit.
    response, body = await post_json(http, recorder.v1 + "/chat/completions", CHAT, {"x-greyfox-mode": "replay"})
    assert response.code == 200 and response.headers.getRawHeaders(b"x-greyfox-cache") == [b"HIT"]
    await recorder.stop()
    replayer = await start_proxy(db=db, GREYFOX_MODE="replay", OPENAI_API_KEY="")
    before = len(replayer.upstream.received)
    response, body = await post_json(http, replayer.v1 + "/chat/completions", CHAT)
    assert response.code == 200 and json.loads(body)["choices"][0]["message"]["content"] == fakeupstream.REPLY
    response, body = await post_json(http, replayer.v1 + "/chat/completions", dict(CHAT, seed=1))
    error = json.loads(body)["error"]
    assert response.code == 404 and error["type"] == "cache_miss"
    assert error["key"] == cache_key("openai", "/chat/completions", dict(CHAT, seed=1))
    assert len(replayer.upstream.received) == before


@pytest_twisted.ensureDeferred
async def test_a_replay_miss_names_the_nearest_recorded_request_and_what_differs(start_proxy, http):
    proxy = await start_proxy()
    url = proxy.v1 + "/chat/completions"
    other = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Something else entirely"}], "seed": 9}
    for body in (CHAT, other):
        await post_json(http, url, body)
    changed = dict(CHAT, messages=[{"role": "user", "content": "Say goodbye"}])
    response, body = await post_json(http, url, changed, {"x-greyfox-mode": "replay"})  # stores may still be queued
    error = json.loads(body)["error"]
    assert response.code == 404 and error["type"] == "cache_miss"
    assert error["nearest_key"] == cache_key("openai", "/chat/completions", CHAT)
    assert error["differs_at"] == ["messages[0].content"]
    assert 'messages[0].content: "Say hello" → "Say goodbye"' in error["message"]
    await stored(proxy, 2)
    response, body = await post_json(http, url, dict(CHAT, temperature=0.5), {"x-greyfox-mode": "replay"})
    assert json.loads(body)["error"]["differs_at"] == ["temperature"]  # read back from the database this time


@pytest_twisted.ensureDeferred
async def test_pass_through_credentials_never_share_entries(start_proxy, http):
    proxy = await start_proxy(OPENAI_API_KEY="")  # no key of our own: clients' keys pass through
    url = proxy.v1 + "/chat/completions"

    async def outcome(key: str) -> str:
        response, _ = await post_json(http, url, CHAT, {"authorization": f"Bearer {key}"})
        return response.headers.getRawHeaders(b"x-greyfox-cache")[0].decode()

    assert await outcome("sk-alice") == "MISS"
    await stored(proxy, 1)
    assert await outcome("sk-bob") == "MISS"
    await stored(proxy, 2)
    assert await outcome("sk-alice") == "HIT"
    assert await outcome("sk-bob") == "HIT"
    assert [r.header("authorization") for r in proxy.upstream.received] == ["Bearer sk-alice", "Bearer sk-bob"]
    for e in proxy.service.cache.entries():
        assert "sk-" not in e.scope


@pytest_twisted.ensureDeferred
async def test_rotating_our_own_key_keeps_the_cache_and_clients_of_any_key_read_it(start_proxy, http, tmp_path):
    db = str(tmp_path / "rotate.db")
    first = await start_proxy(db=db, OPENAI_API_KEY="sk-old-key")
    await post_json(http, first.v1 + "/chat/completions", CHAT)
    await stored(first, 1)
    await first.stop()
    second = await start_proxy(db=db, OPENAI_API_KEY="sk-new-key")
    response, _ = await post_json(http, second.v1 + "/chat/completions", CHAT, {"authorization": "Bearer whatever"})
    assert response.headers.getRawHeaders(b"x-greyfox-cache") == [b"HIT"]
    assert len(second.upstream.received) == 1


@pytest_twisted.ensureDeferred
async def test_cassette_export_import_replays_every_entry(start_proxy, http, tmp_path):
    source = str(tmp_path / "source.db")
    proxy = await start_proxy(db=source)
    bodies = [dict(CHAT, seed=i) for i in range(3)] + [dict(CHAT, stream=True), {"model": "text-embedding-3-small", "input": "x"}]
    paths = ["/chat/completions"] * 4 + ["/embeddings"]
    for path, body in zip(paths, bodies):
        await post_json(http, proxy.v1 + path, body)
    await stored(proxy, 5)
    await proxy.stop()
    cassette = tmp_path / "cassette.jsonl"
    assert cli(["--db", source, "cache", "export", str(cassette)]) == 0
    lines = cassette.read_text().splitlines()
    assert len(lines) == 5 and PROXY_KEY not in cassette.read_text()
    target = str(tmp_path / "ci.db")
    assert cli(["--db", target, "cache", "import", str(cassette)]) == 0
    assert cli(["--db", target, "cache", "import", str(cassette)]) == 0  # idempotent
    replay = await start_proxy(db=target, GREYFOX_MODE="replay", OPENAI_API_KEY="")
    assert len(replay.service.cache) == 5
    seen = len(replay.upstream.received)
    for path, body in zip(paths, bodies):
        response, data = await post_json(http, replay.v1 + path, body)
        assert response.code == 200, data
    assert len(replay.upstream.received) == seen


@pytest_twisted.ensureDeferred
async def test_a_cassette_is_sorted_by_key_and_keeps_each_canonical_request(start_proxy, http, tmp_path):
    db = str(tmp_path / "source.db")
    proxy = await start_proxy(db=db)
    bodies = [dict(CHAT, seed=i) for i in range(4)] + [dict(CHAT, stream=True, stream_options={"include_usage": True})]
    for body in bodies:
        await post_json(http, proxy.v1 + "/chat/completions", body)
    await stored(proxy, 5)
    await proxy.stop()
    cassette = tmp_path / "c.jsonl"
    assert cli(["--db", db, "cache", "export", str(cassette)]) == 0
    docs = [json.loads(line) for line in cassette.read_text().splitlines()]
    assert [d["key"] for d in docs] == sorted(d["key"] for d in docs)
    requests = sorted((d["request"] for d in docs), key=lambda r: json.dumps(r, sort_keys=True))
    sent = [{k: v for k, v in b.items() if k != "stream_options"} for b in bodies]  # (stream_options is not in the key)
    assert requests == sorted(sent, key=lambda r: json.dumps(r, sort_keys=True))
    again = tmp_path / "again.jsonl"
    target = str(tmp_path / "t.db")
    assert cli(["--db", target, "cache", "import", str(cassette)]) == 0
    assert cli(["--db", target, "cache", "export", str(again)]) == 0
    assert again.read_text() == cassette.read_text()  # a round trip changes no byte


def test_a_cassette_request_that_does_not_match_its_key_is_refused(tmp_path, capsys):
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    line = {"version": 1, "key": cache_key("openai", "/chat/completions", request), "upstream": "openai",
            "path": "/chat/completions", "model": "m", "stream": False, "status": 200,
            "content_type": "application/json", "created": 1.0, "usage": {}, "cost_usd": None, "body": "{}",
            "request": request}
    cassette = tmp_path / "c.jsonl"
    old_style = {k: v for k, v in line.items() if k != "request"}
    cassette.write_text(json.dumps(line) + "\n" + json.dumps(dict(old_style, key="b" * 64)) + "\n")
    db = str(tmp_path / "t.db")
    assert cli(["--db", db, "cache", "import", str(cassette)]) == 0  # cassettes without requests still import
    edited = dict(line, request=dict(request, messages=[{"role": "user", "content": "hello"}]))
    cassette.write_text(json.dumps(edited) + "\n")
    assert cli(["--db", db, "cache", "import", str(cassette)]) == 1
    assert "line 1: key does not match the request" in capsys.readouterr().err


def test_entries_stored_before_requests_were_kept_survive_the_migration(tmp_path):
    import sqlite3

    from greyfox import _store

    db = str(tmp_path / "old.db")
    conn = sqlite3.connect(db)
    for version, statements in enumerate(_store.MIGRATIONS[:3]):
        for statement in statements:
            conn.execute(statement)
    conn.execute("PRAGMA user_version=3")
    conn.execute("INSERT INTO cache VALUES (?, 'shared', 'openai', '/chat/completions', 'm', 0, 200, "
                 "'application/json', 1, 1, 3, 1, 1, 0, NULL, ?)", ("c" * 64, pack_body(b"{}")))
    conn.commit()
    conn.close()
    conn = _store.open_database(db)
    assert conn.execute("SELECT key, request FROM cache").fetchall() == [("c" * 64, None)]
    conn.close()
    cassette = tmp_path / "c.jsonl"
    assert cli(["--db", db, "cache", "export", str(cassette)]) == 0
    assert "request" not in json.loads(cassette.read_text())


def test_corrupted_cassette_line_is_rejected_with_its_number(tmp_path, capsys):
    good = {"version": 1, "key": "a" * 64, "upstream": "openai", "path": "/chat/completions", "model": "m",
            "stream": False, "status": 200, "content_type": "application/json", "created": 1.0,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 0}, "cost_usd": None, "body": "{}"}
    cassette = tmp_path / "bad.jsonl"
    cassette.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, key="b" * 64)) + "\n{oops\n")
    db = str(tmp_path / "t.db")
    assert cli(["--db", db, "cache", "import", str(cassette)]) == 1
    assert "line 3" in capsys.readouterr().err
    cassette.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, status=500)) + "\n")
    assert cli(["--db", db, "cache", "import", str(cassette)]) == 1
    assert "line 2" in capsys.readouterr().err
    import sqlite3

    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM cache").fetchone()[0] == 0  # nothing half-imported


@pytest_twisted.ensureDeferred
async def test_cache_api_counts_and_clears(start_proxy, http):
    proxy = await start_proxy()
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    await post_json(http, proxy.v1 + "/chat/completions", dict(CHAT, model="gpt-4o"))
    await stored(proxy, 2)
    await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    await eventually(lambda: proxy.service.ledger.pending == 0)
    code, info = await get_json(http, proxy.url + "/api/cache")
    assert (info["entries"], info["hits"], info["misses"], info["saved_tokens"]) == (2, 1, 2, P + C)
    assert info["bytes"] > 0 and info["saved_usd"] > 0
    response = await http.delete(proxy.url + "/api/cache?model=gpt-4o")
    assert json.loads(await response.content())["deleted"] == 1
    response = await http.delete(proxy.url + "/api/cache")
    assert json.loads(await response.content())["deleted"] == 1
    response, _ = await post_json(http, proxy.v1 + "/chat/completions", CHAT)
    assert response.headers.getRawHeaders(b"x-greyfox-cache") == [b"MISS"]


def test_stored_bodies_read_back_whatever_their_size_or_age():
    small, large = b'{"id":"x"}', b'{"content":"' + b"hello " * 400 + b'"}'
    assert unpack_body(pack_body(small)) == small
    assert unpack_body(pack_body(large)) == large
    assert len(pack_body(large)) < len(large) // 4  # compressed
    # rows written before small bodies were stored as they are: zlib throughout
    assert unpack_body(zlib.compress(small, 1)) == small


@pytest_twisted.ensureDeferred
async def test_an_answer_another_instance_recorded_is_a_hit_here_within_two_seconds(start_proxy, http, database, engine):
    if engine != "postgresql":
        pytest.skip("instances share a PostgreSQL database")
    import time

    from greyfox._cache import CacheEntry, _store_many_txn
    from greyfox._engines import Connection, engine_for

    proxy = await start_proxy()
    await sleep(0.5)  # (past the look at start: the entry must come from a later one)
    body = dict(CHAT, messages=[{"role": "user", "content": "Recorded elsewhere"}])
    answer = json.dumps({"id": "chatcmpl-elsewhere", "object": "chat.completion", "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "From the other one"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}).encode()
    now = time.time()
    entry = CacheEntry(cache_key("openai", "/chat/completions", body), SHARED, "openai", "/chat/completions",
                       "gpt-4o-mini", False, 200, "application/json", now, now, 0, 3, 4)
    other = Connection(engine_for(database))  # another instance's write to the shared database
    with other.transaction():
        _store_many_txn(other.cursor(), [(entry.row(), answer, canonical_json(body))])
    other.close()
    seen = []
    for _ in range(40):
        response, data = await post_json(http, proxy.v1 + "/chat/completions", body, {"x-greyfox-mode": "replay"})
        seen.append(response.code)
        if response.code == 200:
            break
        await sleep(0.05)
    assert response.code == 200 and json.loads(data)["choices"][0]["message"]["content"] == "From the other one"
    assert len(seen) <= 40 and proxy.upstream.received == []  # within 2 s, and never from the upstream
