# -*- test-case-name: tests.test_cache -*-
"""One upstream call and every client waiting on it.

A :class:`Flight` is started by the first request (the leader).  Identical
requests that arrive while it is in the air subscribe to it instead of
calling the upstream again (request coalescing): they get the same status,
headers and body as they arrive, streams included.  The flight outlives any
one client: the upstream call is cancelled only when every client has left.
When it ends it records usage on every waiting call, settles their ledger
rows and, for a complete ``200``, stores the answer in the cache.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

import attr

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from . import _json
from ._cache import MAX_ENTRY_BYTES
from ._errors import ApiError, describe_failure
from ._quota import WAIT_FOR_LEASE
from ._relay import BodyPump, BrokenOff, ClientGone, CutOff, Fanout, StreamIdle, Subscriber
from ._routing import as_fields, returned_fields
from ._tokens import THREADED_COUNT_BYTES, IncrementalCounter, estimate_prompt_tokens
from ._usage import StreamMeter, Usage, usage_of

if TYPE_CHECKING:
    from ._proxy import Call, Proxy

log = Logger()

#: Non-stream bodies up to this size are kept to read their ``usage``.
KEEP_BODY_BYTES = MAX_ENTRY_BYTES
#: Streams up to this size are kept for the cache; longer ones are relayed
#: without keeping, so memory stays flat for any length.
MAX_STREAM_KEEP = 4 * 1024 * 1024


class Flight:
    """The upstream call of ``leader``, shared by every subscriber.

    :param key: ``scope:key`` under which it may be joined and stored, or
        ``None`` for a call that is neither coalesced nor cached.
    """

    def __init__(self, proxy: "Proxy", leader: "Call", entry_id: str | None, store: bool) -> None:
        self.proxy = proxy
        self.leader = leader
        self.entry_id = entry_id
        self.store = store
        self.subscribers: list[tuple[Subscriber, "Call"]] = []
        self.fanout: Fanout | None = None
        self.response: Any = None
        self.ended = False
        self.answered = False  # every client has its complete response
        self._failure: Failure | None = None
        self.usage: Usage | None = None
        self.usage_source = "none"
        self._forwarding: Deferred[Any] | None = None  # the upstream call, until its response headers came
        self._pump: BodyPump | None = None
        self._to_settle: list["Call"] = []
        self._counting: Deferred[None] | None = None  # our own count of a long answer, in a thread
        self._meter: StreamMeter | None = None
        self._content_type = ""
        self._json_body = False  # whether a kept non-stream body parsed as JSON (see _take_usage)
        self._counter: IncrementalCounter | None = None

    @property
    def joinable(self) -> bool:
        return not self.ended and (self.fanout is None or self.fanout.joinable)

    def subscribe(self, request: Any, call: "Call") -> Subscriber:
        """Add a client; its ``done`` fires when its response is complete."""
        clock = self.proxy.clock

        def first_byte() -> None:
            call.first_byte = clock.seconds()

        sub = Subscriber(request, call.strip_usage_chunk, clock, first_byte)
        sub.on_leave = self._leave
        call.flight = self
        self.subscribers.append((sub, call))
        if self.ended:
            call.usage, call.usage_source = self.usage, self.usage_source
            sub.end(self._failure)
        elif self.fanout is not None:
            self._begin(sub, call)
            self.fanout.add(sub)
            if self.answered:
                call.usage, call.usage_source = self.usage, self.usage_source
                sub.end()
        return sub

    def start(self) -> None:
        """Call the upstream."""
        self._forwarding = self.proxy.forward(self.leader)
        self._forwarding.addCallbacks(self._got_response, self._forward_failed).addErrback(self._crashed)

    def settle_after(self, call: "Call") -> None:
        """Queue ``call``'s ledger row for when its usage is known."""
        if (self.ended or self.answered) and self._counting is None:
            call.usage, call.usage_source = self.usage, self.usage_source
            self.proxy.settle(call)
        else:
            self._to_settle.append(call)

    # -- the call --

    def _forward_failed(self, failure: Failure) -> None:
        self._forwarding = None
        if failure.check(ApiError):
            self._finish(failure)
        elif failure.check(CancelledError):
            self._finish(Failure(ClientGone()), "client disconnected")
        else:
            log.failure("request {id}: forwarding failed", failure, id=self.leader.id)
            self._finish(Failure(ApiError(502, "GreyFox could not reach the upstream.", "upstream_error", "upstream_unreachable")))

    def _got_response(self, response: Any) -> None:
        proxy = self.proxy
        leader = self.leader
        watchdog, leader.watchdog = leader.watchdog, None  # (the read timer, for the body to reuse)
        self._forwarding = None
        self.response = response
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        self._content_type = content_type.decode("latin-1")
        if content_type.startswith(b"text/event-stream"):  # counted as it passes (see StreamMeter)
            self._counter = IncrementalCounter(None, resolve=lambda: proxy.encoding_for(leader.model or ""))
            self._meter = StreamMeter(self._counter)
            keep = MAX_STREAM_KEEP
        else:
            keep = KEEP_BODY_BYTES if b"json" in content_type else 0
        # A stream of a request admitted against a daily token limit or budget is
        # checked against it as it passes (SPEC §4: the mid-stream cut-off).
        check = self._meter is not None and leader.reservation is not None and leader.prompt_estimate is not None
        self.fanout = Fanout(self._meter, keep, on_empty=self._all_left, on_complete=self._answered)
        if check:
            self.fanout.over_limit, self.fanout.on_over_limit = self._over_limit, self._cut_off
        for sub, call in list(self.subscribers):
            if not sub.gone:
                self._begin(sub, call)
                self.fanout.add(sub)
        if not self.fanout.subscribers:
            if watchdog is not None:
                watchdog.stop()
            response.deliverBody(_Discard())
            self._finish(None, "client disconnected")
            return
        on_end = _guarded(self._body_ended, self._body_failed, self._crashed)
        self._pump = BodyPump(self.fanout, proxy.clock, proxy.settings.stream_idle_timeout, on_end, watchdog)
        response.deliverBody(self._pump)

    def _body_ended(self, _: None) -> None:
        assert self.fanout is not None
        self.fanout.finish(lambda cut: self._conclude(None if cut is None else f"cut_off: {cut}"))

    def _body_failed(self, failure: Failure) -> Failure | None:
        settings, leader = self.proxy.settings, self.leader
        if failure.check(ClientGone, CancelledError):
            self._conclude("client disconnected")
            return None
        if failure.check(CutOff):
            self._conclude(f"cut_off: {failure.value.args[0]}")
            return None
        if failure.check(StreamIdle):
            error = f"stream idle for {settings.stream_idle_timeout:g} s (GREYFOX_STREAM_IDLE_TIMEOUT)"
        elif failure.check(ResponseFailed):
            error = "upstream dropped the response: " + describe_failure(failure.value)
        else:
            return failure
        log.info("request {id}: {error}; the client's response is aborted", id=leader.id, error=error)
        self._conclude(error, broken=True)
        return None

    def _conclude(self, error: str | None, broken: bool = False) -> None:
        """The body is over: take usage, store a complete answer, end every client.

        :param broken: the body broke off; clients still waiting get
            :class:`BrokenOff`, so that their responses are aborted (a
            stream's, after one error event that says why).
        """
        code = self.response.code
        if not self.answered:  # _answered() took it when the stream said it was over
            self._take_usage(code)
        complete = self._meter.done if self._meter is not None else error is None
        if self.store and complete and code == 200:
            self._after_count(self._store, self._content_type)
        if broken:
            for sub, call in self.subscribers:
                if not sub.started:  # nothing written yet: the client gets a 502 (Proxy.handle)
                    call.status = 502
            if self._meter is not None and self.fanout is not None and not complete:
                self.fanout.send_last(error_event(f"The upstream's answer broke off: {error}.", "upstream_error",
                                                  "upstream_broke_off", self.leader.api))
        self._finish(Failure(BrokenOff(error)) if broken else None, error)

    def _crashed(self, failure: Failure) -> None:
        """A bug on the relay path: log it, and answer the clients rather than leave them hanging."""
        log.failure("request {id}: relaying failed", failure, id=self.leader.id)
        if not self.ended:
            self._finish(Failure(ApiError(500, "GreyFox failed on this request; see its log.", "server_error", "internal_error")))

    def _begin(self, sub: Subscriber, call: "Call") -> None:
        """Status and headers for one client, before its first body byte."""
        response = self.response
        length = response.length if self._meter is None and isinstance(response.length, int) else None  # (byte for byte)
        self.proxy.respond(call, sub.request, response.code, returned_fields(as_fields(response.headers.getAllRawHeaders())), length)

    def _take_usage(self, code: int) -> None:
        """The upstream's usage if it sent one; otherwise our own count.

        A stream's text was counted as it passed.  A JSON answer's text, and a
        prompt admission did not count, are counted now: past
        ``THREADED_COUNT_BYTES`` in the reactor's thread pool.  While the
        tokenizers are still loading, or a count runs in a thread
        (``_counting``), clients are answered and the ledger rows and the
        cache entry wait for it.
        """
        meter, leader, proxy = self._meter, self.leader, self.proxy
        if meter is not None and meter.usage is not None:
            self.usage, self.usage_source = meter.usage, "upstream"
            proxy.on_stream_counted(leader, meter.usage.completion_tokens, self._counter)
            return
        doc = None
        body = self.fanout.body() if self.fanout is not None and meter is None else None
        if body:
            doc = _json_of(body)  # parsed once, for the usage, the text and _store
            self._json_body = doc is not _NOT_JSON
            usage = usage_of(doc)
            if usage is not None:
                self.usage, self.usage_source = usage, "upstream"
                return
        if leader.doc is None or code >= 400 or leader.free:
            return
        enc = proxy.encoding_for(leader.model or "")
        if enc is not None:
            self._count(enc, doc)
            return
        # The tokenizers are loading (they load once, on first need): count when they are in.
        waiting = self._counting = proxy.counted_on(proxy.load_encodings())

        def loaded(_: Any) -> Deferred[None] | None:
            self._counting = None
            self._count(proxy.encoding_for(leader.model or ""), doc)
            return self._counting  # (a count in a thread, if the answer is long)

        waiting.addCallback(loaded).addErrback(self._count_failed)

    def _count(self, enc: Any, doc: Any) -> None:
        """Our own count of the answer (``doc``, or the stream's counter) and, if
        admission did not count it, of the prompt: now, or in a thread if long."""
        leader, counter = self.leader, self._counter
        if counter is not None:
            counter.resolve(enc)
        prompt = leader.prompt_estimate  # counted for admission already, when limits needed it
        job = (enc, doc, leader.doc if prompt is None else None)
        size = (len(self.fanout.body() or b"") if doc is not None and self.fanout is not None else 0) + (
            len(leader.body) if prompt is None else 0)
        if enc is None or size <= THREADED_COUNT_BYTES:
            self._counted(count_answer(*job), prompt)
            return
        counting = self._counting = self.proxy.counted_on(self.proxy.run_in_thread(count_answer, *job))

        def counted(counts: tuple[int, int | None]) -> None:
            self._counting = None
            self._counted(counts, prompt)

        counting.addCallback(counted).addErrback(self._count_failed)

    def _counted(self, counts: tuple[int, int | None], prompt: int | None) -> None:
        text_tokens, counted_prompt = counts
        counter = self._counter  # (a stream's: its text counted on the way)
        if counter is None and text_tokens == 0 and self.leader.subpath != b"/embeddings":
            return  # nothing generated: no usage to estimate (an embedding's is all prompt)
        completion = text_tokens + (counter.total if counter is not None else 0)
        started = self._meter.started_usage if self._meter is not None else None
        if started is not None:  # a Messages stream that ended early: its prompt is the upstream's word
            self.usage = attr.evolve(started, completion_tokens=completion, reasoning_tokens=0)
        else:
            self.usage = Usage(prompt if prompt is not None else counted_prompt or 0, completion)
        self.usage_source = "estimated"

    def _count_failed(self, failure: Failure) -> None:
        self._counting = None
        log.failure("request {id}: counting the answer failed; recorded without usage", failure, id=self.leader.id)

    def _after_count(self, f: Callable[..., None], *args: Any) -> None:
        """Run ``f(*args)`` now, or once our own count of the answer is done."""
        if self._counting is None:
            f(*args)
        else:
            self._counting.addCallback(lambda _: f(*args)).addErrback(self._crashed_late)

    def _crashed_late(self, failure: Failure) -> None:
        log.failure("request {id}: settling failed", failure, id=self.leader.id)

    def _store(self, content_type: str) -> None:
        assert self.fanout is not None and self.entry_id is not None
        body = self.fanout.body()
        if body is None or self.usage is None and self._meter is None and not self._json_body:
            return
        self.proxy.store_answer(self.leader, self.entry_id, self._meter is not None, content_type, body, self.usage)

    # -- endings --

    def _leave(self, sub: Subscriber) -> None:
        """A client hung up: drop it; when none is left, cancel the upstream call."""
        if self.fanout is not None:
            self.fanout.leave(sub)
        elif all(s.gone for s, _ in self.subscribers) and self._forwarding is not None:
            self._forwarding.cancel()

    def _answered(self) -> None:
        """The stream is complete: finish every client's response now."""
        self._take_usage(self.response.code)
        self.answered = True
        self._end_all(None, None)

    @property
    def tokens(self) -> int:
        """Tokens of the answer so far: a stream's, counted as it passes (0 for other bodies)."""
        return self._counter.total if self._counter is not None else 0

    def _over_limit(self, waited: bool) -> str | Deferred[None] | None:
        """Whether what the stream produced so far carries its user past the
        daily token limit or the day past the budget: the limit's code; a
        Deferred when it reached the end of this instance's lease and more is
        asked for (asked again when it fires, ``waited``: then the lease decides)."""
        code = self.proxy.over_limit(self.leader, self.tokens, waited)
        return self.proxy.renew_leases() if code == WAIT_FOR_LEASE else code

    def _cut_off(self, code: str) -> None:
        """End the stream here: one error event to every client, the upstream
        call cancelled, what was produced billed (the row says ``cut_off``)."""
        assert self.fanout is not None and self._pump is not None
        log.info("request {id}: stream cut off at {tokens} completion tokens ({code})",
                 id=self.leader.id, tokens=self.tokens, code=code)
        self.fanout.send_last(cut_off_event(code, self.leader.user, self.leader.api))
        self._pump.abort(CutOff(code))

    def _all_left(self) -> None:
        if self._pump is not None:
            self._pump.stopProducing()

    def _finish(self, failure: Failure | None, error: str | None = None) -> None:
        """End every subscriber, then settle every waiting ledger row."""
        self.ended = True
        self._failure = failure
        self.proxy.flight_ended(self)
        self._end_all(failure, error)
        self._after_count(self._release)

    def _end_all(self, failure: Failure | None, error: str | None) -> None:
        """End every client; settle the rows waiting for the usage (once it is counted)."""
        for sub, call in self.subscribers:
            if error and call.error is None and not sub.ended:
                call.error = error
            sub.end(failure)
        self._after_count(self._settle_waiting)

    def _settle_waiting(self) -> None:
        to_settle, self._to_settle = self._to_settle, []
        for call in to_settle:
            call.usage, call.usage_source = self.usage, self.usage_source
            self.proxy.settle(call)

    def _release(self) -> None:
        """Drop the references that tie the flight, its calls and its clients
        in a circle, so that each request's objects are freed as soon as it
        ends rather than by a pass of the cycle collector.  Every row is
        settled by now and the flight takes no new subscribers."""
        for sub, call in self.subscribers:
            sub.on_leave = _ignore
            sub.fanout = None
            call.flight = None
        self.subscribers = []
        fanout = self.fanout
        if fanout is not None:
            fanout.on_complete = fanout.on_empty = _nothing
            fanout.over_limit, fanout.on_over_limit = None, _ignore
            fanout.subscribers = []
        self._counter = None


def _guarded(
    ok: Callable[[Any], None], failed: Callable[[Failure], Failure | None], crashed: Callable[[Failure], None]
) -> Callable[[Any], None]:
    """One plain callback (the pump's ``on_end``) that does what
    ``addCallbacks(ok, failed).addErrback(crashed)`` does on a Deferred:
    ``crashed`` gets what ``failed`` hands back and any exception either raises."""

    def step(result: Any) -> None:
        try:
            if isinstance(result, Failure):
                unexpected = failed(result)
                if unexpected is not None:
                    crashed(unexpected)
            else:
                ok(result)
        except Exception:
            crashed(Failure())

    return step


def _ignore(_: Any) -> None:
    pass


def _nothing() -> None:
    pass


class _Discard:
    """Reads and drops a body nobody is waiting for."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


#: What :func:`_json_of` gives for a body that is not JSON (``None`` is JSON's null).
_NOT_JSON = object()


def _json_of(body: bytes) -> Any:
    try:
        return _json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


def count_answer(enc: Any, doc: Any, prompt_doc: dict[str, Any] | None) -> tuple[int, int | None]:
    """Our own count of a JSON answer that came without usage: (tokens of the
    generated text, tokens of the prompt or ``None`` when not asked).

    Pure, on fresh objects, so that it can run in a thread.
    """
    counter = IncrementalCounter(enc)
    if doc is not None:
        _feed_completion_text(counter, doc)
    return counter.total, (estimate_prompt_tokens(enc, prompt_doc) if prompt_doc is not None else None)


def _feed_completion_text(counter: IncrementalCounter, doc: Any) -> None:
    """Count the generated text of a JSON answer that came without ``usage``."""
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list):
        return
    for choice in choices:
        if isinstance(choice, dict):
            if isinstance(choice.get("text"), str):
                counter.feed(choice["text"])
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                counter.feed(message["content"])
    if isinstance(doc, dict) and doc.get("type") == "message" and isinstance(doc.get("content"), list):  # Messages API
        for block in doc["content"]:
            if isinstance(block, dict):
                for key in ("text", "thinking"):
                    if isinstance(block.get(key), str):
                        counter.feed(block[key])


def cut_off_event(code: str, user: str, api: str = "openai") -> bytes:
    """The SSE event that ends a stream cut off at a limit."""
    what = {"daily_token_limit": f"User {user!r} reached the daily token limit",
            "daily_budget": "The day reached the daily budget"}.get(code, "A limit was reached")
    return error_event(f"{what} during this stream; GreyFox ended it here.", "quota_exceeded", code, api, 429)


def error_event(message: str, kind: str, code: str, api: str = "openai", status: int = 502) -> bytes:
    """The SSE event with which GreyFox ends a stream early: an OpenAI-shaped
    error, or for the Messages API an ``error`` event shaped as Anthropic's
    (its type that of ``status``, the code starting the message)."""
    if api == "anthropic":
        error = ApiError(status, message, kind, code).anthropic_body()
        error["error"]["message"] = f"{code}: {message}"
        return b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
    error = {"message": message, "type": kind, "code": code, "param": None}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
