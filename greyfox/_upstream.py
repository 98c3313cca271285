# -*- test-case-name: tests.test_upstream -*-
"""How GreyFox calls upstreams: treq over one persistent connection pool.

One :class:`UpstreamClient` per service.  It owns the
``HTTPConnectionPool`` (closed in ``stopService``), keeps no cookies and
follows no redirects: an upstream's ``Set-Cookie`` must never reach another
client's request, and a redirect must never carry GreyFox's key elsewhere.
Responses come back unbuffered, so the relay reads the body with its own
push-producer protocol.  No gzip is asked for (treq would ask for it on
every request: :class:`_PlainAgent` takes the header out again); a body an
upstream gzips all the same is decoded, and one that does not decode ends
as a failed response, never as a short complete one.
"""

from __future__ import annotations

from http.cookiejar import CookieJar
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from treq.client import HTTPClient
from zope.interface import implementer

log = Logger()

#: Idle connections kept per upstream origin (twisted.web's default of 2 makes
#: a busy proxy open and close connections all the time).
MAX_IDLE_PER_ORIGIN = 32
#: An idle connection older than this is closed rather than reused: servers
#: drop idle keep-alive connections (nginx after 75 s), and a request written
#: into one that is closing fails for nothing.
MAX_IDLE_SECONDS = 50


class NoCookies(CookieJar):
    """A cookie jar that keeps nothing and sends nothing."""

    def set_cookie(self, cookie: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def add_cookie_header(self, request: Any) -> None:
        pass


@implementer(IStreamClientEndpoint)
class _NoDelay:
    """An endpoint whose connections send small writes at once (TCP_NODELAY):
    a request's head and body go out as separate writes, and Nagle's
    algorithm would hold the body until the upstream's delayed ACK."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Deferred[Any]:
        return self._endpoint.connect(factory).addCallback(_no_delay)


def _no_delay(protocol: Any) -> Any:
    transport = protocol.transport
    while transport is not None:  # (TLS wraps the TCP transport)
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
            break
        transport = getattr(transport, "transport", None)
    return protocol


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """TCP or TLS (certificate and host name checked, as a browser does) by URL scheme."""

    def __init__(self, reactor: Any, connect_timeout: float, trust_root: Any = None) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS(trust_root)

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("idna")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        endpoint: Any = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return _NoDelay(endpoint)


@implementer(IAgent)
class _PlainAgent:
    """The agent under treq: sends no ``Accept-Encoding``, and fails a body its
    protocol cannot take (treq's gzip decoder raises; the HTTP client would
    otherwise end the body as complete)."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None) -> Any:
        if headers is not None:
            headers = headers.copy()
            headers.removeHeader(b"accept-encoding")
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(_GuardedResponse)


class _GuardedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    def deliverBody(self, protocol: Any) -> None:
        self.original.deliverBody(_Guard(protocol))


class _Guard(proxyForInterface(IProtocol)):  # type: ignore[misc]
    """A body protocol whose ``dataReceived`` may raise: the body then stops
    and ends in :class:`ResponseFailed` with the error.  A decoder's failure
    (``ResponseFailed``) is the upstream's fault; anything else is a bug in
    the relay, and is logged as one."""

    _failed: Failure | None = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.original.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._failed is not None:
            return
        try:
            self.original.dataReceived(data)
        except Exception:
            self._failed = Failure()
            if not self._failed.check(ResponseFailed):
                log.failure("relaying an upstream body failed", self._failed)
            self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:
        if self._failed is not None:
            reason = Failure(ResponseFailed([self._failed]))
        self.original.connectionLost(reason)


class UpstreamClient:
    """Calls upstreams; :meth:`close` when the service stops.

    :param trust_root: certificates HTTPS upstreams are checked against
        (the platform's trust store when ``None``).
    """

    def __init__(self, reactor: Any, connect_timeout: float, trust_root: Any = None) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = MAX_IDLE_PER_ORIGIN
        self.pool.cachedConnectionTimeout = MAX_IDLE_SECONDS
        agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, connect_timeout, trust_root), pool=self.pool)
        self._treq = HTTPClient(_PlainAgent(agent), cookiejar=NoCookies())

    def request(self, method: str, url: bytes, headers: Headers, body: bytes | None) -> Deferred[IResponse]:
        """Send one request; fires with the response once its headers came.

        Cancelling it before then aborts the call.
        """
        return self._treq.request(method, url, headers=headers, data=body, unbuffered=True, allow_redirects=False)

    def close(self) -> Deferred[Any]:
        """Close the idle connections (busy ones end with their calls)."""
        return self.pool.closeCachedConnections()
