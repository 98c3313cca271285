"""Shared fixtures: the reactor, a fake upstream, a running GreyFox, an HTTP client.

Everything listens on 127.0.0.1 port 0; nothing leaves the machine.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import attr
import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from greyfox._config import load_settings
from greyfox.service import GreyFoxService

from . import fakeupstream

PROXY_KEY = "sk-proxy-openai-key-0000"
DEEPSEEK_KEY = "sk-proxy-deepseek-key-1111"
ANTHROPIC_KEY = "sk-ant-proxy-key-2222"


@pytest.fixture
def reactor() -> Any:
    return global_reactor


@pytest.fixture(autouse=True)
def observe_errors() -> Any:
    """Fail the test if anything is logged as a failure (pytest would not notice)."""
    errors: list[Any] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    yield errors
    globalLogPublisher.removeObserver(observer)
    assert not errors, [e.get("log_failure") or e.get("log_format") for e in errors]


@pytest_twisted.async_yield_fixture
async def upstream() -> AsyncIterator[fakeupstream.FakeUpstream]:
    fake = fakeupstream.start()
    yield fake
    await fake.port.stopListening()


@attr.s(auto_attribs=True)
class Running:
    service: GreyFoxService
    upstream: fakeupstream.FakeUpstream

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port.getHost().port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    async def stop(self) -> None:
        if self.service.running:
            await self.service.stopService()


def proxy_env(upstream_url: str, **extra: str) -> dict[str, str]:
    env = {
        "OPENAI_BASE_URL": f"{upstream_url}/openai/v1",
        "OPENAI_API_KEY": PROXY_KEY,
        "DEEPSEEK_BASE_URL": f"{upstream_url}/deepseek/v1",
        "DEEPSEEK_API_KEY": DEEPSEEK_KEY,
        "OPENROUTER_BASE_URL": f"{upstream_url}/openrouter/v1",
        "ANTHROPIC_BASE_URL": f"{upstream_url}/anthropic",
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
    }
    env.update(extra)
    return env


@pytest.fixture
def start_proxy(tmp_path: Any, upstream: fakeupstream.FakeUpstream) -> Any:
    """``await start_proxy(GREYFOX_X="...")`` starts a GreyFox in this process."""
    started: list[Running] = []

    async def start(options: dict[str, Any] | None = None, db: str | None = None, **env: str) -> Running:
        environ = proxy_env(upstream.url, **env)
        opts = {"listen": "tcp:0:interface=127.0.0.1", "db": db or str(tmp_path / "greyfox.db")}
        opts.update(options or {})
        settings = load_settings(opts, environ)
        service = GreyFoxService(settings, global_reactor)
        service.startService()
        running = Running(service, upstream)
        started.append(running)
        return running

    yield start
    for running in started:
        pytest_twisted.blockon(Deferred.fromCoroutine(running.stop()))


@pytest.fixture
def http() -> Any:
    """A treq client with its own pool, closed after the test."""
    pool = HTTPConnectionPool(global_reactor, persistent=False)
    client = HTTPClient(Agent(global_reactor, pool=pool))
    yield client
    pytest_twisted.blockon(pool.closeCachedConnections())


async def post_json(http: Any, url: str, doc: Any, headers: dict[str, Any] | None = None) -> tuple[Any, bytes]:
    hdrs = {b"content-type": [b"application/json"]}
    for k, v in (headers or {}).items():
        hdrs[k.encode() if isinstance(k, str) else k] = [v.encode() if isinstance(v, str) else v]
    response = await http.request("POST", url, data=json.dumps(doc).encode(), headers=hdrs)
    body = await response.content()
    return response, body


async def sleep(seconds: float) -> None:
    await deferLater(global_reactor, seconds, lambda: None)


async def eventually(check: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Wait until ``check()`` is true; fail after ``timeout`` seconds."""
    waited = 0.0
    while not check():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await sleep(interval)
        waited += interval


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    """Run a blocking client (the openai SDK) off the reactor thread."""
    from twisted.internet.threads import deferToThread

    return deferToThread(fn, *args, **kwargs)


def threads_counting(running: Running) -> list[int]:
    """Spy on the proxy's ``run_in_thread``: the ids of the threads its work ran in, in order."""
    import threading

    threads: list[int] = []
    run = running.service.proxy.run_in_thread

    def spy(f: Any, *args: Any) -> Any:
        def counting(*a: Any) -> Any:
            threads.append(threading.get_ident())
            return f(*a)

        return run(counting, *args)

    running.service.proxy.run_in_thread = spy
    return threads
