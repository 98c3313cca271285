"""The floor: a relay on the card's stack with no GreyFox code.

twistd-free and minimal: one Klein route for ``/v1/*`` on twisted.web, the
upstream called with treq over a persistent pool (no cookies, no
redirects, unbuffered), the body streamed back through a push producer
registered on the client's request, so that a slow client pauses the
upstream read.  Its CPU per relayed request is what this stack costs on
this machine; GreyFox's own work is what it spends beyond that.

Usage: ``python bench/floor.py PORT UPSTREAM_PORT``.
"""

from __future__ import annotations

import sys
from http.cookiejar import CookieJar
from typing import Any

from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.server import Site
from treq.client import HTTPClient
from zope.interface import implementer


class NoCookies(CookieJar):
    def set_cookie(self, cookie: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

DROPPED = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"content-encoding", b"host",
           b"accept-encoding", b"upgrade", b"te", b"trailer", b"proxy-connection"}


@implementer(IPushProducer)
class Pump(Protocol):
    """Upstream body -> the client's request; the client's back-pressure pauses the upstream."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.done: Deferred[None] = Deferred(lambda d: self.stopProducing())

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if getattr(self.request, "channel", None) is not None:
            self.request.unregisterProducer()
        if not self.done.called:
            if reason.check(ResponseDone, PotentialDataLoss):
                self.done.callback(None)
            else:
                self.done.errback(reason)

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


class Floor:
    app = Klein()

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 32
        self.http = HTTPClient(Agent(reactor, pool=pool), cookiejar=NoCookies())

    @app.route("/v1", branch=True)
    async def relay(self, request: Any) -> bytes:
        headers = Headers({k: v for k, v in request.requestHeaders.getAllRawHeaders() if k.lower() not in DROPPED})
        try:
            response = await self.http.request(
                request.method.decode(), self.upstream + request.uri.decode()[3:], headers=headers,
                data=request.content.read(), unbuffered=True, allow_redirects=False,
            )
        except (ResponseNeverReceived, ConnectingCancelledError, CancelledError):
            if request.channel is None:  # the client left (wrk ends a turn mid-request): the call was cancelled
                return b""
            raise
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in DROPPED:
                request.responseHeaders.setRawHeaders(name, values)
        pump = Pump(request)
        response.deliverBody(pump)
        await pump.done
        return b""


def main() -> None:
    port, up_port = int(sys.argv[1]), int(sys.argv[2])
    site = Site(Floor(f"http://127.0.0.1:{up_port}/v1").app.resource())
    site.log = lambda request: None  # (GreyFox keeps no access log either)
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
