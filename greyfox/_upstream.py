# -*- test-case-name: tests.test_upstream -*-
"""The HTTP/1.1 client GreyFox calls upstreams with: httptools parsing, a keep-alive pool.

Why not ``Agent`` (or treq on top of it): a relay on twisted.web and
``Agent`` costs 0.76 ms of CPU per request with no GreyFox code at all, the
same relay on httptools 0.1 ms (bench/README.md); ``Agent``'s share is its
URL objects, ``Headers`` and a state machine of Deferreds per response.  The relay needs one thing: send a request on a pooled
connection, hand the response's headers over, then pump its body with
back-pressure.  The response looks like ``IResponse`` where the relay reads
it (``code``, ``headers``, ``deliverBody``) and the body protocol sees the
same endings as with ``Agent`` (``ResponseDone``, ``PotentialDataLoss``,
``ResponseFailed``, defined here).  No cookies, no redirects, gzip decoded,
TCP_NODELAY; HTTPS checks certificates and host names against the
platform's trust store.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Any, Callable, Iterable

import httptools
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._transport import write_now
from ._wire import Fields, RawHeaders, add_field, encode_fields

log = Logger()

#: Idle connections kept per upstream origin.
MAX_IDLE_PER_ORIGIN = 32
#: An idle connection older than this is closed rather than reused: servers
#: drop idle keep-alive connections (nginx after 75 s), and a request written
#: into one that is closing fails for nothing.
MAX_IDLE_SECONDS = 50.0

Origin = tuple[bytes, bytes, int]  # scheme, host, port
#: Told of an upstream call's response once its headers came, or of its Failure.
Then = Callable[[Any], None]


# How a body ends, as its protocol's connectionLost hears it: the same names
# and shapes as twisted.web.client's, without loading Agent.


class ResponseDone(Exception):
    """The body is complete, as its framing said."""


class PotentialDataLoss(Exception):
    """The body ended with the connection, as a response without a length does."""


class ResponseFailed(Exception):
    """The answer broke off; ``reasons`` holds the Failures that ended it."""

    def __init__(self, reasons: list[Failure]) -> None:
        super().__init__(reasons)
        self.reasons = reasons


class ResponseNeverReceived(ResponseFailed):
    """The connection failed before the response headers."""


#: How a complete body ends, made once: a Failure per response showed in the profile.
_DONE = Failure(ResponseDone())


@lru_cache(maxsize=1024)  # a proxy calls the same few URLs over and over
def split_url(url: bytes) -> tuple[Origin, bytes]:
    """``https://h:1/p?q`` -> ((b"https", b"h", 1), b"/p?q")."""
    parsed = httptools.parse_url(url)
    scheme = (parsed.schema or b"http").lower()
    port = parsed.port or (443 if scheme == b"https" else 80)
    target = parsed.path or b"/"
    if parsed.query:
        target += b"?" + parsed.query
    host = parsed.host or b""
    if host.startswith(b"[") and host.endswith(b"]"):
        host = host[1:-1]
    return (scheme, host, port), target


@lru_cache(maxsize=256)
def host_header(origin: Origin) -> bytes:
    scheme, host, port = origin
    if b":" in host:
        host = b"[" + host + b"]"
    default = 443 if scheme == b"https" else 80
    return host if port == default else host + b":%d" % port


class UpstreamResponse:
    """An upstream's answer once its headers arrived; the body follows through
    :meth:`deliverBody`, as with ``IResponse``.

    It is also the body protocol's transport (pause, resume, stop) until the
    body ends; after that the connection may carry another request, and
    nothing done here reaches it.
    """

    def __init__(self, connection: "_Connection", code: int, headers: RawHeaders) -> None:
        self._connection: _Connection | None = connection
        self.code = code
        self.headers = headers
        self._protocol: Any = None
        self._early: list[bytes] = []  # body bytes that came before deliverBody
        self._ending: Failure | None = None  # how the body ended, if before deliverBody

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        protocol.makeConnection(self)
        early, self._early = self._early, []
        for data in early:
            if self._protocol is not protocol:
                return
            protocol.dataReceived(data)
        if self._ending is not None and self._protocol is protocol:
            self._protocol = None
            protocol.connectionLost(self._ending)

    # -- the body protocol's transport --

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume()

    def stopProducing(self) -> None:
        if self._connection is not None:
            self._connection.abort()

    # -- from the connection --

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        else:
            self._early.append(data)

    def _end(self, reason: Failure) -> None:
        self._connection = None
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            self._ending = reason
        else:
            protocol.connectionLost(reason)


class _Connection(Protocol):
    """One persistent connection to an upstream, carrying one request at a time."""

    def __init__(self, pool: "UpstreamClient", origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.idle_since = 0.0
        self.connected = False
        self.lost: Deferred[None] = Deferred()
        self._parser: Any = None
        self._start(None, False)

    def _start(self, then: Then | None, head_only: bool) -> None:
        self._then = then  # told of the response, or of the failure before it
        self._head_only = head_only
        self._fields: Fields = {}
        self._response: UpstreamResponse | None = None  # until its body ended
        self._close_delimited = False
        self._gunzip: Any = None
        self._paused = False
        self._aborted = False
        self._batch: list[bytes] = []  # body pieces of the read being parsed

    # -- the pool's side --

    def connectionMade(self) -> None:
        self.connected = True
        self._parser = httptools.HttpResponseParser(self)

    def send(self, head: bytes, body: bytes | None, head_only: bool, then: Then) -> None:
        self._start(then, head_only)
        if body and len(body) >= 65536:
            self.transport.writeSequence([head, body])
        else:
            write_now(self.transport, head + body if body else head)

    def cancel(self, then: Then) -> None:
        """Cancel the call ``then`` waits on, if it still waits (the connection
        may carry another call by now: that one is left alone)."""
        if self._then is then:
            self._then = None
            self.abort()
            then(Failure(CancelledError()))

    def pause(self) -> None:
        if not self._paused and self.connected:
            self._paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        if self._paused and self.connected:
            self._paused = False
            self.transport.resumeProducing()

    def abort(self) -> None:
        """Drop the connection (a cancelled call, a body nobody reads any more)."""
        self._aborted = True
        if self.connected:
            self.connected = False
            self.transport.abortConnection()

    # -- httptools callbacks --

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._deliver()
            self._fail_protocol("the upstream switched protocols")
        except httptools.HttpParserError as e:
            self._deliver()
            self._fail_protocol(f"malformed HTTP response ({e})")
        else:
            self._deliver()

    def on_header(self, name: bytes, value: bytes) -> None:
        add_field(self._fields, name, value)

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if code < 200 or self._aborted:  # 100 Continue, 103 Early Hints: the answer is still to come
            self._fields = {}
            return
        headers = RawHeaders(fields=self._fields)
        self._fields = {}
        encoding = headers.first(b"content-encoding")
        if encoding is not None and encoding.strip().lower() in (b"gzip", b"x-gzip"):
            self._gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
            headers.removeHeader(b"content-encoding")
            headers.removeHeader(b"content-length")
        self._close_delimited = (
            not headers.hasHeader(b"content-length")
            and not headers.hasHeader(b"transfer-encoding")
            and code not in (204, 304)
        )
        response = UpstreamResponse(self, code, headers)
        then, self._then = self._then, None
        if self._head_only:
            # llhttp cannot know the answer to a HEAD has no body: end it here
            # and close the connection rather than misread what follows.
            self.connected = False
            self.transport.loseConnection()
            response._end(_DONE)
        else:
            self._response = response
        if then is not None:
            then(response)

    def on_body(self, data: bytes) -> None:
        response = self._response
        if response is None or self._aborted:
            return
        if self._gunzip is not None:
            try:
                data = self._gunzip.decompress(data)
            except zlib.error as e:
                self._fail_protocol(f"bad gzip body ({e})")
                return
            if not data:
                return
        # Kept until the read is parsed: a read holding 40 chunks of a stream
        # goes down the relay once, not 40 times (each pass framed, metered
        # and wrote them one by one).  Nothing waits longer: all of it came
        # in the same read.
        self._batch.append(data)

    def _deliver(self) -> None:
        batch = self._batch
        if batch:
            self._batch = []
            response = self._response
            if response is not None and not self._aborted:
                response._data(batch[0] if len(batch) == 1 else b"".join(batch))

    def on_message_complete(self) -> None:
        response = self._response
        if response is None or self._aborted:
            return
        self._flush_gzip()
        self._deliver()
        self._response = None
        # Back to the pool before the body protocol hears of the end: what it
        # does next (often: another request to the same upstream) may reuse it.
        if self._parser.should_keep_alive() and not self._close_delimited and self.connected:
            self.resume()
            self.pool._release(self)
        elif self.connected:
            self.connected = False
            self.transport.loseConnection()
        response._end(_DONE)

    # -- endings --

    def _flush_gzip(self) -> None:
        if self._gunzip is not None:
            tail = self._gunzip.flush()
            self._gunzip = None
            if tail:
                self.on_body(tail)

    def _fail_protocol(self, why: str) -> None:
        log.info("upstream {host}: {why}", host=self.origin[1].decode("ascii", "replace"), why=why)
        self.abort()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.pool._forget(self)
        if reason is None or reason.check(ConnectionDone):
            reason = Failure(ConnectionLost("the upstream closed the connection"))
        then, self._then = self._then, None
        response, self._response = self._response, None
        if then is not None:
            then(Failure(ResponseNeverReceived([reason])))
        elif response is not None:
            if self._close_delimited and not self._aborted:
                self._response = response
                self._flush_gzip()
                self._deliver()
                self._response = None
                response._end(Failure(PotentialDataLoss()))
            else:
                response._end(Failure(ResponseFailed([reason])))
        self.lost.callback(None)


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" log line per upstream connection

    def __init__(self, pool: "UpstreamClient", origin: Origin) -> None:
        self.pool = pool
        self.origin = origin

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.pool, self.origin)


class UpstreamClient:
    """Requests to upstreams over persistent connections, one request per connection at a time."""

    def __init__(self, reactor: Any, connect_timeout: float, trust_root: Any = None) -> None:
        """:param trust_root: certificates HTTPS upstreams are checked against
        (``None``: the platform's trust store)."""
        self._reactor = reactor
        self._timeout = connect_timeout
        self._trust_root = trust_root
        self._endpoints: dict[Origin, Any] = {}
        self._idle: dict[Origin, list[_Connection]] = {}

    def request(
        self, method: bytes, url: bytes, headers: Iterable[tuple[bytes, list[bytes]]], body: bytes | None
    ) -> Deferred[UpstreamResponse]:
        """Fires with the response once its headers arrived; cancelling it aborts the call."""

        def settle(result: Any) -> None:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        d: Deferred[UpstreamResponse] = Deferred(canceller=lambda d: cancel())
        cancel = self.send(method, url, headers, body, settle)
        return d

    def send(
        self, method: bytes, url: bytes, headers: Iterable[tuple[bytes, list[bytes]]], body: bytes | None, then: Then
    ) -> Callable[[], None]:
        """:meth:`request` without a Deferred (the relay's form: it runs for every
        request): ``then`` gets the response once its headers arrived, or a
        Failure (``CancelledError`` when cancelled).  Returns the function
        that cancels the call; it does nothing once ``then`` was called.
        """
        origin, target = split_url(url)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%sAccept-Encoding: gzip\r\n" % (
            method, target, host_header(origin), encode_fields(headers)
        )
        if body or method in (b"POST", b"PUT", b"PATCH"):
            head += b"Content-Length: %d\r\n" % len(body or b"")
        head += b"\r\n"
        head_only = method == b"HEAD"
        idle = self._idle.get(origin)
        now = self._reactor.seconds()
        while idle:
            conn = idle.pop()
            if conn.connected and now - conn.idle_since < MAX_IDLE_SECONDS:
                conn.send(head, body, head_only, then)
                return lambda: conn.cancel(then)
            conn.abort()
        return self._connect(origin, head, body, head_only, then)

    def _connect(self, origin: Origin, head: bytes, body: bytes | None, head_only: bool, then: Then) -> Callable[[], None]:
        connecting = self._endpoint(origin).connect(_ConnectionFactory(self, origin))
        sent: list[_Connection] = []

        def cancel() -> None:
            if sent:
                sent[0].cancel(then)
            elif not connecting.called:
                connecting.cancel()  # (failed() tells then)

        def connected(conn: _Connection) -> None:
            _no_delay(conn.transport)
            sent.append(conn)
            conn.send(head, body, head_only, then)

        connecting.addCallbacks(connected, then)
        return cancel

    def _endpoint(self, origin: Origin) -> Any:
        endpoint = self._endpoints.get(origin)
        if endpoint is None:
            scheme, host, port = origin
            hostname = host.decode("idna")
            endpoint = HostnameEndpoint(self._reactor, hostname, port, timeout=self._timeout)
            if scheme == b"https":  # certificate and host name checked, as a browser does
                from twisted.internet.ssl import optionsForClientTLS

                endpoint = wrapClientTLS(optionsForClientTLS(hostname, trustRoot=self._trust_root), endpoint)
            self._endpoints[origin] = endpoint
        return endpoint

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.connected = False
            conn.transport.loseConnection()
            return
        conn.idle_since = self._reactor.seconds()
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> Deferred[Any]:
        """Close the idle connections (busy ones end with their calls); fires once they are closed."""
        closing = []
        for idle in self._idle.values():
            for conn in idle:
                closing.append(conn.lost)
                conn.connected = False
                conn.transport.loseConnection()
        self._idle.clear()
        return gatherResults(closing)


def _no_delay(transport: Any) -> None:
    """TCP_NODELAY on the TCP transport under ``transport`` (TLS wraps it)."""
    while transport is not None:
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
            return
        transport = getattr(transport, "transport", None)
