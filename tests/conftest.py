"""Shared fixtures: the reactor, a fake upstream, a running GreyFox, an HTTP client.

Everything listens on 127.0.0.1 port 0; nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
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


#: A PostgreSQL server the tests may create databases on (``.ci/run`` starts a throwaway one).
POSTGRES = os.environ.get("GREYFOX_TEST_POSTGRES")
#: Modules whose tests run on every engine: storage, quotas, the API and the cache.
ENGINE_MODULES = {"tests.test_store", "tests.test_ledger", "tests.test_quota", "tests.test_cache", "tests.test_copy",
                  "tests.test_leases"}


def pytest_generate_tests(metafunc: Any) -> None:
    """Tests of :data:`ENGINE_MODULES` that start a proxy run on SQLite and, when a
    server is given, on PostgreSQL; ``sqlite_only`` ones (they open the file) on SQLite."""
    if "start_proxy" not in metafunc.fixturenames and "database" not in metafunc.fixturenames:
        return
    engines = ["sqlite"]
    if POSTGRES and metafunc.module.__name__ in ENGINE_MODULES and not metafunc.definition.get_closest_marker("sqlite_only"):
        engines.append("postgresql")
    metafunc.parametrize("engine", engines, indirect=True)


@pytest.fixture
def engine(request: Any) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def database(engine: str, tmp_path: Any) -> Any:
    """The GREYFOX_DB of a fresh database on ``engine``, dropped after the test."""
    if engine == "sqlite":
        yield str(tmp_path / "greyfox.db")
        return
    import uuid

    import psycopg

    name = "greyfox_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def start_proxy(tmp_path: Any, upstream: fakeupstream.FakeUpstream, database: str, engine: str) -> Any:
    """``await start_proxy(GREYFOX_X="...")`` starts a GreyFox in this process, on
    the test's :func:`database` unless ``db`` names a SQLite file of its own."""
    started: list[Running] = []

    async def start(options: dict[str, Any] | None = None, db: str | None = None, **env: str) -> Running:
        if db is not None and engine == "postgresql":
            pytest.skip("uses a SQLite file of its own")
        environ = proxy_env(upstream.url, **env)
        opts = {"listen": "tcp:0:interface=127.0.0.1", "db": db or database}
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
