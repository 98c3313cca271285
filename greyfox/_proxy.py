# -*- test-case-name: tests.test_proxy -*-
"""The request path: parse -> route -> admit -> cache -> forward -> relay -> settle.

Each stage is a method with one job, so the ledger, cache and quota plug in
without the path being rewritten.  Nothing here waits on the database: the
ledger row is queued at the end (:meth:`Proxy.settle`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable
from zoneinfo import ZoneInfo

import attr
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from . import _errors as errors
from ._config import Settings
from ._errors import ApiError
from ._pricing import PriceTable
from ._relay import BodyPump, ClientGone, PassThrough, StreamIdle
from ._routing import Route, bearer, request_headers, resolve, response_headers, upstream_authorization, upstream_url
from ._sse import SSEParser
from ._store import Ledger, LedgerRow
from ._tokens import IncrementalCounter, estimate_prompt_tokens
from ._usage import StreamMeter, Usage, usage_from_body

log = Logger()

#: Endpoints whose body must be JSON with a model.
JSON_ENDPOINTS = frozenset({b"/chat/completions", b"/completions", b"/embeddings", b"/responses"})
#: Streams for which GreyFox asks the upstream for a usage chunk.
USAGE_CHUNK_ENDPOINTS = frozenset({b"/chat/completions", b"/completions"})
#: Non-stream bodies up to this size are kept to read their ``usage``.
KEEP_BODY_BYTES = 8 * 1024 * 1024
MAX_USER_ID = 128


@attr.s(auto_attribs=True)
class Call:
    """One ``/v1`` request on its way through the pipeline."""

    id: int
    started: float
    method: str
    subpath: bytes
    query: bytes = b""
    user: str = "anonymous"
    body: bytes = b""
    doc: dict[str, Any] | None = None
    stream: bool = False
    route: Route | None = None
    client_authorization: bytes | None = None
    strip_usage_chunk: bool = False
    status: int = 0
    usage: Usage | None = None
    usage_source: str = "none"
    first_byte: float | None = None
    cache: str = "NONE"
    error: str | None = None
    counter: IncrementalCounter | None = None
    forward_headers: list[tuple[bytes, list[bytes]]] = attr.Factory(list)

    @property
    def endpoint(self) -> str:
        return "/v1" + self.subpath.decode("latin-1")

    @property
    def model(self) -> str | None:
        if self.route is not None and self.route.model is not None:
            return self.route.model
        if self.doc is not None and isinstance(self.doc.get("model"), str):
            return self.doc["model"]
        return None


class SSEFilter:
    """Relays complete SSE events, minus those the meter holds back."""

    def __init__(self, meter: StreamMeter) -> None:
        self.meter = meter
        self.parser = SSEParser()

    def feed(self, data: bytes) -> bytes:
        events = self.parser.feed(data)
        if not events:
            return b""
        on_event = self.meter.on_event
        return b"".join(e.raw for e in events if on_event(e))

    def finish(self) -> bytes:
        tail = self.parser.flush()
        if tail is not None and self.meter.on_event(tail):
            return tail.raw
        return b""


def valid_user(value: str) -> bool:
    return 0 < len(value) <= MAX_USER_ID and value.isprintable() and value.strip() == value


class Proxy:
    """Relays ``/v1/*`` to the routed upstream and meters what passes.

    :param http: a treq ``HTTPClient`` over the service's own pool.
    :param encodings: ``model -> tiktoken Encoding | None``; ``None`` (not loaded
        yet) falls back to a rough count.
    """

    def __init__(
        self,
        settings: Settings,
        http: Any,
        clock: IReactorTime,
        ledger: Ledger,
        prices: PriceTable,
        encoding_for: Callable[[str], Any] = lambda model: None,
        on_settle: Callable[[Call, LedgerRow], None] = lambda call, row: None,
    ) -> None:
        self.settings = settings
        self.http = http
        self.clock = clock
        self.ledger = ledger
        self.prices = prices
        self.encoding_for = encoding_for
        self.on_settle = on_settle
        self.tz = ZoneInfo(settings.tz)
        self.in_flight: set[Deferred[Any]] = set()

    # -- the pipeline --

    async def handle(self, request: IRequest, subpath: bytes) -> bytes:
        """Serve one ``/v1`` request; the route's body."""
        call = Call(
            id=self.ledger.next_id(),
            started=self.clock.seconds(),
            method=request.method.decode("ascii", "replace"),
            subpath=subpath,
            query=request.uri.partition(b"?")[2],
        )
        request.setHeader(b"X-GreyFox-Request-Id", str(call.id).encode())
        try:
            self.parse(call, request)
            self.route(call)
            self.admit(call)
            response = await self.forward(call)
            await self.relay(call, response, request)
            return b""
        except ApiError as e:
            return self.refuse(call, request, e)
        except CancelledError:
            call.status, call.error = 499, "client disconnected"
            raise
        finally:
            self.settle(call)

    def parse(self, call: Call, request: IRequest) -> None:
        """Check credentials and the body; nothing reaches the upstream before this passes."""
        headers = request.requestHeaders
        call.forward_headers = request_headers(headers.getAllRawHeaders())
        call.client_authorization = headers.getRawHeaders(b"authorization", [None])[0]
        if self.settings.client_token is not None:
            token = bearer(call.client_authorization)
            if token is None or not _same(token, self.settings.client_token.encode()):
                raise errors.unauthorized()
        user = headers.getRawHeaders(b"x-app-user-id", [None])[0]
        if user is not None:
            user_text = user.decode("utf-8", "replace")
            if not valid_user(user_text):
                raise errors.bad_request(
                    f"X-App-User-Id must be 1 to {MAX_USER_ID} printable characters.", "invalid_user_id"
                )
            call.user = user_text

        limit = self.settings.max_body_bytes
        declared = headers.getRawHeaders(b"content-length", [None])[0]
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise errors.too_large(limit)
        content = request.content
        if content is not None:
            content.seek(0)
            call.body = content.read(limit + 1)
        if len(call.body) > limit:
            raise errors.too_large(limit)

        content_type = (headers.getRawHeaders(b"content-type", [b""])[0] or b"").decode("latin-1")
        is_json = _is_json(content_type)
        needs_json = call.method == "POST" and call.subpath in JSON_ENDPOINTS
        if needs_json and not is_json:
            raise errors.unsupported_media(content_type)
        if not (is_json and call.body):
            if needs_json:
                raise errors.bad_request("The request body is empty; send a JSON object.", "invalid_json")
            return
        try:
            doc = json.loads(call.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.bad_request(f"The request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(doc, dict):
            raise errors.bad_request("The request body must be a JSON object.", "invalid_json")
        call.doc = doc
        if needs_json:
            model = doc.get("model")
            if not isinstance(model, str) or not model:
                raise errors.bad_request("You must provide a model parameter.", "missing_model", "model")
        call.stream = doc.get("stream") is True

    def route(self, call: Call) -> None:
        """Pick the upstream; rewrite the body for it (prefix removed, usage asked for)."""
        s = self.settings
        doc = call.doc
        model = doc.get("model") if doc is not None else None
        call.route = resolve(model if isinstance(model, str) else None, s.upstreams, s.default_upstream)
        if doc is None:
            return
        changed = False
        if call.route.prefixed:
            doc = dict(doc, model=call.route.model)
            changed = True
        if call.stream and call.subpath in USAGE_CHUNK_ENDPOINTS and call.route.upstream.stream_usage:
            options = doc.get("stream_options")
            options = options if isinstance(options, dict) else {}
            if not options.get("include_usage"):
                doc = dict(doc, stream_options=dict(options, include_usage=True))
                call.strip_usage_chunk = True
                changed = True
        if changed:
            call.doc = doc
            call.body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def admit(self, call: Call) -> None:
        """Quota admission (reserve before the upstream is paid).  No limits yet."""

    async def forward(self, call: Call) -> Any:
        """Send the request upstream; the response once its headers arrive."""
        assert call.route is not None
        upstream = call.route.upstream
        headers = Headers()
        for name, values in call.forward_headers:
            headers.setRawHeaders(name, values)
        auth = upstream_authorization(upstream, call.client_authorization, self.settings.client_token is not None)
        if auth is not None:
            headers.setRawHeaders(b"authorization", [auth])
        url = upstream_url(upstream, call.subpath, call.query)
        d = self.http.request(
            call.method,
            url,
            headers=headers,
            data=call.body or None,
            unbuffered=True,
            allow_redirects=False,
        )
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self.clock.callLater(self.settings.read_timeout, expire)
        try:
            return await d
        except CancelledError:
            if timed_out:
                raise errors.gateway_timeout(
                    f"Upstream {upstream.name!r} sent no response headers within "
                    f"{self.settings.read_timeout:g} s (GREYFOX_READ_TIMEOUT)."
                ) from None
            raise
        except ConnectTimeout:
            raise errors.gateway_timeout(
                f"Upstream {upstream.name!r} did not accept a connection within "
                f"{self.settings.connect_timeout:g} s (GREYFOX_CONNECT_TIMEOUT)."
            ) from None
        except (ConnectError, DNSLookupError, ResponseNeverReceived, ResponseFailed) as e:
            if timed_out:
                raise errors.gateway_timeout(
                    f"Upstream {upstream.name!r} sent no response headers within "
                    f"{self.settings.read_timeout:g} s (GREYFOX_READ_TIMEOUT)."
                ) from None
            raise errors.bad_gateway(f"Upstream {upstream.name!r} is unreachable: {_describe(e)}") from None
        finally:
            if timer.active():
                timer.cancel()

    async def relay(self, call: Call, response: Any, request: IRequest) -> None:
        """Copy status, headers and body to the client as they arrive."""
        call.status = response.code
        request.setResponseCode(response.code)
        for name, values in response_headers(response.headers.getAllRawHeaders()):
            request.responseHeaders.setRawHeaders(name, values)
        content_type = (response.headers.getRawHeaders(b"content-type", [b""])[0] or b"").lower()
        enc = self.encoding_for(call.model or "")
        call.counter = IncrementalCounter(enc)
        meter: StreamMeter | None = None
        body: PassThrough | None = None
        if content_type.startswith(b"text/event-stream"):
            meter = StreamMeter(call.counter, call.strip_usage_chunk)
            chunk_filter: Any = SSEFilter(meter)
        else:
            body = PassThrough(keep=KEEP_BODY_BYTES if b"json" in content_type else 0)
            chunk_filter = body

        def first_byte() -> None:
            call.first_byte = self.clock.seconds()

        pump = BodyPump(request, chunk_filter, self.clock, self.settings.stream_idle_timeout, first_byte)
        response.deliverBody(pump)
        try:
            await pump.done
        except StreamIdle:
            call.error = f"stream idle for {self.settings.stream_idle_timeout:g} s (GREYFOX_STREAM_IDLE_TIMEOUT)"
            log.info("request {id}: {error}; stream ended", id=call.id, error=call.error)
        except ClientGone:
            call.status, call.error = 499, "client disconnected"
            raise CancelledError() from None
        except ResponseFailed as e:
            call.error = f"upstream dropped the response: {_describe(e)}"
            log.info("request {id}: {error}", id=call.id, error=call.error)
        finally:
            self._take_usage(call, meter, body)

    def _take_usage(self, call: Call, meter: StreamMeter | None, body: PassThrough | None) -> None:
        """The upstream's usage if it sent one; otherwise our own count."""
        if meter is not None and meter.usage is not None:
            call.usage, call.usage_source = meter.usage, "upstream"
            return
        if body is not None:
            kept = body.kept()
            usage = usage_from_body(kept) if kept else None
            if usage is not None:
                call.usage, call.usage_source = usage, "upstream"
                return
            if call.status >= 400 or not kept:
                return
            _feed_completion_text(call, kept)
        if call.doc is None or call.counter is None or call.status >= 400:
            return
        if meter is None and call.counter.total == 0 and call.subpath != b"/embeddings":
            return
        enc = self.encoding_for(call.model or "")
        call.usage = Usage(estimate_prompt_tokens(enc, call.doc), call.counter.total)
        call.usage_source = "estimated"

    def refuse(self, call: Call, request: IRequest, error: ApiError) -> bytes:
        """Answer with GreyFox's own OpenAI-shaped error."""
        call.status = error.status
        call.error = error.message
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", b"application/json")
        for name, value in error.headers:
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        body = error.to_bytes()
        request.setHeader(b"content-length", str(len(body)).encode())
        return body

    def settle(self, call: Call) -> None:
        """Queue the ledger row.  Runs for every request, whatever happened."""
        now = self.clock.seconds()
        usage = call.usage or Usage()
        model = call.model
        if call.usage is None:
            cost: float | None = 0.0
        else:
            cost = self.prices.cost(model or "", usage)
        row = LedgerRow(
            id=call.id,
            ts=call.started,
            day=self.day_of(call.started),
            user=call.user,
            endpoint=call.endpoint,
            upstream=call.route.upstream.name if call.route is not None else None,
            model=model,
            stream=call.stream,
            status=call.status,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            total_tokens=usage.total_tokens,
            cost_usd=cost,
            cache=call.cache,
            latency_ms=round((now - call.started) * 1000, 3),
            ttfb_ms=round(((call.first_byte or now) - call.started) * 1000, 3),
            usage_source=call.usage_source,
            error=call.error,
        )
        self.ledger.record(row)
        self.on_settle(call, row)

    def day_of(self, ts: float) -> str:
        return datetime.fromtimestamp(ts, self.tz).date().isoformat()


def _feed_completion_text(call: Call, body: bytes) -> None:
    """Count the generated text of a JSON answer that came without ``usage``."""
    try:
        doc = json.loads(body)
    except ValueError:
        return
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list) or call.counter is None:
        return
    for choice in choices:
        if isinstance(choice, dict):
            if isinstance(choice.get("text"), str):
                call.counter.feed(choice["text"])
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                call.counter.feed(message["content"])


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _same(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)


def _describe(e: BaseException) -> str:
    """A short reason, without tracebacks; unwraps twisted.web's failure lists."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]
