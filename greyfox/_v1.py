# -*- test-case-name: tests.test_proxy -*-
"""``/v1``: one request handed to the proxy, its answer handed back to Klein.

Klein writes what :meth:`~greyfox._proxy.Proxy.handle` returns (at once, or
when its Deferred fires) and finishes the request, and cancels the Deferred
when the client hangs up, which cancels the proxy's work.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from ._proxy import Proxy


def serve_v1(proxy: Proxy, request: IRequest) -> bytes | Deferred[bytes]:
    """Serve one ``/v1`` request."""
    return proxy.handle(request, request.path[len(b"/v1") :] or b"/")
