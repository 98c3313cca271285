"""The floor: a relay with no GreyFox code, on the same stack (Twisted reactor, httptools).

It parses each request, forwards it on a pooled upstream connection, and
writes the answer back: nothing else.  Its CPU per request is what Python and
the reactor cost on this machine; GreyFox's own work is the difference.  The
benchmark runs it beside GreyFox, in the same invocation, so that noisy
machines compare like with like.

With ``WORK_US``, it also computes for that many microseconds a request
(half on the request, half on the answer; a fixed amount of Python, timed
once at start): the benchmark runs it at 0 to 300 us a request, to see
what this machine does to a relay by how much it works, GreyFox or not.

With ``core`` instead, it also does the core computations of a
metered, cached relay, with GreyFox's own pure functions and nothing around
them: parse the request's JSON, its cache key, look it up, estimate its
prompt tokens (tiktoken) and reserve them; parse the answer's JSON and
usage, settle, price, build the ledger row (batched in memory; no database)
and index the answer.  Not done: headers (GreyFox's own, and the filtering
of those it relays), the rate, loop and budget checks, metrics, timeouts,
coalescing, a pipeline that also streams, and the database writes.  What
GreyFox spends over this is those and the objects and calls that carry a
request through them.

With ``WORK_US/now`` the answer is sent at once, as GreyFox sends
(``greyfox/_transport.py``), rather than at the reactor's next poll of the
socket.  With ``WORK_US/idle`` it is sent at once too, and the answer's half
of the work runs after it, deferred until the reactor has served every
ready socket, as a proxy would move its bookkeeping out of the way.
With ``core+WORK_US``, the core computations and that much work besides.
``bench/think_turns.py`` runs these beside GreyFox at the model-like load.

Usage: ``python bench/floor.py PORT UPSTREAM_PORT [WORK_US[/now|/idle] | core[+WORK_US]]``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import httptools
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from greyfox._transport import write_now  # noqa: E402

UPSTREAM_PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 0
_spec = sys.argv[3] if len(sys.argv) > 3 else "0"
CORE = _spec.startswith("core")
_spec = _spec[len("core"):].lstrip("+") if CORE else _spec
_spec, _, _how = _spec.partition("/")
DEFER = _how == "idle"  # the answer's half after the answer is sent, at the reactor's next pass
SEND_NOW = _how in ("idle", "now")  # the answer sent at once (greyfox/_transport.py), not at the next poll
WORK_US = float(_spec or 0)
idle: list["Upstream"] = []

_DATA = [{"n": i, "s": str(i)} for i in range(256)]


def _unit() -> int:
    """A little dictionary and string work, as a proxy's Python does."""
    total = 0
    for d in _DATA:
        total += len(d) + len(d["s"])
    return total


def _units_for(us: float) -> int:
    """How many units take ``us`` microseconds here (the median of several timings)."""
    if us <= 0:
        return 0
    timings = []
    for _ in range(21):
        start = time.perf_counter()
        for _ in range(50):
            _unit()
        timings.append((time.perf_counter() - start) / 50)
    return max(1, round(us / 1e6 / sorted(timings)[10]))


UNITS = _units_for(WORK_US / 2)


def work() -> None:
    for _ in range(UNITS):
        _unit()


_deferred: list[Callable[[], None]] = []


def when_idle(f: Callable[[], None]) -> None:
    """Run ``f`` once the reactor has polled: one deferred job a pass, so
    that every ready socket is served before it (``/idle``)."""
    _deferred.append(f)
    if len(_deferred) == 1:
        reactor.callLater(0, _run_deferred)


def _run_deferred() -> None:
    _deferred.pop(0)()
    if _deferred:
        reactor.callLater(0, _run_deferred)


class Core:
    """The core computations of a relayed cache miss, as GreyFox makes them (see the module's docstring)."""

    def __init__(self) -> None:
        import tempfile

        from greyfox import _cachekey, _json, _pricing, _proxy, _tokens, _usage

        self.loads, self.cache_key, self.usage_of = _json.loads, _cachekey.cache_key, _usage.usage_of
        self.estimate, self.max_output = _tokens.estimate_prompt_tokens, _proxy._max_output
        self.encodings = _tokens.load_encodings(tempfile.mkdtemp(prefix="floor-tiktoken-"))
        self.encoding_name_for = _tokens.encoding_name_for
        self.prices = _pricing.PriceTable.shipped()
        self.index: dict[str, tuple[bytes, float]] = {}
        self.reserved: dict[str, int] = {}
        self.used: dict[str, int] = {}
        self.rows: list[tuple] = []
        self.last_id = 0
        self.day = time.strftime("%Y-%m-%d")  # (GreyFox's quota clock gives each row its day)

    def request(self, body: bytes) -> tuple:
        doc = self.loads(body)
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("no model")
        key = self.cache_key("openai", "/chat/completions", doc)
        if key in self.index:
            raise ValueError("a hit: the benchmark's bodies are unique")
        enc = self.encodings[self.encoding_name_for(model)]
        tokens = self.estimate(enc, doc) + self.max_output(doc, b"/chat/completions", 4096)  # (GreyFox's default)
        self.reserved["bench"] = self.reserved.get("bench", 0) + tokens
        self.last_id += 1
        return (self.last_id, time.time(), model, key, tokens)

    def answer(self, call: tuple, body: bytes) -> None:
        call_id, started, model, key, tokens = call
        usage = self.usage_of(self.loads(body))
        total = usage.total_tokens if usage is not None else 0
        self.reserved["bench"] -= tokens
        self.used["bench"] = self.used.get("bench", 0) + total
        cost = self.prices.cost(model, usage) if usage is not None else None
        now = time.time()
        self.rows.append((
            call_id, started, self.day, "bench", "/chat/completions", "openai", model, False, 200,
            usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, 0, total, cost,
            "MISS", 0, 0.0, round((now - started) * 1000, 3), 0.0, "upstream", None,
        ))
        if len(self.rows) >= 500:
            self.rows.clear()
        self.index[key] = (body, now)


core = Core() if CORE else None


class Upstream(Protocol):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.parser = httptools.HttpResponseParser(self)

    def send(self, client: "Client", body: bytes) -> None:
        self.client = client
        self.parts: list[bytes] = []
        self.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, data: bytes) -> None:
        self.parts.append(data)

    def on_message_complete(self) -> None:
        if not DEFER:
            work()
        idle.append(self)
        body = b"".join(self.parts)
        self.client.answer(self.parser.get_status_code(), body)
        if DEFER:
            when_idle(work)
        if core is not None:
            core.answer(self.client.call, body)


class Client(Protocol):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.parser = httptools.HttpRequestParser(self)
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, data: bytes) -> None:
        self.parts.append(data)

    def on_message_complete(self) -> None:
        work()
        body, self.parts = b"".join(self.parts), []
        if core is not None:
            self.call = core.request(body)
        if idle:
            idle.pop().send(self, body)
        else:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", UPSTREAM_PORT)
            endpoint.connect(Factory.forProtocol(Upstream)).addCallback(lambda up: up.send(self, body))

    def answer(self, status: int, body: bytes) -> None:
        data = b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
        if SEND_NOW:
            write_now(self.transport, data)
        else:
            self.transport.write(data)


if __name__ == "__main__":
    reactor.listenTCP(int(sys.argv[1]), Factory.forProtocol(Client), interface="127.0.0.1")
    reactor.run()
