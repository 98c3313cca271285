# -*- test-case-name: tests.test_proxy -*-
"""The HTTP plumbing under the relay: upstream client and server-side site.

Both sides set TCP_NODELAY: a proxy writes a request or response in several
small writes (headers, then body), and Nagle's algorithm would hold the
second until the peer's delayed ACK, 40 ms later.

The relay calls upstreams with Twisted's ``Agent`` directly rather than
through treq: on this hot path treq's URL parsing (hyperlink, IDNA), cookie
and redirect layers cost about 1 ms of CPU per request (bench/README.md),
more than all of GreyFox's own work, and the relay needs none of them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ContentDecoderAgent, GzipDecoder, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from twisted.web.server import Request, Site
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once (no cooperator turn)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def no_delay(transport: Any) -> None:
    """Set TCP_NODELAY on the TCP transport under ``transport`` (TLS wraps it)."""
    while transport is not None:
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
            return
        transport = getattr(transport, "transport", None)


class _NoDelayEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Deferred[Any]:
        def connected(protocol: Any) -> Any:
            no_delay(protocol.transport)
            return protocol

        return self._endpoint.connect(factory).addCallback(connected)


@implementer(IAgentEndpointFactory)
class NoDelayEndpoints:
    """What ``Agent`` does by default (TLS with browser-like checks), plus TCP_NODELAY."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            endpoint = self._endpoints[key] = _NoDelayEndpoint(endpoint)
        return endpoint


class UpstreamClient:
    """Requests to upstreams over one persistent pool: no cookies, no redirects,
    no Nagle; gzip answers are decoded so the meter reads plain text."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 32
        agent = Agent.usingEndpointFactory(reactor, NoDelayEndpoints(reactor, connect_timeout), pool=self.pool)
        self._agent = ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)])

    def request(self, method: bytes, url: bytes, headers: Headers, body: bytes | None) -> Deferred[Any]:
        """Fires with the response once its headers arrived; cancelling it aborts the call."""
        return self._agent.request(method, url, headers, BytesProducer(body) if body else None)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


class LimitedRequest(Request):
    """Keeps at most ``max_body`` bytes of a request body and drops the rest,
    so an oversized upload (chunked or not) never fills memory or disk before
    the proxy answers 413.  ``body_too_large`` says it happened."""

    max_body = 10 * 1024 * 1024
    body_too_large = False
    _body_bytes = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > self.max_body:
            self.body_too_large = True
            return
        super().handleContentChunk(data)


class QuietSite(Site):
    """A Site for an API: no access-log line per request (the ledger records
    every request, with more detail, off the request path), request bodies
    capped at ``max_body`` bytes, and no HTML-form parsing of request bodies
    (twisted.web parses the Content-Type of every POST through the email
    package for it: about 0.3 ms a request)."""

    def __init__(self, resource: Any, max_body: int = LimitedRequest.max_body, v1: Any = None) -> None:
        self.v1 = v1
        factory = type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})
        try:
            super().__init__(resource, requestFactory=factory, parsePOSTFormSubmission=False)
        except TypeError:  # Twisted before the option existed
            super().__init__(resource, requestFactory=factory)

    def log(self, request: Any) -> None:
        pass

    def getResourceFor(self, request: Any) -> Any:
        """``/v1`` goes straight to the proxy's resource, everything else through the tree."""
        path = request.path
        if self.v1 is not None and (path == b"/v1" or path.startswith(b"/v1/")):
            request.site = self
            request.sitepath = list(request.prepath)
            return self.v1
        return super().getResourceFor(request)


def no_delay_listening(port: Any) -> None:
    """TCP_NODELAY on a listening TCP socket; Linux gives it to every accepted one."""
    import socket

    sock = getattr(port, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
