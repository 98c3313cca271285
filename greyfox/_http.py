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

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import ErrorPage, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ._server import is_v1

log = Logger()


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


class WhenLoaded(Resource):
    """A leaf resource that stands for one still being loaded, off the reactor.

    The console, API, health and metrics are a Klein app; importing Klein and
    Werkzeug takes ~0.12 s, which the service does in a thread at start
    instead of before its port opens (and never on the reactor thread, where
    it would stall every connection).  A request that comes before it is
    ready waits for it, then is rendered as twisted.web would have; Klein's
    resource is a leaf too, so every request reaches it unchanged.
    """

    isLeaf = True

    def __init__(self, loading: Deferred[Any]) -> None:
        super().__init__()
        self._resource: Any = None
        self._loading = loading.addCallbacks(self._loaded, self._failed)

    def _loaded(self, resource: Any) -> Any:
        self._resource = resource
        return resource

    def _failed(self, failure: Failure) -> Any:
        log.failure("could not load the console and admin API", failure)
        return self._loaded(ErrorPage(500, "GreyFox could not load its console and admin API", "See its log."))

    def render(self, request: Any) -> Any:
        if self._resource is not None:
            return self._resource.render(request)

        def ready(resource: Any) -> Any:
            if not request.finished and request.channel is not None:
                request.render(resource)
            return resource

        self._loading.addCallback(ready)
        return NOT_DONE_YET


def no_delay_listening(port: Any) -> None:
    """TCP_NODELAY on a listening TCP socket; Linux gives it to every accepted one."""
    import socket

    sock = getattr(port, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
