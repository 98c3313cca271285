"""The floor: a relay with no GreyFox code, on the same stack (Twisted reactor, httptools).

It parses each request, forwards it on a pooled upstream connection, and
writes the answer back: nothing else.  Its CPU per request is what Python and
the reactor cost on this machine; GreyFox's own work is the difference.  The
benchmark runs it beside GreyFox, in the same invocation, so that noisy
machines compare like with like.

Usage: ``python bench/floor.py PORT UPSTREAM_PORT``.
"""

from __future__ import annotations

import sys

import httptools
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

UPSTREAM_PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 0
idle: list["Upstream"] = []


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
