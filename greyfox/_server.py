# -*- test-case-name: tests.test_server -*-
"""The listening side: a lean HTTP/1.1 protocol for ``/v1``, twisted.web for the rest.

Every relayed request used to pass through twisted.web's ``HTTPChannel`` and
``Request``: with ``Agent``, 0.76 ms of CPU a request before any GreyFox code,
against 0.1 ms for the same relay on httptools (bench/README.md).  :class:`Channel` parses with httptools (llhttp, the
parser of Node.js, which rejects request smuggling and malformed framing) and
hands each ``/v1`` request to the proxy as a :class:`V1Request`, the part of
``IRequest`` the proxy uses.

Everything else (console, admin API, health, metrics) stays on twisted.web:
a connection whose first request is not for ``/v1`` is given, bytes
untouched, to the Site's own ``HTTPChannel``.  A ``/v1`` connection that later
asks for something else is bridged: from that request on, each parsed
request is written again, as HTTP/1.1, into an ``HTTPChannel`` on the same
transport, once the ``/v1`` answers before it are complete.
"""

from __future__ import annotations

from collections import deque
from io import BytesIO
from typing import Any, Callable

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._errors import ApiError
from ._transport import write_now
from ._watchdog import Watchdog
from ._wire import Fields, HttpDate, RawHeaders, encode_fields, first_value, status_line

log = Logger()

#: Request line and header fields together, at most (twisted.web allows 16 KiB).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 500
#: Requests parsed ahead while one is answered (HTTP pipelining) before reading pauses.
MAX_QUEUED = 16
#: A connection with no request in progress is closed after this many seconds.
IDLE_TIMEOUT = 60.0

_SNIFF, _FAST, _SITE = 0, 1, 2
_V1_NEXT = (b"/", b"?", b" ")


def is_v1(target: bytes) -> bool:
    """Whether a request target is ``/v1`` or below it."""
    return target[:3] == b"/v1" and (len(target) == 3 or target[3:4] in _V1_NEXT)


def sniff(buffer: bytes) -> bool | None:
    """Whether the first request in ``buffer`` is for ``/v1``; ``None`` until there is enough to tell."""
    start = buffer.lstrip(b"\r\n")
    space = start.find(b" ")
    if space < 0:
        return None if len(start) < 64 and b"\n" not in start else False
    target = start[space + 1 : space + 5]
    if len(target) < 4 and b"\n" not in start and len(start) < 64:
        return None
    return is_v1(target)


class V1Request:
    """One ``/v1`` request on a :class:`Channel`: the part of ``IRequest`` the proxy uses.

    The response is framed by ``Content-Length`` when the handler set one,
    else chunked (HTTP/1.1) or ended by closing (HTTP/1.0).
    """

    def __init__(
        self,
        channel: "Channel",
        method: bytes,
        uri: bytes,
        version: bytes,
        headers: RawHeaders,
        body: bytes,
        too_large: bool,
        keep_alive: bool,
    ) -> None:
        self.channel: Channel | None = channel
        self.method = method
        self.uri = uri
        self.path = uri.partition(b"?")[0]
        self.clientproto = b"HTTP/" + version
        self.requestHeaders = headers
        self.responseHeaders = RawHeaders()
        self.body = body  # (``content`` is made from it only if asked for: the proxy reads this)
        self._content: BytesIO | None = None
        self.body_too_large = too_large
        self.keep_alive = keep_alive
        self.code = 200
        self.startedWriting = False
        self.finished = False
        self._chunked = False
        self._unsent: int | None = None  # body bytes still owed to a declared Content-Length
        self._producer: Any = None
        self._waiters: list[Deferred[None]] | None = None
        #: Called with the reason if the client leaves before the response is
        #: complete: what ``notifyFinish().addErrback`` gives, without a Deferred
        #: for every request.
        self.on_lost: Callable[[Failure], None] | None = None

    @property
    def content(self) -> BytesIO:
        """The body as a file, as ``IRequest`` has it."""
        if self._content is None:
            self._content = BytesIO(self.body)
        return self._content

    # -- what the handler sets --

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.fields[name.lower()] = (name, [value])

    def getHeader(self, name: bytes) -> bytes | None:
        return self.requestHeaders.first(name)

    # -- the response --

    def write(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or self.finished:
            return
        head = b""
        if not self.startedWriting:
            head = self._head(channel)
        if not data or self.method == b"HEAD":
            if head:
                write_now(channel.transport, head)
            return
        if self._chunked:
            write_now(channel.transport, head + b"%x\r\n%s\r\n" % (len(data), data))
        else:
            if self._unsent is not None:
                self._unsent -= len(data)
            # With the head in one write: a whole JSON answer leaves as one.
            write_now(channel.transport, head + data if head else data)

    def finish(self) -> None:
        channel = self.channel
        if self.finished or channel is None:
            return
        if not self.startedWriting:
            if b"content-length" not in self.responseHeaders.fields:
                self.setHeader(b"Content-Length", b"0")
            write_now(channel.transport, self._head(channel))
        elif self._chunked:
            write_now(channel.transport, b"0\r\n\r\n")
        elif self._unsent:
            # Shorter than its Content-Length (the upstream broke off): close,
            # so that the client sees a truncated response rather than waiting.
            self.keep_alive = False
        self.finished = True
        self.on_lost = None
        if self._producer is not None:
            self.unregisterProducer()
        self._fire(None)
        channel.request_done(self)

    def _head(self, channel: "Channel") -> bytes:
        """The status line and header fields; from now on the response is started."""
        self.startedWriting = True
        fields = self.responseHeaders.fields
        lines = [status_line(self.code)]
        if b"date" not in fields:  # a relayed answer keeps the upstream's
            lines += (b"Date: ", channel.factory.date(), b"\r\n")
        lines.append(encode_fields(fields.values()))
        has_body = self.method != b"HEAD" and self.code not in (204, 304)
        length = first_value(fields, b"content-length")
        if length is not None:
            if has_body and length.isdigit():
                self._unsent = int(length)
        elif has_body:
            if self.clientproto == b"HTTP/1.1":
                self._chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends when the connection does
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.clientproto == b"HTTP/1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # -- producers and endings --

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.channel is None:
            producer.stopProducing()
            return
        self._producer = producer
        self.channel.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is not None and self.channel is not None:
            self.channel.transport.unregisterProducer()
        self._producer = None

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.finished:
            d.callback(None)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(d)
        return d

    def connection_lost(self, reason: Failure) -> None:
        """The client went away before the response was complete."""
        self.channel = None
        self._producer = None
        self._fire(reason)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost(reason)

    def _fire(self, result: Failure | None) -> None:
        waiters, self._waiters = self._waiters, None
        for d in waiters or ():
            if result is None:
                d.callback(None)
            else:
                d.errback(result)


class Channel(Protocol):
    """One client connection: ``/v1`` requests parsed here, the rest given to twisted.web."""

    factory: "ServerFactory"

    def __init__(self) -> None:
        self._mode = _SNIFF
        self._sniffed = b""
        self._parser: Any = None
        self._site: Any = None  # the HTTPChannel serving everything that is not /v1
        self._bridging = False
        self._bridge_pending: list[bytes] = []
        self._current: V1Request | None = None
        self._queue: deque[V1Request] = deque()
        self._paused = False
        self._closing = False
        self._watchdog: Watchdog | None = None  # the idle timeout, from connectionMade
        self._new_message()

    def _new_message(self) -> None:
        self._url = b""
        self._fields: Fields = {}  # (filled as they arrive: see RawHeaders)
        self._n_fields = 0
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._too_large = False
        self._keep_alive = True
        self._bridged_message = False
        self._bridge_chunked = False

    # -- connection --

    def connectionMade(self) -> None:
        self._idle()

    def dataReceived(self, data: bytes) -> None:
        if self._mode == _FAST:
            if self._current is None and self._watchdog is not None:
                self._watchdog.touch()  # a request is arriving
            self._feed(data)
        elif self._mode == _SITE:
            self._site.dataReceived(data)
        else:
            self._sniff(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._stop_timer()
        current, self._current = self._current, None
        self._queue.clear()
        if current is not None and not current.finished:
            current.connection_lost(reason)
        if self._site is not None:
            self._site.connectionLost(reason)

    def _sniff(self, data: bytes) -> None:
        buffer = self._sniffed + data
        verdict = sniff(buffer)
        if verdict is None:
            self._sniffed = buffer
            return
        self._sniffed = b""
        if verdict:
            self._mode = _FAST
            self._parser = httptools.HttpRequestParser(self)
            self._feed(buffer)
        else:
            self._stop_timer()
            self._mode = _SITE
            self._start_site()
            self._site.dataReceived(buffer)

    def _start_site(self) -> None:
        self._site = self.factory.site.buildProtocol(self.transport.getPeer())
        self._site.makeConnection(self.transport)

    def _feed(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(ApiError(400, "Protocol upgrades are not supported.", "invalid_request_error", "invalid_http"))
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__ or e
            if not isinstance(cause, _TooLarge):  # a bug of ours, in a callback: log it, answer, close
                log.failure("serving a request failed", Failure(cause))
                self._reject(ApiError(500, "GreyFox failed on this request; see its log.", "server_error", "internal_error"))
                return
            self._reject(ApiError(
                431, f"The request line and headers exceed {MAX_HEAD_BYTES // 1024} KiB or {MAX_HEADERS} fields.",
                "invalid_request_error", "headers_too_large",
            ))
        except httptools.HttpParserError as e:
            self._reject(ApiError(400, f"Malformed HTTP request: {e}.", "invalid_request_error", "invalid_http"))

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._new_message()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _TooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        # (add_field inlined: this runs for every field of every request)
        fields, key = self._fields, name.lower()
        field = fields.get(key)
        if field is None:
            fields[key] = (name, [value])
        else:
            field[1].append(value)
        self._n_fields += 1
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES or self._n_fields > MAX_HEADERS:
            raise _TooLarge()

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._keep_alive = parser.should_keep_alive()
        if self._bridging or not is_v1(self._url):
            self._bridging = self._bridged_message = True
            self._bridge_head(parser.get_method(), parser.get_http_version())
            return
        expect = self._fields.get(b"expect")
        if expect is not None and parser.get_http_version() == "1.1" and self._current is None and not self._queue:
            if any(value.lower() == b"100-continue" for value in expect[1]):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, data: bytes) -> None:
        if self._bridged_message:
            self._bridge_write(b"%x\r\n%s\r\n" % (len(data), data) if self._bridge_chunked else data)
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.factory.max_body:
            self._too_large = True  # keep reading, drop the bytes: the proxy answers 413
            self._body = []
        else:
            self._body.append(data)

    def on_message_complete(self) -> None:
        if self._bridged_message:
            if self._bridge_chunked:
                self._bridge_write(b"0\r\n\r\n")
            return
        parser = self._parser
        request = V1Request(
            self,
            parser.get_method(),
            self._url,
            parser.get_http_version().encode("ascii"),
            RawHeaders(fields=self._fields),
            b"".join(self._body),
            self._too_large,
            self._keep_alive,
        )
        self._body = []
        if self._current is None and not self._closing:
            self._dispatch(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= MAX_QUEUED and not self._paused:
                self._paused = True
                self.transport.pauseProducing()

    # -- requests --

    def _dispatch(self, request: V1Request) -> None:
        self._current = request
        try:
            self.factory.handle(request)
        except Exception:  # a bug of ours: log it, and answer rather than leave the client hanging
            log.failure("serving {path} failed", path=request.path.decode("latin-1", "replace"))
            if not request.startedWriting:
                error = ApiError(500, "GreyFox failed on this request; see its log.", "server_error", "internal_error")
                request.setResponseCode(error.status)
                request.setHeader(b"Content-Type", b"application/json")
                request.keep_alive = False
                request.write(error.to_bytes())
                request.finish()
            elif self.transport is not None:
                self.transport.abortConnection()

    def request_done(self, request: V1Request) -> None:
        """Called by ``request`` once its response is written."""
        if request is not self._current:
            return
        self._current = None
        if not request.keep_alive or self._closing:
            self.transport.loseConnection()
            return
        if self._queue:
            self._dispatch(self._queue.popleft())
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self._bridging:
            self._flush_bridge()
        else:
            self._idle()

    def _reject(self, error: ApiError) -> None:
        """A request that cannot be parsed: answer it and close.

        After an answer in progress (or twisted.web's, on a bridged
        connection) the connection is closed without one.
        """
        self._closing = True
        if self._current is not None or self._queue:
            return  # request_done closes
        if self._site is not None:
            self.transport.loseConnection()
            return
        body = error.to_bytes()
        self.transport.write(
            status_line(error.status)
            + b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        self.transport.loseConnection()

    # -- the bridge to twisted.web --

    def _bridge_head(self, method: bytes, version: str) -> None:
        self._bridge_chunked = b"transfer-encoding" in self._fields
        drop = (b"transfer-encoding", b"content-length") if self._bridge_chunked else (b"transfer-encoding",)
        fields = [field for lower, field in self._fields.items() if lower not in drop]
        if self._bridge_chunked:
            fields.append((b"Transfer-Encoding", [b"chunked"]))
        self._bridge_write(b"%s %s HTTP/%s\r\n%s\r\n" % (method, self._url, version.encode("ascii"), encode_fields(fields)))

    def _bridge_write(self, data: bytes) -> None:
        self._bridge_pending.append(data)
        self._flush_bridge()

    def _flush_bridge(self) -> None:
        if self._current is not None or self._queue:
            return
        if self._site is None:
            self._stop_timer()  # twisted.web times the connection out from here on
            self._start_site()
        pending, self._bridge_pending = self._bridge_pending, []
        for data in pending:
            self._site.dataReceived(data)

    # -- idle timeout --

    def _idle(self) -> None:
        """No request in progress from now: close the connection if that lasts.

        One DelayedCall per connection (a Watchdog), re-armed only when it
        fires: resetting a DelayedCall for every request showed in the profile.
        """
        if self._watchdog is None:
            self._watchdog = Watchdog(self.factory.clock, IDLE_TIMEOUT, self._timed_out)
        else:
            self._watchdog.touch()

    def _stop_timer(self) -> None:
        watchdog, self._watchdog = self._watchdog, None  # (it holds self._timed_out: no cycle left behind)
        if watchdog is not None:
            watchdog.stop()

    def _timed_out(self) -> None:
        if self._mode == _SITE or self._closing:
            return
        if self._current is not None or self._queue:  # busy: look again later
            self._watchdog.retarget(IDLE_TIMEOUT, self._timed_out)  # type: ignore[union-attr]
            return
        self.transport.loseConnection()


class _TooLarge(Exception):
    """The request head is over the limits."""


class ServerFactory(Factory):
    """Builds a :class:`Channel` per connection.

    :param site: the twisted.web ``Site`` for everything that is not ``/v1``.
    :param handle: serves one :class:`V1Request` (it must finish it).
    """

    protocol = Channel

    def __init__(self, site: Any, handle: Callable[[V1Request], Any], max_body: int, clock: IReactorTime) -> None:
        self.site = site
        self.handle = handle
        self.max_body = max_body
        self.clock = clock
        self.date = HttpDate(clock.seconds)

    def doStart(self) -> None:
        super().doStart()
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()
        super().doStop()
