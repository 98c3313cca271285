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
    def __init__(self, tmp_path: Any, upstream: fakeupstream.FakeUpstream, **env: str) -> None:
        self.port = free_port()
        self.db = str(tmp_path / "daemon" / "greyfox.db")
        self.log = open(tmp_path / "twistd.log", "w+")
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "greyfox", "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--db", self.db],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=dict({k: v for k, v in os.environ.items() if not k.startswith(("GREYFOX_", "OPENAI_"))}, **proxy_env(upstream.url, **env)),
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


@pytest.fixture
def daemon(tmp_path, upstream):
    started = []

    def start(**env: str) -> Daemon:
        d = Daemon(tmp_path, upstream, **env)
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
