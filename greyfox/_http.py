# -*- test-case-name: tests.test_proxy -*-
"""twisted.web's side of the listening port: the Site for the console, API and health.

``/v1`` requests normally never get here (``_server.Channel`` serves them);
those that arrive on a connection twisted.web already serves are handed
straight to the proxy's resource.  The listening socket sets TCP_NODELAY: a
response goes out in several small writes, and Nagle's algorithm would hold
the second until the peer's delayed ACK, 40 ms later.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request, Site

from ._server import is_v1


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
        if self.v1 is not None and is_v1(request.path):
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
