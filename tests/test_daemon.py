"""The real daemon: ``twistd -n greyfox`` as a user starts it, after ``pip install``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from typing import Any

import openai
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from . import fakeupstream
from .conftest import PROXY_KEY, eventually, in_thread, post_json, proxy_env, sleep
from .fuzz import free_port

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}


def test_twistd_lists_the_plugin():
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, check=True).stdout
    assert "greyfox" in out


@pytest.mark.parametrize(
    "args, env, named",
    [
        ([], {"GREYFOX_DAILY_TOKENS": "lots"}, "GREYFOX_DAILY_TOKENS"),
        (["--mode", "yolo"], {}, "--mode"),
        (["--config", "/nonexistent/greyfox.toml"], {}, "GREYFOX_CONFIG"),
        (["--listen", "carrier-pigeon:1"], {}, "--listen"),
    ],
)
def test_bad_setting_stops_the_start_with_one_line(tmp_path, args, env, named):
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "greyfox", "--db", str(tmp_path / "g.db"), *args],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, **env), cwd=tmp_path,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


class Daemon:
    def __init__(self, tmp_path: Any, upstream: fakeupstream.FakeUpstream, file_size_limit: int | None = None,
                 db: str | None = None, **env: str) -> None:
        """:param file_size_limit: the largest file the daemon may write (RLIMIT_FSIZE): a disk that fills up.
        :param db: its ``GREYFOX_DB`` (default: a SQLite file of the test's)."""
        self.port = free_port()
        self.db = db or str(tmp_path / "daemon" / "greyfox.db")
        self.log = open(tmp_path / "twistd.log", "a+")  # (a restarted daemon writes after the first)
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "greyfox", "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--db", self.db],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=dict({k: v for k, v in os.environ.items() if not k.startswith(("GREYFOX_", "OPENAI_"))}, **proxy_env(upstream.url, **env)),
            preexec_fn=None if file_size_limit is None else lambda: _limit_file_size(file_size_limit),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, http: Any) -> None:
        async def up() -> bool:
            try:
                response = await http.get(self.url + "/healthz")
                await response.content()
                return response.code == 200
            except Exception:
                return False

        for _ in range(200):
            if self.proc.poll() is not None:
                raise AssertionError(self.output())
            if await up():
                return
            await sleep(0.05)
        raise AssertionError("daemon did not come up: " + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    async def exit_code(self, timeout: float = 30) -> int:
        """After a clean shutdown on SIGTERM twistd re-raises the signal: -15 is a clean exit."""
        await eventually(lambda: self.proc.poll() is not None, timeout=timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _limit_file_size(size: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))  # (Python ignores SIGXFSZ: writes fail with EFBIG)


@pytest.fixture
def daemon(tmp_path, upstream):
    started = []

    def start(file_size_limit: int | None = None, db: str | None = None, **env: str) -> Daemon:
        d = Daemon(tmp_path, upstream, file_size_limit, db, **env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest_twisted.ensureDeferred
async def test_daemon_streams_a_chat_completion_through_the_sdk(daemon, upstream, http):
    d = daemon()
    await d.ready(http)

    def call() -> str:
        client = openai.OpenAI(base_url=d.url + "/v1", api_key="sk-whatever", max_retries=0)
        stream = client.chat.completions.create(**CHAT, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await in_thread(call) == fakeupstream.REPLY
    assert upstream.received[0].header("authorization") == f"Bearer {PROXY_KEY}"
    response = await http.get(d.url + "/")
    assert b"GreyFox" in await response.content()
    d.proc.send_signal(signal.SIGTERM)
    assert await d.exit_code() in (0, -signal.SIGTERM), d.output()
    assert PROXY_KEY not in d.output()


@pytest_twisted.ensureDeferred
async def test_sigterm_under_load_loses_no_answered_request(daemon, upstream, http):
    d = daemon()
    await d.ready(http)
    upstream.delay = 0.3  # keep requests in flight when the signal lands

    async def one(i: int) -> int | None:
        try:
            response, body = await post_json(http, d.url + "/v1/chat/completions", CHAT, {"x-app-user-id": f"load{i}"})
        except Exception:
            return None  # refused or cut by the shutdown: not answered
        if response.code == 200 and json.loads(body).get("choices"):
            return int(response.headers.getRawHeaders(b"x-greyfox-request-id")[0])
        return None

    calls = [Deferred.fromCoroutine(one(i)) for i in range(60)]
    await sleep(0.15)
    d.proc.send_signal(signal.SIGTERM)
    results = await DeferredList(calls)
    assert await d.exit_code() in (0, -signal.SIGTERM), d.output()
    answered = {r for ok, r in results if ok and r is not None}
    assert "in-flight requests" in d.output(), "the signal landed with nothing in flight: the test proved nothing"
    assert answered, "no request was answered before the shutdown"
    conn = sqlite3.connect(d.db)
    recorded = {row[0] for row in conn.execute("SELECT id FROM ledger WHERE status = 200")}
    conn.close()
    assert answered <= recorded


def dockerfile() -> tuple[list[str], dict[str, str]]:
    """The Dockerfile's CMD and ENV, so the test runs what the container runs."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "Dockerfile")
    if not os.path.exists(path):
        pytest.skip("Dockerfile not shipped with this install")
    text = open(path).read().replace("\\\n", " ")
    cmd: list[str] = []
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CMD "):
            cmd = json.loads(line[4:])
        elif line.startswith("ENV "):
            for pair in line[4:].split():
                key, _, value = pair.partition("=")
                env[key] = value
    return cmd, env


@pytest_twisted.ensureDeferred
async def test_the_docker_command_starts_and_uses_the_database_volume(tmp_path, upstream, http):
    cmd, env = dockerfile()
    assert cmd[:2] == ["twistd", "-n"] and "greyfox" in cmd
    assert env["GREYFOX_DB"] == "/app/database/greyfox.db"
    assert env["GREYFOX_LISTEN"] == "tcp:8080"  # all interfaces inside the container
    port = free_port()
    # Same command and settings; only the paths and port are moved to this sandbox.
    env = dict(env, GREYFOX_DB=str(tmp_path / "database" / "greyfox.db"), GREYFOX_LISTEN=f"tcp:{port}:interface=127.0.0.1")
    full_env = dict({k: v for k, v in os.environ.items() if not k.startswith(("GREYFOX_", "OPENAI_"))}, **proxy_env(upstream.url), **env)
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), cmd[0]), *cmd[1:]], env=full_env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                response = await http.get(f"http://127.0.0.1:{port}/healthz")
                await response.content()
                if response.code == 200:
                    break
            except Exception:
                await sleep(0.05)
        else:
            raise AssertionError("container command did not come up")
        assert (tmp_path / "database" / "greyfox.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


#: The upstream fault table, against the real daemon: (fake model, stream, the status
#: the client sees, whether its body ends cleanly, what the ledger row's error says).
FAULTS = [
    ("fail-500", False, 500, True, None),
    ("fail-429", False, 429, True, None),
    ("hang", False, 504, True, "GREYFOX_READ_TIMEOUT"),
    ("truncate", False, 200, False, "upstream dropped"),
    ("bad-gzip", False, 502, True, "upstream dropped"),
    ("drop-after-2", True, 200, False, "upstream dropped"),
    ("stall-after-2", True, 200, False, "GREYFOX_STREAM_IDLE_TIMEOUT"),
    ("reset", False, 502, True, "unreachable"),
    ("garbage", False, 502, True, "unreachable"),
    ("invalid-json", False, 200, True, None),  # relayed as it came; never cached
    ("big-20", True, 200, True, None),  # 20 MiB relayed through, too big to cache
]


@pytest.mark.parametrize("model, stream, status, clean, error", FAULTS, ids=[f[0] for f in FAULTS])
@pytest_twisted.ensureDeferred
async def test_upstream_faults_end_to_end(daemon, upstream, http, model, stream, status, clean, error):
    d = daemon(GREYFOX_READ_TIMEOUT="0.5", GREYFOX_STREAM_IDLE_TIMEOUT="0.5")
    await d.ready(http)
    response = await http.post(d.url + "/v1/chat/completions", data=json.dumps(dict(CHAT, model=model, stream=stream)).encode(),
                               headers={b"content-type": [b"application/json"]})
    assert response.code == status
    ended: list[Any] = []
    await response.collect(lambda data: None).addBoth(ended.append)
    assert (ended == [None]) is clean, ended
    rows: list[Any] = []
    for _ in range(100):  # (an answer without usage waits for the tokenizers, loaded on first need, to be counted)
        rows = json.loads(await (await http.get(d.url + "/api/requests")).content())["requests"]
        if rows:
            break
        await sleep(0.05)
    assert [r["status"] for r in rows] == [status]
    assert (error is None and rows[0]["error"] is None) or error in (rows[0]["error"] or ""), rows[0]
    cache = json.loads(await (await http.get(d.url + "/api/cache")).content())
    assert cache["entries"] == 0  # nothing broken is stored
    response, _ = await post_json(http, d.url + "/v1/chat/completions", CHAT)
    assert response.code == 200  # and the daemon serves on
    health = await http.get(d.url + "/healthz")
    assert health.code == 200
    await health.content()
    assert "Traceback" not in d.output(), d.output()


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_refuses_connections_is_a_502(tmp_path, upstream, http):
    closed = free_port()  # (nothing listens there)
    d = Daemon(tmp_path, upstream, OPENAI_BASE_URL=f"http://127.0.0.1:{closed}/v1")
    try:
        await d.ready(http)
        response, body = await post_json(http, d.url + "/v1/chat/completions", CHAT)
        error = json.loads(body)["error"]
        assert response.code == 502 and error["code"] == "upstream_unreachable" and "refused" in error["message"]
        assert "Traceback" not in d.output()
    finally:
        d.kill()


async def raw_exchange(d: Daemon, data: bytes, hang_up_after: float | None = None) -> bytes:
    """Send ``data`` on a fresh connection; read until the daemon closes it, or hang up after a while."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from .test_proxy import RawClient

    client = RawClient(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", d.port), client)
    if hang_up_after is not None:
        await sleep(hang_up_after)
        client.transport.abortConnection()
    await client.closed
    return client.received


def head(body: bytes, path: bytes = b"/v1/chat/completions", extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: %d\r\n\r\n" % len(body))


@pytest_twisted.ensureDeferred
async def test_clients_hanging_up_at_every_stage_leave_the_daemon_serving_and_the_books_right(daemon, upstream, http):
    d = daemon(GREYFOX_READ_TIMEOUT="30")
    await d.ready(http)
    hang = json.dumps(dict(CHAT, model="hang")).encode()
    big = json.dumps(dict(CHAT, model="big-20", stream=True)).encode()  # (seconds to relay: cut well before its end)
    await raw_exchange(d, b"POST /v1/chat/compl", hang_up_after=0.1)  # mid head
    await raw_exchange(d, head(hang)[:-2], hang_up_after=0.1)  # head without its blank line
    await raw_exchange(d, head(hang) + hang[:10], hang_up_after=0.1)  # mid body
    await raw_exchange(d, head(hang) + hang, hang_up_after=0.3)  # waiting for the upstream
    received = await raw_exchange(d, head(big) + big, hang_up_after=0.3)  # mid stream
    assert received.startswith(b"HTTP/1.1 200")
    response, body = await post_json(http, d.url + "/v1/chat/completions", CHAT)
    assert response.code == 200
    rows: list[Any] = []
    for _ in range(100):
        rows = json.loads(await (await http.get(d.url + "/api/requests")).content())["requests"]
        if len(rows) == 3:
            break
        await sleep(0.05)
    assert sorted(r["status"] for r in rows) == [200, 499, 499]  # only requests that arrived whole are rows
    assert all(r["error"] == "client disconnected" for r in rows if r["status"] == 499)
    assert "Traceback" not in d.output(), d.output()


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(daemon, upstream, http):
    d = daemon()
    await d.ready(http)
    bodies = [json.dumps(dict(CHAT, seed=i)).encode() for i in range(3)]
    pipelined = b"".join(head(b) + b for b in bodies[:2]) + head(bodies[2], extra=b"Connection: close\r\n") + bodies[2]
    received = await raw_exchange(d, pipelined)
    assert received.count(b"HTTP/1.1 200 OK") == 3
    ids = [int(line.split(b":")[1]) for line in received.split(b"\r\n") if line.lower().startswith(b"x-greyfox-request-id")]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [r.body["seed"] for r in upstream.received] == [0, 1, 2]


@pytest_twisted.ensureDeferred
async def test_a_database_locked_by_another_process_degrades_the_daemon_and_it_recovers(daemon, upstream, http):
    d = daemon()
    await d.ready(http)

    async def health() -> int:
        response = await http.get(d.url + "/healthz")
        await response.content()
        return response.code

    locker = sqlite3.connect(d.db, timeout=0, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(5):
            response, _ = await post_json(http, d.url + "/v1/chat/completions", dict(CHAT, seed=i))
            assert response.code == 200  # answered while the ledger cannot write
        for _ in range(100):
            if await health() == 503:
                break
            await sleep(0.05)
        assert await health() == 503
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    for _ in range(200):
        if await health() == 200:
            break
        await sleep(0.05)
    assert await health() == 200
    rows = json.loads(await (await http.get(d.url + "/api/requests")).content())["requests"]
    assert len(rows) == 5 and all(r["status"] == 200 for r in rows)  # nothing lost


@pytest_twisted.ensureDeferred
async def test_kill_9_loses_nothing_flushed_and_no_request_id_is_reused(daemon, upstream, http):
    d = daemon()
    await d.ready(http)
    given = []
    for i in range(10):
        response, _ = await post_json(http, d.url + "/v1/chat/completions", dict(CHAT, seed=i))
        given.append(int(response.headers.getRawHeaders(b"x-greyfox-request-id")[0]))
    await sleep(0.5)  # past the 100 ms flush window
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    again = daemon()  # (on the same database)
    await again.ready(http)
    rows = json.loads(await (await http.get(again.url + "/api/requests")).content())["requests"]
    assert sorted(r["id"] for r in rows) == given
    response, _ = await post_json(http, again.url + "/v1/chat/completions", dict(CHAT, seed=99))
    assert int(response.headers.getRawHeaders(b"x-greyfox-request-id")[0]) > max(given)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_degrades_the_daemon_and_loses_no_row(daemon, upstream, http):
    d = daemon(file_size_limit=320 * 1024)  # the database's files may not grow past 320 KiB
    await d.ready(http)
    answered = 0
    for i in range(60):
        response, _ = await post_json(http, d.url + "/v1/chat/completions", dict(CHAT, seed=i))
        assert response.code == 200  # answered whatever the disk says
        answered += 1
        health = await http.get(d.url + "/healthz")
        await health.content()
        if health.code == 503:
            break
        await sleep(0.12)  # (a commit each: the write-ahead log grows)
    assert health.code == 503, d.output()
    d.proc.send_signal(signal.SIGTERM)
    assert await d.exit_code() in (0, -signal.SIGTERM), d.output()
    assert "Traceback" not in d.output(), d.output()
    again = daemon()  # the disk has room again: the rows kept aside go in
    await again.ready(http)
    rows = json.loads(await (await http.get(again.url + "/api/requests?limit=500")).content())["requests"]
    assert len(rows) == answered
