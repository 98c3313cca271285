# -*- test-case-name: tests.test_proxy -*-
"""The one Klein app: ``/v1``, the console, admin API, health and metrics.

Every route lives here and only here.  Routes are thin: ``/v1`` hands the
request to :func:`~greyfox._v1.serve_v1` (the proxy), the rest call
:class:`~greyfox._api.Api` and turn results or :class:`ApiError` into
responses.  Keeping Klein to this module means it could be swapped for plain
``twisted.web.resource`` without touching the logic.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Awaitable, Callable

from klein import Klein
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.routing import BaseConverter
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.static import File

from . import _errors as errors
from ._api import Api, Result
from ._errors import ApiError, too_large
from ._metrics import Metrics
from ._proxy import Proxy, _same
from ._routing import bearer
from ._v1 import serve_v1

log = Logger()


def web_root() -> str:
    """The console's static files: installed ``greyfox/web``, else the repo's ``web/``."""
    installed = resources.files("greyfox") / "web"
    if installed.is_dir():
        return str(installed)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")


def _json(request: IRequest, status: int, doc: Any) -> bytes:
    body = json.dumps(doc).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


def _error(request: IRequest, e: ApiError) -> bytes:
    for name, value in e.headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return _json(request, e.status, e.body())


class _Rest(BaseConverter):
    """The rest of a path, whatever it holds (Werkzeug's ``path`` wants a first character that is not "/")."""

    regex = ".*"
    part_isolating = False


class GreyFoxApp:
    """Binds the routes to one proxy, one API and one metrics registry."""

    app = Klein()
    # Every /v1 path reaches the proxy, "//" and all: it is the proxy's to refuse
    # (400), not Werkzeug's to redirect or the console's to miss.
    app.url_map.merge_slashes = False
    app.url_map.converters["rest"] = _Rest

    def __init__(self, proxy: Proxy, api: Api, metrics: Metrics, admin_token: str | None) -> None:
        self.proxy = proxy
        self.api = api
        self.metrics = metrics
        self._admin = admin_token.encode() if admin_token else None
        self._static = File(web_root())

    def resource(self) -> Any:
        return self.app.resource()

    # -- the proxy --

    @app.route("/v1")
    @app.route("/v1/<rest:rest>")
    def v1(self, request: IRequest, rest: str = "") -> bytes | Deferred[bytes]:
        return serve_v1(self.proxy, request)

    # -- health and metrics --

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        status, doc = self.api.health()
        return _json(request, status, doc)

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        try:
            self._check_admin(request)
        except ApiError as e:
            return _error(request, e)
        text, content_type = self.metrics.render()
        request.setHeader(b"content-type", content_type)
        return text

    # -- admin API --

    def _check_admin(self, request: IRequest) -> None:
        if self._admin is None:
            return
        token = bearer(request.getHeader(b"authorization"))
        if token is None or not _same(token, self._admin):
            raise errors.unauthorized("This endpoint needs Authorization: Bearer <GREYFOX_ADMIN_TOKEN>.")

    def _admin_api(self, request: IRequest, handler: Callable[[], Awaitable[Result] | Result]) -> Deferred[bytes]:
        """Run an admin API handler behind the admin token; errors become OpenAI-shaped."""
        return ensureDeferred(self._admin_call(request, handler))

    async def _admin_call(self, request: IRequest, handler: Callable[[], Awaitable[Result] | Result]) -> bytes:
        try:
            self._check_admin(request)
            if getattr(request, "body_too_large", False):
                raise too_large(request.max_body)  # type: ignore[attr-defined]
            result = handler()
            if not isinstance(result, tuple):
                result = await result
            status, doc = result
        except ApiError as e:
            return _error(request, e)
        except CancelledError:
            raise  # the client left: Klein has nothing to answer
        except Exception:
            log.failure("admin API {path} failed", path=request.path.decode("latin-1", "replace"))
            return _error(request, ApiError(503, "The database could not answer; see the log.", "server_error", "db_error"))
        return _json(request, status, doc)

    @app.route("/api/usage", methods=["GET"])
    def usage(self, request: IRequest) -> Deferred[bytes]:
        return self._admin_api(request, lambda: self.api.usage(request.args))

    @app.route("/api/requests", methods=["GET"])
    def requests(self, request: IRequest) -> Deferred[bytes]:
        return self._admin_api(request, lambda: self.api.requests(request.args))

    @app.route("/api/inflight", methods=["GET"])
    def inflight(self, request: IRequest) -> Deferred[bytes]:
        return self._admin_api(request, self.api.inflight)

    @app.route("/api/status", methods=["GET"])
    def status(self, request: IRequest) -> Deferred[bytes]:
        return self._admin_api(request, self.api.status)

    @app.route("/api/cache", methods=["GET"])
    def cache_info(self, request: IRequest) -> Deferred[bytes]:
        return self._admin_api(request, self.api.cache_info)

    @app.route("/api/cache", methods=["DELETE"])
    def cache_clear(self, request: IRequest) -> Deferred[bytes]:
        return self._admin_api(request, lambda: self.api.cache_clear(request.args))

    @app.route("/api/quotas", methods=["GET"])
    def quotas(self, request: IRequest) -> Deferred[bytes]:
        return self._admin_api(request, self.api.quotas_view)

    @app.route("/api/quotas", methods=["PUT"])
    def set_budget(self, request: IRequest) -> Deferred[bytes]:
        return self._admin_api(request, lambda: self.api.set_budget(request.content.read()))

    @app.route("/api/quotas/<user>", methods=["PUT"])
    def set_user_quota(self, request: IRequest, user: str) -> Deferred[bytes]:
        return self._admin_api(request, lambda: self.api.set_user(user, request.content.read()))

    @app.route("/api/quotas/<user>/breaker", methods=["DELETE"])
    def reset_breaker(self, request: IRequest, user: str) -> Deferred[bytes]:
        return self._admin_api(request, lambda: self.api.reset_breaker(user))

    @app.route("/api", branch=True)
    def api_unknown(self, request: IRequest) -> bytes:
        try:
            self._check_admin(request)
        except ApiError as e:
            return _error(request, e)
        return _error(request, errors.not_found(f"No API endpoint {request.method.decode()} {request.path.decode('latin-1')}."))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Any) -> bytes:
        request.setHeader(b"allow", ", ".join(failure.value.valid_methods or ()).encode())
        return _error(request, ApiError(
            405, f"{request.method.decode()} is not allowed on {request.path.decode('latin-1')}.",
            "invalid_request_error", "method_not_allowed"))

    # -- the console --

    @app.route("/", branch=True, methods=["GET", "HEAD"])
    def console(self, request: IRequest) -> Any:
        return self._static
