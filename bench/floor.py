"""The floor: a relay with no GreyFox code, on the same stack (Twisted reactor, httptools).

It parses each request, forwards it on a pooled upstream connection, and
writes the answer back: nothing else.  Its CPU per request is what Python and
the reactor cost on this machine; GreyFox's own work is the difference.  The
benchmark runs it beside GreyFox, in the same invocation, so that noisy
machines compare like with like.

With ``WORK_US``, it also computes for that many microseconds a request
(half on the request, half on the answer; a fixed amount of Python, timed
once at start): the benchmark gives it GreyFox's CPU per request, to see
what this machine does to a relay that works that much, GreyFox or not.

Usage: ``python bench/floor.py PORT UPSTREAM_PORT [WORK_US]``.
"""

from __future__ import annotations

import sys
import time

import httptools
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

UPSTREAM_PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 0
WORK_US = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
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
        work()
        idle.append(self)
        self.client.answer(self.parser.get_status_code(), b"".join(self.parts))


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
        if idle:
            idle.pop().send(self, body)
        else:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", UPSTREAM_PORT)
            endpoint.connect(Factory.forProtocol(Upstream)).addCallback(lambda up: up.send(self, body))

    def answer(self, status: int, body: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
        )


if __name__ == "__main__":
    reactor.listenTCP(int(sys.argv[1]), Factory.forProtocol(Client), interface="127.0.0.1")
    reactor.run()
