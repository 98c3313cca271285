# -*- test-case-name: tests.test_proxy -*-
"""The request path: parse -> route -> cache -> admit -> forward -> relay -> settle.

Each stage is a method with one job.  Forward and relay belong to a
:class:`~greyfox._flight.Flight`, which identical requests share.  Nothing
here waits on the database before the upstream is called: the ledger row is
queued at the end (:meth:`Proxy.settle`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable

import attr
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from . import _errors as errors, _json
from ._config import Settings
from ._errors import ApiError
from ._pricing import PriceTable
from ._cache import Cache, CacheEntry, Nearest
from ._cachekey import SHARED, canonical_request, credential_scope, key_of
from ._flight import Flight
from ._routing import (
    Fields, Route, as_fields, bearer, first_value, forwarded_fields, path_problem, resolve, upstream_authorization,
    upstream_url,
)
from ._relay import BrokenOff
from ._store import Ledger, LedgerRow
from ._watchdog import Watchdog
from ._quota import LeaseShort, Quotas, Refused, Reservation, conversation_fingerprint, duration
from ._tokens import THREADED_COUNT_BYTES, estimate_prompt_tokens
from ._usage import Usage

log = Logger()

#: The Anthropic Messages API's paths (after ``/v1``): routed to an ``anthropic`` upstream,
#: answered with Anthropic-shaped errors.
MESSAGES_PATHS = frozenset({b"/messages", b"/messages/count_tokens"})
#: Endpoints whose body must be JSON with a model (and whose answers are cached).
JSON_ENDPOINTS = frozenset({b"/chat/completions", b"/completions", b"/embeddings", b"/responses"}) | MESSAGES_PATHS
#: Endpoints that cost nothing: no tokens reserved, no loop counted.
FREE_ENDPOINTS = frozenset({b"/messages/count_tokens"})
#: Streams for which GreyFox asks the upstream for a usage chunk.
USAGE_CHUNK_ENDPOINTS = frozenset({b"/chat/completions", b"/completions"})
MAX_USER_ID = 128
#: The methods the OpenAI and Anthropic APIs use; any other (TRACE, CONNECT, ...) is refused, never relayed.
RELAYED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
#: Sent to an Anthropic upstream when the client names no version.
ANTHROPIC_VERSION = b"2023-06-01"


@attr.s(auto_attribs=True, slots=True)
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
    #: The API the client speaks (by path): ``openai``, or ``anthropic`` for the Messages API.
    api: str = "openai"
    #: The client's own credential header, ``(name, value)``: passed through to an upstream without a key.
    client_credential: tuple[bytes, bytes] | None = None
    strip_usage_chunk: bool = False
    status: int = 0
    usage: Usage | None = None
    usage_source: str = "none"
    first_byte: float | None = None
    cache: str = "NONE"
    error: str | None = None
    #: The request's header fields by lower-cased name (read once, in parse).
    headers: Fields = attr.Factory(dict)
    forward_headers: list[tuple[bytes, list[bytes]]] = attr.Factory(list)
    # cache plan (see Proxy.plan_cache)
    key: str | None = None
    #: The canonical request the key is made of (kept with a stored answer).
    canonical: bytes | None = None
    read_scopes: tuple[str, ...] = ()
    write_scope: str = SHARED
    lookup: bool = False
    store: bool = False
    replay: bool = False
    flight: Any = None
    reservation: Reservation | None = None
    prompt_estimate: int | None = None  # our count of the prompt, when admission needed one
    #: The model as the upstream knows it (prefix removed), once parsed and routed.
    model: str | None = None
    #: The upstream call's timer, from the request sent until its body ends (see forward).
    watchdog: Watchdog | None = None

    @property
    def endpoint(self) -> str:
        return "/v1" + self.subpath.decode("latin-1")

    @property
    def free(self) -> bool:
        """Whether the endpoint costs nothing (``count_tokens``): no tokens reserved, counted or looped on."""
        return self.subpath in FREE_ENDPOINTS

    @property
    def asks_for_usage(self) -> bool:
        """Whether the body sent upstream asks for the usage chunk at a stream's end."""
        options = self.doc.get("stream_options") if self.doc is not None else None
        return isinstance(options, dict) and bool(options.get("include_usage"))

    @property
    def wants_usage_chunk(self) -> bool:
        """Whether the client itself asked for it (not GreyFox on its behalf)."""
        return self.asks_for_usage and not self.strip_usage_chunk


@attr.s(auto_attribs=True, frozen=True)
class ReplayMiss:
    """A request replay mode could not answer, and the recorded request nearest to it."""

    upstream: str | None
    path: str
    model: str | None
    #: ``None`` for a request that is never cached (not a JSON endpoint).
    key: str | None
    nearest: Nearest | None


def valid_user(value: str) -> bool:
    return 0 < len(value) <= MAX_USER_ID and value.isprintable() and value.strip() == value


class Proxy:
    """Relays ``/v1/*`` to the routed upstream and meters what passes.

    :param http: the service's :class:`~greyfox._upstream.UpstreamClient`.
    :param encoding_for: ``model -> tiktoken Encoding | None``; ``None`` (not loaded
        yet) falls back to a rough count.
    :param run_in_thread: ``(f, *args) -> Deferred``: runs a large prompt's
        count off the reactor thread (the service uses the reactor's pool).
    :param load_encodings: ``() -> Deferred`` that fires once the tokenizers
        are loaded (or failed to load).
    :param on_count_difference: told, for each stream with upstream usage,
        our count of its completion tokens minus the upstream's.
    """

    def __init__(
        self,
        settings: Settings,
        http: Any,
        clock: IReactorTime,
        ledger: Ledger,
        prices: PriceTable,
        cache: Cache,
        secret: bytes,
        quotas: Quotas,
        encoding_for: Callable[[str], Any] = lambda model: None,
        on_settle: Callable[[Call, LedgerRow], None] = lambda call, row: None,
        run_in_thread: Callable[..., Deferred[Any]] = lambda f, *args: maybeDeferred(f, *args),
        load_encodings: Callable[[], Deferred[None]] = lambda: succeed(None),
        on_count_difference: Callable[[int], None] = lambda difference: None,
        on_replay_miss: Callable[[ReplayMiss], None] = lambda miss: None,
        renew_leases: Callable[[], Deferred[None]] = lambda: succeed(None),
    ) -> None:
        self.settings = settings
        self.http = http
        self.clock = clock
        self.ledger = ledger
        self.prices = prices
        self.cache = cache
        self.secret = secret
        self.quotas = quotas
        self.encoding_for = encoding_for
        self.on_settle = on_settle
        self.run_in_thread = run_in_thread
        self.load_encodings = load_encodings
        self.on_count_difference = on_count_difference
        self.on_replay_miss = on_replay_miss
        #: Asks the database for larger leases of the daily limits (instances sharing one; see greyfox._leases).
        self.renew_leases = renew_leases
        #: This instance's name in its ledger rows (the service names it once it listens, if the settings do not).
        self.instance: str | None = settings.instance
        #: Requests not answered yet: their Deferreds (see :meth:`handle`), and
        #: their calls by id (``/api/inflight``).
        self.in_flight: set[Deferred[Any]] = set()
        self.calls: dict[int, Call] = {}
        #: Our own counts of long answers, running in threads: their ledger rows wait for them.
        self.counting: set[Deferred[Any]] = set()
        self.flights: dict[str, Flight] = {}

    # -- the pipeline --

    def handle(self, request: IRequest, subpath: bytes) -> bytes | Deferred[bytes]:
        """Serve one ``/v1`` request.

        The body to finish the response with (``b""`` when the response was
        written already), once the call's ledger row is queued: at once for a
        cache hit from memory or a refusal, else as a Deferred, which is in
        :attr:`in_flight` until it fires (a shutdown waits for it, and
        cancels it when the grace runs out).
        """
        call = Call(
            id=self.ledger.next_id(),
            started=self.clock.seconds(),
            method=request.method.decode("ascii", "replace"),
            subpath=subpath,
            query=request.uri.partition(b"?")[2],
        )
        if subpath in MESSAGES_PATHS:
            call.api = "anthropic"
        try:
            outcome = self._begin(call, request)
        except ApiError as e:
            outcome = self.refuse(call, request, e)
        except Exception:
            log.failure("request to {path} failed", path=request.path.decode("latin-1", "replace"))
            outcome = self.refuse(call, request, errors.internal_error())
        if isinstance(outcome, bytes):
            self._account(call)
            return outcome
        self.calls[call.id] = call
        self.in_flight.add(outcome)

        def done(body: bytes | None) -> bytes:
            del self.calls[call.id]
            self.in_flight.discard(outcome)
            self._account(call)
            return body or b""

        def failed(failure: Failure) -> Any:
            del self.calls[call.id]
            self.in_flight.discard(outcome)
            if getattr(request, "channel", None) is None:  # the client left: nothing to answer
                if failure.check(CancelledError):
                    call.status, call.error = 499, "client disconnected"
                self._account(call)
                return failure  # (Klein drops a CancelledError once the request is gone)
            if failure.check(ApiError):
                error = failure.value
            elif failure.check(BrokenOff):
                error = errors.bad_gateway(f"The upstream's answer broke off: {failure.value}.")
            elif failure.check(CancelledError):  # a shutdown that ran out of grace
                error = ApiError(503, "GreyFox shut down before the answer was complete; retry.", "server_error",
                                 "shutting_down")
            else:
                log.failure("request to {path} failed", failure, path=request.path.decode("latin-1", "replace"))
                error = errors.internal_error()
            if not request.startedWriting:
                body = self.refuse(call, request, error)
                self._account(call)
                return body
            # The answer began: the client must not take what it got for a whole
            # one.  What was written (a stream's last event says why) goes out,
            # then the connection closes without the response's end; Klein
            # cancels the Deferred returned here once the connection is gone.
            if call.error is None:
                call.error = error.message
            self._account(call)
            request.channel.loseConnection()
            return Deferred()

        return outcome.addCallbacks(done, failed)

    def _begin(self, call: Call, request: IRequest) -> bytes | Deferred[None]:
        """The pipeline up to the answer: ``b""`` when answered now, else a Deferred of its end."""
        self.parse(call, request)
        self.route(call)
        self.plan_cache(call, request)
        entry = self.cache.lookup(call.key, call.read_scopes) if call.lookup else None
        if entry is not None:
            body = self.cache.hot_body(entry)
            if body is not None:
                self.serve_hit(call, request, entry, body)
                return b""
            return ensureDeferred(self.cache.body(entry)).addCallback(self._cold_hit, call, request, entry)
        return self._relay(call, request)

    def _cold_hit(self, body: Any, call: Call, request: IRequest, entry: Any) -> bytes | Deferred[None]:
        """The entry's body was read from the database (or had gone: relay instead)."""
        if body is not None:
            self.serve_hit(call, request, entry, body)
            return b""
        return self._relay(call, request)

    def _relay(self, call: Call, request: IRequest) -> Deferred[None]:
        """Answer from the upstream: a new flight, or one already in the air for the same request."""
        if call.replay:
            return self._replay_miss(call)
        flight = self.joinable_flight(call)
        if flight is not None:
            call.cache = "HIT"
            return self._ride(call, request, flight, leader=False)
        doc = call.doc
        if doc is not None and len(call.body) > THREADED_COUNT_BYTES and self.quotas.counts_tokens(call.user):
            enc = self.encoding_for(call.model or "")
            if enc is not None:  # (without one the count is a rough, cheap one)
                counting = self.run_in_thread(estimate_prompt_tokens, enc, doc)
                return counting.addCallback(lambda prompt: self._lead(call, request, prompt))
        return self._lead(call, request, None)

    def _replay_miss(self, call: Call) -> Deferred[None]:
        """Fail with a ``cache_miss`` that names the nearest recorded request and what differs."""
        assert call.route is not None and call.key is not None and call.canonical is not None
        path = call.subpath.decode("latin-1")

        def explain(found: Nearest | None) -> None:
            self.on_replay_miss(ReplayMiss(call.route.upstream.name, path, call.model, call.key, found))
            raise errors.cache_miss(call.key, nearest=found)

        def unexplained(failure: Failure) -> None:
            failure.trap(Exception)
            log.warn("could not look for the request nearest to a replay miss: {e}", e=failure.getErrorMessage())
            explain(None)

        looked = self.cache.nearest(call.route.upstream.name, path, call.read_scopes, call.canonical)
        return looked.addCallbacks(explain, unexplained)

    def _lead(self, call: Call, request: IRequest, prompt: int | None, waited: bool = False) -> Deferred[None]:
        """Admit the request and start its own upstream call (once this
        instance's lease of the limits has room for it, if it shares them)."""
        try:
            self.admit(call, prompt, waited)
        except LeaseShort:
            return self.renew_leases().addCallback(lambda _: self._lead(call, request, call.prompt_estimate, True))
        return self._ride(call, request, self.new_flight(call), leader=True)

    def _ride(self, call: Call, request: IRequest, flight: Flight, leader: bool) -> Deferred[None]:
        """Answer this client from ``flight``; fires when its response is complete."""
        subscriber = flight.subscribe(request, call)
        if leader:
            flight.start()  # after subscribing: even an instant failure reaches this client
        return subscriber.done  # (fires with None: the response is written)

    def _account(self, call: Call) -> None:
        """Queue the ledger row now, or when the shared upstream call knows the usage."""
        if call.flight is not None:
            call.flight.settle_after(call)
        else:
            self.settle(call)

    def parse(self, call: Call, request: IRequest) -> None:
        """Check the path, credentials and the body; nothing reaches the upstream before this passes."""
        if call.method not in RELAYED_METHODS:
            raise ApiError(405, f"{call.method} is not relayed.", "invalid_request_error", "method_not_allowed",
                           headers=(("Allow", ", ".join(sorted(RELAYED_METHODS))),))
        problem = path_problem(call.subpath + (b"?" + call.query if call.query else b""))
        if problem is not None:
            raise errors.bad_request(f"Invalid path /v1{call.subpath.decode('latin-1')}: {problem}.", "invalid_path")
        headers = call.headers = _fields_of(request)
        call.forward_headers = forwarded_fields(headers)
        authorization = first_value(headers, b"authorization")
        api_key = first_value(headers, b"x-api-key") if call.api == "anthropic" else None
        if api_key is not None:  # (the Anthropic SDK's header; Claude Code may send a bearer token instead)
            call.client_credential = (b"x-api-key", api_key)
        elif authorization is not None:
            call.client_credential = (b"Authorization", authorization)
        token_user = self.authenticate(api_key if api_key is not None else bearer(authorization))
        user = first_value(headers, b"x-app-user-id")
        if token_user is not None:  # a user's own token: that user, whatever the header says
            call.user = token_user
        elif user is not None:
            user_text = user.decode("utf-8", "replace")
            if not valid_user(user_text):
                raise errors.bad_request(
                    f"X-App-User-Id must be 1 to {MAX_USER_ID} printable characters.", "invalid_user_id"
                )
            call.user = user_text

        limit = self.settings.max_body_bytes
        declared = first_value(headers, b"content-length")
        if (declared is not None and declared.isdigit() and int(declared) > limit) or getattr(
            request, "body_too_large", False
        ):
            raise errors.too_large(limit)
        if request.content is not None:
            request.content.seek(0)
            call.body = request.content.read(limit + 1)
        if len(call.body) > limit:
            raise errors.too_large(limit)

        content_type = (first_value(headers, b"content-type") or b"").decode("latin-1")
        is_json = _is_json(content_type)
        needs_json = call.method == "POST" and call.subpath in JSON_ENDPOINTS
        if needs_json and not is_json:
            raise errors.unsupported_media(content_type)
        if not (is_json and call.body):
            if needs_json:
                raise errors.bad_request("The request body is empty; send a JSON object.", "invalid_json")
            return
        try:
            doc = _json.loads_request(call.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.bad_request(f"The request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(doc, dict):
            raise errors.bad_request("The request body must be a JSON object.", "invalid_json")
        call.doc = doc
        model = doc.get("model")
        if isinstance(model, str):
            call.model = model
        if needs_json and not call.model:
            raise errors.bad_request("You must provide a model parameter.", "missing_model", "model")
        call.stream = doc.get("stream") is True

    def authenticate(self, token: bytes | None) -> str | None:
        """The user a client token names (``None`` for GreyFox's shared one);
        raises 401 when tokens are required and this is none of them."""
        s = self.settings
        if not s.tokens_required:
            return None
        named = None
        for user_token, user in s.user_tokens.items():  # (every one compared: the time says nothing)
            if token is not None and _same(token, user_token.encode()):
                named = user
        if named is not None:
            return named
        if token is not None and s.client_token is not None and _same(token, s.client_token.encode()):
            return None
        raise errors.unauthorized()

    def route(self, call: Call) -> None:
        """Pick the upstream; rewrite the body for it (prefix removed, usage asked for)."""
        s = self.settings
        doc = call.doc
        default = s.default_upstream if call.api == "openai" else "anthropic"
        call.route = resolve(call.model, s.upstreams, default, call.api)  # (parse set it from the body)
        call.model = call.route.model
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
        if call.route.upstream.name == "openrouter" and "usage" not in doc and call.subpath in USAGE_CHUNK_ENDPOINTS:
            doc = dict(doc, usage={"include": True})  # OpenRouter's usage accounting: its own cost in the usage
            changed = True
        if changed:
            call.doc = doc
            call.body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def plan_cache(self, call: Call, request: IRequest) -> None:
        """Decide whether this request may be answered from, or stored in, the cache."""
        headers = call.headers
        mode = self.settings.mode
        if (first_value(headers, b"x-greyfox-mode") or b"").strip().lower() == b"replay":
            mode = "replay"
        call.replay = mode == "replay"
        cacheable = call.method == "POST" and call.subpath in JSON_ENDPOINTS and call.doc is not None
        if not cacheable or mode == "passthrough":
            call.cache = "BYPASS"
            if call.replay and not cacheable:
                self.on_replay_miss(ReplayMiss(call.route.upstream.name if call.route else None,
                                               call.subpath.decode("latin-1"), call.model, None, None))
                raise errors.cache_miss(None, "only the JSON endpoints are cached")
            return
        assert call.route is not None
        upstream = call.route.upstream
        call.canonical = canonical_request(call.doc)
        call.key = key_of(upstream.name, call.subpath.decode("latin-1"), call.canonical)
        credential = None
        if not upstream.has_key and not self.settings.tokens_required:
            credential = call.client_credential[1] if call.client_credential is not None else None
        if credential:
            call.write_scope = credential_scope(self.secret, credential)
            call.read_scopes = (call.write_scope, SHARED)
        else:
            call.write_scope, call.read_scopes = SHARED, (SHARED,)
        control = (first_value(headers, b"x-greyfox-cache") or b"").strip().lower()
        cache_control = headers.get(b"cache-control")
        directives = {d.strip().lower() for v in cache_control[1] for d in v.split(b",")} if cache_control else ()
        if control == b"bypass":
            call.cache = "BYPASS"
        elif control == b"refresh" or b"no-cache" in directives:
            call.cache, call.store = "REFRESH", True
        else:
            call.cache, call.lookup, call.store = "MISS", True, True
        if b"no-store" in directives:
            call.store = False
        if call.replay:
            call.lookup, call.store = True, False

    def serve_hit(self, call: Call, request: IRequest, entry: Any, body: Any) -> None:
        """Answer from the cache."""
        data = body.for_client(call.wants_usage_chunk)
        now = self.clock.seconds()
        call.cache, call.first_byte = "HIT", now
        call.usage, call.usage_source = entry.usage, "upstream"
        headers = [(b"Content-Type", [entry.content_type.encode("latin-1")]), (b"Age", [b"%d" % max(0, int(now - entry.created))])]
        self.respond(call, request, 200, headers, len(data))
        request.write(data)

    def joinable_flight(self, call: Call) -> Flight | None:
        """An identical request already in the air that this one may share."""
        if not call.lookup or call.key is None:
            return None
        for scope in call.read_scopes:
            flight = self.flights.get(f"{scope}:{call.key}")
            if flight is not None and flight.joinable:
                return flight
        return None

    def new_flight(self, call: Call) -> Flight:
        """The upstream call of ``call``, joinable by identical requests until it ends."""
        entry_id = f"{call.write_scope}:{call.key}" if call.key is not None else None
        flight = Flight(self, call, entry_id, store=call.store)
        if entry_id is not None and call.lookup:
            self.flights[entry_id] = flight
        return flight

    def flight_ended(self, flight: Flight) -> None:
        if flight.entry_id is not None and self.flights.get(flight.entry_id) is flight:
            del self.flights[flight.entry_id]

    def admit(self, call: Call, prompt: int | None = None, waited: bool = False) -> None:
        """Reserve the request's worst case against every limit, before the upstream is paid.

        :param prompt: the prompt's tokens when already counted (in a thread,
            for a large body); else they are counted here.
        :param waited: the leases were renewed for this request (see :meth:`Quotas.admit`).
        """
        quotas = self.quotas
        user, now = call.user, self.clock.seconds()
        tokens, usd, fingerprint = 0, 0.0, None
        doc = call.doc
        if doc is not None and not call.free:
            fingerprint = conversation_fingerprint(call.model, doc)
            if quotas.counts_tokens(user):
                if prompt is None:
                    prompt = estimate_prompt_tokens(self.encoding_for(call.model or ""), doc)
                call.prompt_estimate = prompt
                completion = _max_output(doc, call.subpath, self.settings.default_max_tokens)
                tokens = prompt + completion
                if quotas.daily_budget_usd:  # (dollars are reserved only against a budget)
                    usd = self._price(call, Usage(prompt, completion))[0] or 0.0
        try:
            call.reservation = quotas.admit(user, tokens, usd, fingerprint, now, waited)
        except Refused as r:
            if r.code == "runaway_loop":
                log.warn("runaway-loop breaker: {message}", message=r.message)
            headers = [("Retry-After", str(max(1, math.ceil(r.retry_after)))), ("x-should-retry", "false"),
                       ("X-RateLimit-Reset-Tokens", duration(r.retry_after))]
            if r.limit is not None:
                headers.append(("X-RateLimit-Limit-Tokens", str(r.limit)))
            if r.remaining is not None:
                headers.append(("X-RateLimit-Remaining-Tokens", str(r.remaining)))
            raise ApiError(429, r.message, "quota_exceeded", r.code, headers=tuple(headers)) from None

    def inflight(self) -> list[dict[str, Any]]:
        """Every request not answered yet, with the tokens of its answer so far."""
        now = self.clock.seconds()
        out = []
        for call in self.calls.values():
            tokens = call.flight.tokens if call.flight is not None else 0
            streaming = now - call.first_byte if call.first_byte is not None else 0.0
            out.append({
                "id": call.id, "user": call.user, "model": call.model, "endpoint": call.endpoint,
                "upstream": call.route.upstream.name if call.route is not None else None,
                "started": call.started, "tokens": tokens,
                "tokens_per_s": round(tokens / streaming, 1) if streaming > 0 else 0.0, "cache": call.cache,
            })
        return out

    def counted_on(self, counting: Deferred[Any]) -> Deferred[Any]:
        """``counting``, a count some ledger rows wait for, kept in :attr:`counting`
        until it fires: a shutdown waits for those before it closes the database."""
        self.counting.add(counting)

        def done(result: Any) -> Any:
            self.counting.discard(counting)
            return result

        return counting.addBoth(done)

    def over_limit(self, call: Call, completion: int, waited: bool = False) -> str | None:
        """The code of the limit a running stream's tokens so far (its prompt as
        admitted, ``completion`` produced) carry its user or the day past
        (:data:`WAIT_FOR_LEASE`: see :meth:`Quotas.overrun`)."""
        assert call.reservation is not None
        prompt = call.prompt_estimate or 0
        usd = 0.0
        if self.quotas.daily_budget_usd:
            usd = self._price(call, Usage(prompt, completion))[0] or 0.0
        return self.quotas.overrun(call.reservation, prompt + completion, usd, waited)

    def store_answer(self, call: Call, entry_id: str, stream: bool, content_type: str, body: bytes,
                     usage: Usage | None) -> None:
        """Keep a complete ``200`` answer in the cache under ``entry_id`` (``scope:key``)."""
        assert call.route is not None
        scope, _, key = entry_id.partition(":")
        now = self.clock.seconds()
        known = usage or Usage()
        cost, source = self._price(call, usage) if usage else (None, None)
        self.cache.store(CacheEntry(
            key=key, scope=scope, upstream=call.route.upstream.name, path=call.subpath.decode("latin-1"),
            model=call.model, stream=stream, status=200, content_type=content_type, created=now, last_used=now,
            prompt_tokens=known.prompt_tokens, completion_tokens=known.completion_tokens,
            cached_tokens=known.cached_tokens, cost_usd=cost, cache_write_tokens=known.cache_write_tokens,
            reasoning_tokens=known.reasoning_tokens, cost_source=source,
        ), body, call.canonical)

    def _price(self, call: Call, usage: Usage) -> tuple[float | None, str | None]:
        """``(dollars, cost_source)`` of ``usage`` for the model and upstream of ``call``."""
        upstream = call.route.upstream.name if call.route is not None else ""
        return self.prices.priced(upstream, call.model or "", usage, call.started)

    def on_stream_counted(self, call: Call, upstream_completion: int, counter: Any) -> None:
        """A stream came with the upstream's usage: how far our count of it was off."""
        counter.resolve(self.encoding_for(call.model or ""))
        if counter.exact:
            self.on_count_difference(counter.total - upstream_completion)

    def respond(self, call: Call, request: IRequest, status: int, headers: Iterable[tuple[bytes, list[bytes]]] = (),
                length: int | None = None, quota_headers: bool = True, cache_header: bool = True) -> None:
        """The one place a ``/v1`` response's status and headers are set.

        ``headers`` first (the upstream's, or the answer's own), then
        GreyFox's, which an upstream cannot override: the request id, the
        cache outcome, the user's remaining daily tokens.
        """
        call.status = status
        request.setResponseCode(status)
        for name, values in headers:
            request.responseHeaders.setRawHeaders(name, values)
        if length is not None:
            request.setHeader(b"Content-Length", b"%d" % length)
        request.setHeader(b"X-GreyFox-Request-Id", b"%d" % call.id)
        if cache_header and call.cache != "NONE":
            request.setHeader(b"X-GreyFox-Cache", call.cache.encode())
        if quota_headers:
            remaining = self.quotas.remaining(call.user, self.clock.seconds())
            if remaining is not None:
                request.setHeader(b"X-RateLimit-Remaining-Tokens", b"%d" % remaining)

    def forward(self, call: Call) -> Deferred[Any]:
        """Send the request upstream.

        Fires with the response once its headers arrive, or fails with the
        :class:`ApiError` the client will see (``CancelledError`` when the
        call was cancelled); cancelling it aborts the call.  With the
        response, ``call.watchdog`` is left running for the body to time its
        own silences on (one DelayedCall for the call).
        """
        assert call.route is not None
        upstream = call.route.upstream
        headers = Headers(dict(call.forward_headers))
        auth = upstream_authorization(upstream, call.client_credential, self.settings.tokens_required)
        if auth is not None:
            headers.setRawHeaders(auth[0], [auth[1]])
        if upstream.api == "anthropic" and not headers.hasHeader(b"anthropic-version"):
            headers.setRawHeaders(b"anthropic-version", [ANTHROPIC_VERSION])
        url = upstream_url(upstream, call.subpath, call.query)
        why: list[str] = []  # why it was cancelled, if it was: "timeout" or "cancelled"

        def expire() -> None:
            why.append("timeout")
            sending.cancel()

        s = self.settings
        watchdog = call.watchdog = Watchdog(self.clock, s.read_timeout, expire, look_within=s.stream_idle_timeout)

        def failed(failure: Failure) -> Failure:
            call.watchdog = None
            watchdog.stop()
            return Failure(self._forward_error(failure.value, upstream.name, why[0] if why else None))

        def cancel(d: Deferred[Any]) -> None:
            why.append("cancelled")
            sending.cancel()

        sending = self.http.request(call.method, url, headers, call.body or None)
        answer: Deferred[Any] = Deferred(cancel)
        sending.addErrback(failed).chainDeferred(answer)
        return answer

    def _forward_error(self, e: BaseException, upstream: str, cancelled: str | None) -> BaseException:
        """What a client is told when its upstream call failed before the response headers."""
        if cancelled == "timeout":
            return errors.gateway_timeout(
                f"Upstream {upstream!r} sent no response headers within "
                f"{self.settings.read_timeout:g} s (GREYFOX_READ_TIMEOUT)."
            )
        if cancelled is not None:
            return CancelledError()
        if isinstance(e, ConnectTimeout):
            return errors.gateway_timeout(
                f"Upstream {upstream!r} did not accept a connection within "
                f"{self.settings.connect_timeout:g} s (GREYFOX_CONNECT_TIMEOUT)."
            )
        if isinstance(e, (ConnectError, DNSLookupError, ResponseFailed, RequestTransmissionFailed)):
            return errors.bad_gateway(f"Upstream {upstream!r} is unreachable: {errors.describe_failure(e)}")
        return e

    def refuse(self, call: Call, request: IRequest, error: ApiError) -> bytes:
        """Answer with GreyFox's own OpenAI-shaped error."""
        call.error = error.message
        body = error.to_anthropic_bytes() if call.api == "anthropic" else error.to_bytes()
        request.responseHeaders.removeHeader(b"content-length")  # (the upstream's, if its headers were set)
        headers = [(b"Content-Type", [b"application/json"])]
        headers += [(name.encode("latin-1"), [value.encode("latin-1")]) for name, value in error.headers]
        self.respond(call, request, error.status, headers, len(body), quota_headers=False, cache_header=call.key is not None)
        return body

    def settle(self, call: Call) -> None:
        """Queue the ledger row.  Runs for every request, whatever happened."""
        now = self.clock.seconds()
        usage = call.usage or Usage()
        model = call.model
        cost, source = (0.0, None) if call.usage is None else self._price(call, usage)
        saved_tokens, saved_usd = 0, 0.0
        if call.cache == "HIT":
            saved_tokens, saved_usd, cost = usage.total_tokens, cost or 0.0, 0.0
        if call.reservation is not None:
            charged = call.usage is not None and call.cache != "HIT"
            self.quotas.settle(call.reservation, usage.total_tokens if charged else 0, (cost or 0.0) if charged else 0.0)
        row = LedgerRow(
            id=call.id,
            ts=call.started,
            day=self.quotas.day_of(call.started),
            user=call.user,
            endpoint=call.endpoint,
            upstream=call.route.upstream.name if call.route is not None else None,
            model=model,
            stream=call.stream,
            status=call.status,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            total_tokens=usage.total_tokens,
            cost_usd=cost,
            cost_source=source,
            cache=call.cache,
            saved_tokens=saved_tokens,
            saved_usd=saved_usd,
            latency_ms=round((now - call.started) * 1000, 3),
            ttfb_ms=round(((call.first_byte or now) - call.started) * 1000, 3),
            usage_source=call.usage_source,
            error=call.error,
            instance=self.instance,
        )
        self.ledger.record(row)
        self.on_settle(call, row)


def _fields_of(request: IRequest) -> Fields:
    """The request's header fields by lower-cased name."""
    return as_fields(request.requestHeaders.getAllRawHeaders())


def _max_output(doc: dict[str, Any], subpath: bytes, default: int) -> int:
    """The most completion tokens a request asks for; the configured default if it sets none."""
    if subpath == b"/embeddings":
        return 0
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = doc.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            n = doc.get("n")
            return value * (n if isinstance(n, int) and n > 1 else 1)
    return default


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _same(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)
