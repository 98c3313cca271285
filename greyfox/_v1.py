# -*- test-case-name: tests.test_proxy -*-
"""``/v1``: one request handed to the proxy, and its outcome handed back to Klein.

The Klein route (``_app``) returns what :func:`serve_v1` returns: the body
to finish the response with, or a Deferred of it.  Klein writes it and
finishes the request, and cancels the Deferred when the client hangs up
(which cancels the proxy's work).  What is left here is what Klein cannot
know: a shutdown that ran out of grace is a 503, a bug a 500, and a response
whose upstream broke off after its headers were relayed is aborted, never
finished as if complete.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from . import _errors as errors
from ._errors import ApiError
from ._proxy import Proxy
from ._relay import BrokenOff

log = Logger()


def serve_v1(proxy: Proxy, request: IRequest) -> bytes | Deferred[bytes]:
    """Serve one ``/v1`` request."""
    outcome = proxy.handle(request, request.path[len(b"/v1") :] or b"/")
    if isinstance(outcome, bytes):  # answered at once (a cache hit, a refusal)
        return outcome
    return outcome.addErrback(lambda failure: _failed(request, failure))


def _failed(request: Any, failure: Failure) -> bytes | Failure | Deferred[bytes]:
    if request.channel is None or request.finished:
        return failure  # the client left: Klein has nothing to answer (and logs no CancelledError)
    if failure.check(BrokenOff):
        error = errors.bad_gateway(f"The upstream's answer broke off: {failure.value}.")
    elif failure.check(CancelledError):  # cancelled by a shutdown that ran out of grace
        error = ApiError(503, "GreyFox is shutting down; retry.", "server_error", "shutting_down")
    else:
        log.failure("request to {path} failed", failure, path=request.path.decode("latin-1", "replace"))
        error = ApiError(500, "GreyFox failed on this request; see its log.", "server_error", "internal_error")
    if request.startedWriting:
        # The client must not take what it got for a whole answer: what was
        # written (a stream's last event says why) goes out, then the
        # connection closes without the response's end.  Klein cancels the
        # Deferred returned here once the connection is gone.
        request.channel.loseConnection()
        return Deferred()
    request.setResponseCode(error.status)
    request.responseHeaders.removeHeader(b"content-length")  # (the upstream's, if its headers were set)
    request.setHeader(b"content-type", b"application/json")
    return error.to_bytes()
