# -*- test-case-name: tests.test_proxy -*-
"""``/v1``: one request handed to the proxy and answered, on either HTTP server.

No Klein here: ``/v1`` is served by ``_server.Channel`` (or, on a connection
twisted.web serves, by :class:`ProxyResource`), and the Klein app for the
rest (``_app``) is imported in a thread after start.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ._errors import ApiError
from ._proxy import Proxy
from ._server import V1Request

log = Logger()


def serve_v1(proxy: Proxy, request: Any) -> None:
    """Serve one ``/v1`` request to its end, on either HTTP server.

    Cancels the proxy's work when the client leaves; answers 503 when a
    shutdown cancelled it, 500 (and logs) when GreyFox itself failed.  Both
    servers set ``request.channel`` to ``None`` when the client is gone.
    """
    subpath = request.path[len(b"/v1") :] or b"/"
    outcome = proxy.handle(request, subpath)
    if isinstance(outcome, bytes):  # answered at once (a cache hit, a refusal)
        _finish(request, outcome)
        return
    d = outcome
    proxy.in_flight.add(d)

    def gone(failure: Any) -> None:
        d.cancel()

    if isinstance(request, V1Request):
        request.on_lost = gone
    else:
        request.notifyFinish().addErrback(gone)

    def respond(body: bytes) -> None:
        proxy.in_flight.discard(d)
        _finish(request, body)

    def failed(failure: Any) -> None:
        proxy.in_flight.discard(d)
        if request.channel is None or request.finished:
            return  # the client left; nothing to answer
        if failure.check(CancelledError):  # cancelled by a shutdown that ran out of grace
            error = ApiError(503, "GreyFox is shutting down; retry.", "server_error", "shutting_down")
        else:
            log.failure("request to {path} failed", failure, path=request.path.decode("latin-1", "replace"))
            error = ApiError(500, "GreyFox failed on this request; see its log.", "server_error", "internal_error")
        if not request.startedWriting:
            request.setResponseCode(error.status)
            request.setHeader(b"content-type", b"application/json")
            request.write(error.to_bytes())
        request.finish()

    d.addCallbacks(respond, failed)


def _finish(request: Any, body: bytes) -> None:
    """End the response with ``body``, unless the client has gone."""
    if request.channel is not None and not request.finished:
        if body:
            request.write(body)
        request.finish()


class ProxyResource(Resource):
    """``/v1/*`` on connections that twisted.web serves (see ``_server``): the
    proxy without Klein's routing, which costs about 0.15 ms a request."""

    isLeaf = True

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    def render(self, request: IRequest) -> Any:
        serve_v1(self.proxy, request)
        return NOT_DONE_YET
