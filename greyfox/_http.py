# -*- test-case-name: tests.test_proxy -*-
"""twisted.web's side of the listening port: the Site every request goes through.

The Site serves the one Klein app (``_app``): ``/v1``, the admin API, health,
metrics and the console.  What is tuned here is around twisted.web, not
instead of it: request bodies are kept in memory up to the body limit (and
dropped past it), there is no access log line per request (the ledger
records every request), and the listening socket sets TCP_NODELAY, since a
response goes out in several small writes and Nagle's algorithm would hold
the second until the peer's delayed ACK, 40 ms later.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.protocols.basic import LineReceiver
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ._errors import bad_request

#: A Host header: a bracketed IPv6 address or a name of URL characters, and an optional port.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]*)?")


class LimitedRequest(Request):
    """Keeps at most ``max_body`` bytes of a request body, in memory, and drops
    the rest, so an oversized upload (chunked or not) never fills memory or
    disk before the proxy answers 413.  ``body_too_large`` says it happened."""

    max_body = 10 * 1024 * 1024
    body_too_large = False
    _body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        # twisted.web spools bodies of 100 kB and more (and chunked ones) to a
        # temporary file: disk I/O on the reactor thread.  The limit bounds the
        # memory a body can take instead.
        self.content = BytesIO()
        if length is not None and length > self.max_body:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > self.max_body:
            self.body_too_large = True
        if not self.body_too_large:
            super().handleContentChunk(data)


class HeadDeadlineChannel(HTTPChannel):
    """twisted.web's channel, with a deadline for each request's head.

    twisted.web puts its idle timeout off at every byte, so a client sending
    a head a byte at a time held a connection for ever.  Here the bytes of
    a head do not put it off: from a head's first byte the client has the
    idle timeout to complete it; a body's bytes and a complete head put it
    off as before.  A request declaring a body past the limit is answered
    at once.
    """

    _in_head = False

    def dataReceived(self, data: bytes) -> None:
        if not self.line_mode or self._handlingRequest:
            super().dataReceived(data)
            return
        if not self._in_head:  # the first byte of a head starts its deadline
            self._in_head = True
            self.resetTimeout()
        LineReceiver.dataReceived(self, data)

    def allHeadersReceived(self) -> None:
        self._in_head = False
        self.resetTimeout()
        request = self.requests[-1]
        if self.length is not None and self.length > request.max_body:
            # A body declared past the limit is answered (413, by the route,
            # which sees ``body_too_large``) before a byte of it is read, and
            # without a 100 Continue; the connection closes after the answer.
            request.parseCookies()
            self.persistent = False
            request.gotLength(self.length)
            self.length = 0  # (so twisted.web takes the request as complete, and hands it on now)
            return
        super().allHeadersReceived()


class QuietSite(Site):
    """A Site for an API: no access-log line per request, request bodies
    capped at ``max_body`` bytes, and no HTML-form parsing of request bodies
    (twisted.web parses the Content-Type of every POST through the email
    package for it), and a deadline for each request's head."""

    protocol = HeadDeadlineChannel

    def __init__(self, resource: Any, max_body: int = LimitedRequest.max_body) -> None:
        factory = type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})
        super().__init__(resource, requestFactory=factory, parsePOSTFormSubmission=False)

    def log(self, request: Any) -> None:
        pass

    def getResourceFor(self, request: Any) -> Any:
        """A request whose host or path no route could read is answered here, with a 400."""
        problem = unreadable(request)
        if problem is not None:
            return _Refused(problem)
        return super().getResourceFor(request)


def unreadable(request: Any) -> str | None:
    """Why the routing layer could not read a request's ``Host`` or path, or ``None``."""
    host = request.getHeader(b"host")
    if host is not None and not _is_host(host):
        return "The Host header is not a host name."
    try:
        path = unquote_to_bytes(request.path).decode("utf-8")
    except UnicodeDecodeError:
        return "The path is not UTF-8 once percent-decoded."
    if not path.isprintable():
        return "The path holds control characters once percent-decoded."
    return None


def _is_host(host: bytes) -> bool:
    match = _HOST.fullmatch(host)
    if match is None:
        return False
    name = match.group(1)
    if name and not name.startswith(b"["):
        try:
            name.decode("ascii").encode("idna")  # (refuses empty labels: ".1", "a..b")
        except UnicodeError:
            return False
    return True


class _Refused(Resource):
    """An OpenAI-shaped 400, for a request that never reaches a route."""

    isLeaf = True

    def __init__(self, message: str) -> None:
        super().__init__()
        self.error = bad_request(message, "invalid_request")

    def render(self, request: Any) -> bytes:
        request.setResponseCode(400)
        request.setHeader(b"content-type", b"application/json")
        return b"" if request.method == b"HEAD" else self.error.to_bytes()


def no_delay_listening(port: Any) -> None:
    """TCP_NODELAY on a listening TCP socket; Linux gives it to every accepted one."""
    import socket

    sock = getattr(port, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
