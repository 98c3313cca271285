# -*- test-case-name: tests.test_relay -*-
"""The one streaming primitive: upstream body -> fan-out -> clients, with back-pressure.

:class:`BodyPump` is the upstream response's body protocol and the push
producer behind every client of that response.  :class:`Fanout` frames the
bytes (SSE events or plain chunks) once, meters them once, and writes them to
each :class:`Subscriber` (the client requests waiting on this upstream call:
one, or several when identical requests are coalesced).  When any client's
socket is full the upstream transport is paused; when the last client leaves
the upstream request is aborted.  A watchdog ends a relay that moved no byte
for ``idle_timeout`` seconds, whether the upstream went silent or the clients
stopped reading.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from zope.interface import implementer

from ._sse import SSEParser
from ._usage import StreamMeter
from ._watchdog import Watchdog

#: One relayed piece: its bytes, and whether it is the usage-only chat chunk.
Piece = tuple[bytes, bool]


class StreamIdle(Exception):
    """No byte moved for the idle timeout."""


class CutOff(Exception):
    """The stream was ended here: it would carry a limit past (its code is the argument)."""


class BrokenOff(Exception):
    """The body broke off (the upstream dropped or went silent) after the response began."""


class ClientGone(Exception):
    """Every client went away; the upstream was told to stop."""


class PumpTarget(TypingProtocol):
    """Where a :class:`BodyPump` delivers (a :class:`Fanout`, in production)."""

    def registerProducer(self, producer: "BodyPump") -> None: ...

    def unregisterProducer(self) -> None: ...

    def deliver(self, data: bytes) -> None: ...


@implementer(IPushProducer)
class BodyPump(Protocol):
    """Reads an upstream body into a target, pausing when the target says so.

    ``on_end`` is called once: with ``None`` when the body ended cleanly, or a
    Failure of :class:`StreamIdle` on a stall, :class:`ClientGone` when every
    client left, or the transport's failure when the upstream dropped.  A
    callback rather than a Deferred: this runs for every relayed request.

    :param watchdog: the upstream call's running :class:`Watchdog`, to time
        the body's silences from here on (else the pump makes its own).
    """

    def __init__(
        self,
        target: PumpTarget,
        clock: IReactorTime,
        idle_timeout: float,
        on_end: Callable[[Failure | None], None],
        watchdog: Watchdog | None = None,
    ) -> None:
        self.target = target
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_end: Callable[[Failure | None], None] | None = on_end
        self.bytes_in = 0
        self.paused = False
        self._watchdog = watchdog
        self._stopped = False
        self._stop_reason: Exception | None = None

    # -- upstream side (called by the HTTP client, in the reactor thread) --

    def connectionMade(self) -> None:
        self.target.registerProducer(self)
        if self._watchdog is None:
            self._watchdog = Watchdog(self.clock, self.idle_timeout, self._idle)
        else:
            self._watchdog.retarget(self.idle_timeout, self._idle)

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self.bytes_in += len(data)
        self._watchdog.touch()  # type: ignore[union-attr]
        self.target.deliver(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._disarm()
        self.target.unregisterProducer()
        if self._stopped:
            self._fire_stop()
        elif reason.check(ResponseDone, PotentialDataLoss):
            self._end(None)
        else:
            self._end(reason)

    # -- client side (IPushProducer, via the fan-out) --

    def pauseProducing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self._watchdog is not None:
            self._watchdog.touch()
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """Every client went away: abort the upstream at once.

        ``on_end`` hears of it a tick later: the client's transport stops the
        producer before the request hears of the disconnection, and the
        request must learn it is gone first or the cancellation is reported
        as an error.
        """
        self.abort(ClientGone(), fire=False)
        self.clock.callLater(0, self._fire_stop)

    def abort(self, why: Exception, fire: bool = True) -> None:
        """Stop reading and drop the upstream connection.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_reason = why
        self._disarm()
        self.target.unregisterProducer()
        if self.transport is not None:
            self.transport.stopProducing()
        if fire:
            self._fire_stop()

    # -- internals --

    def _end(self, result: Failure | None) -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(result)

    def _fire_stop(self) -> None:
        self._end(Failure(self._stop_reason or ClientGone()))

    def _disarm(self) -> None:
        watchdog, self._watchdog = self._watchdog, None  # (it holds self._idle: no cycle left behind)
        if watchdog is not None:
            watchdog.stop()

    def _idle(self) -> None:
        self.abort(StreamIdle())


@implementer(IPushProducer)
class Subscriber:
    """One client of an upstream call: its request, and whether it wants the usage chunk.

    ``done`` fires when its response is complete, errbacks with the error the
    call ended in (an ``ApiError`` before any response), and can be cancelled
    when its client leaves (Klein cancels the route's Deferred then).
    """

    def __init__(self, request: Any, strip_usage_chunk: bool, clock: IReactorTime, on_first_byte: Callable[[], None]) -> None:
        self.request = request
        self.strip_usage_chunk = strip_usage_chunk
        self.clock = clock
        self.on_first_byte: Callable[[], None] | None = on_first_byte
        self.fanout: Fanout | None = None
        self.on_leave: Callable[["Subscriber"], None] = lambda sub: None
        self.gone = False
        self.ended = False
        self.registered = False
        self.done: Deferred[None] = Deferred(canceller=lambda d: self._leave())

    @property
    def started(self) -> bool:
        """Whether this client's response has begun (its first body byte was written)."""
        return self.on_first_byte is None

    # -- called by the fan-out --

    def select(self, pieces: list[Piece]) -> bytes:
        if self.strip_usage_chunk:
            return b"".join(raw for raw, usage_only in pieces if not usage_only)
        return b"".join(raw for raw, _ in pieces)

    def write(self, data: bytes) -> None:
        if self.gone or self.ended or not data:
            return
        if self.on_first_byte is not None:
            self.on_first_byte()
            self.on_first_byte = None
        self.request.write(data)

    def register(self) -> None:
        if not self.gone and not self.registered:
            self.request.registerProducer(self, True)
            self.registered = True

    def unregister(self) -> None:
        if self.registered:
            self.registered = False
            if getattr(self.request, "channel", None) is not None:
                try:
                    self.request.unregisterProducer()
                except (AttributeError, RuntimeError):
                    pass

    def end(self, failure: Failure | None = None) -> None:
        """The call is over for this client.

        A client that already left keeps the ending it left with (its
        cancellation), not the upstream call's outcome.
        """
        self.unregister()
        self.ended = True
        if self.gone:
            return
        if not self.done.called:
            if failure is None:
                self.done.callback(None)
            else:
                self.done.errback(failure)

    # -- IPushProducer, called by the client's transport --

    def pauseProducing(self) -> None:
        if self.fanout is not None:
            self.fanout.pause(self)

    def resumeProducing(self) -> None:
        if self.fanout is not None:
            self.fanout.resume(self)

    def stopProducing(self) -> None:
        """The client hung up (its transport tells us before Klein cancels ``done``)."""
        self._leave()
        self.clock.callLater(0, lambda: self.done.called or self.done.errback(Failure(ClientGone())))

    def _leave(self) -> None:
        if self.gone:
            return
        self.gone = True
        self.registered = False
        self.on_leave(self)


class Fanout:
    """Frames and meters an upstream body once, and writes it to every subscriber.

    :param meter: set for SSE bodies: events are framed, metered, and the
        usage-only chunk is marked so each subscriber can drop it.
    :param keep: bytes kept for the cache and for late joiners; past it the
        fan-out stops keeping (``overflowed``) and takes no new joiners.
    """

    def __init__(
        self,
        meter: StreamMeter | None,
        keep: int,
        on_empty: Callable[[], None],
        on_complete: Callable[[], None] = lambda: None,
        over_limit: Callable[[bool], str | Deferred[None] | None] | None = None,
        on_over_limit: Callable[[str], None] = lambda code: None,
    ) -> None:
        """:param over_limit: asked after each metered event: the code of the
            limit the stream has now gone past, if any.  Then the events up to
            that one are sent and ``on_over_limit(code)`` is told; the rest of
            the read is not.  A Deferred instead: the stream is at the end of
            this instance's lease of the limit (see greyfox._leases) and more
            is asked for; the read pauses, the rest of this one is held, and
            ``over_limit`` is asked again when the Deferred fires, told that
            it waited (its argument)."""
        self.meter = meter
        self.on_complete = on_complete
        self.over_limit = over_limit
        self.on_over_limit = on_over_limit
        self._completed = False
        self.parser = SSEParser() if meter is not None else None
        self.keep = keep
        self.on_empty = on_empty
        self.subscribers: list[Subscriber] = []
        self.kept: list[Piece] = []
        self.kept_bytes = 0
        self.overflowed = False
        self.pump: BodyPump | None = None
        self._paused: set[Subscriber] = set()
        #: Events read and not yet relayed while a lease is renewed (at most the rest of one read).
        self._held: list[bytes] | None = None
        #: The body ended while events were held: the end, told the cut-off's code or ``None``.
        self._then: Callable[[str | None], None] | None = None

    @property
    def joinable(self) -> bool:
        return not self.overflowed

    def add(self, sub: Subscriber) -> None:
        """Join a subscriber: it first gets everything kept so far."""
        sub.fanout = self
        self.subscribers.append(sub)
        if self.pump is not None:
            sub.register()
        if self.kept:
            sub.write(sub.select(self.kept))

    def body(self) -> bytes | None:
        """Everything received, or ``None`` when it was more than ``keep``."""
        if self.overflowed:
            return None
        kept = self.kept
        return kept[0][0] if len(kept) == 1 else b"".join([raw for raw, _ in kept])

    # -- PumpTarget --

    def registerProducer(self, producer: BodyPump) -> None:
        self.pump = producer
        for sub in self.subscribers:
            sub.register()

    def unregisterProducer(self) -> None:
        for sub in self.subscribers:
            sub.unregister()
        self.pump = None

    def deliver(self, data: bytes) -> None:
        if self.parser is None:
            self._send([(data, False)])
        elif self._held is not None:  # (what was on its way when the read paused)
            self._held.extend(self.parser.feed_raw(data))
        else:
            self._relay(self.parser.feed_raw(data))

    def _relay(self, raws: list[bytes]) -> bool:
        """Meter and send events, checking the limit after each; false when the stream stopped or waits."""
        meter = self.meter
        assert meter is not None
        pieces: list[Piece] = []
        for i, raw in enumerate(raws):
            pieces.append((raw, meter.on_raw(raw)))
            if self.over_limit is not None:
                verdict = self.over_limit(False)
                if verdict is None:
                    continue
                self._send(pieces)
                if isinstance(verdict, str):
                    self._cut(verdict)
                else:
                    self._held = raws[i + 1:]
                    if self.pump is not None and not self.pump.paused:
                        self.pump.pauseProducing()
                    verdict.addCallback(self._renewed)
                return False
        if pieces:
            self._send(pieces)
        return True

    def _renewed(self, _: object) -> None:
        """The lease was renewed (or could not be): go on, or stop here."""
        held, self._held = self._held or [], None
        if self.over_limit is None:  # the call ended meanwhile
            return
        verdict = self.over_limit(True)
        if isinstance(verdict, str):
            self._cut(verdict)
            return
        if not self._paused and self.pump is not None and self.pump.paused:
            self.pump.resumeProducing()
        if self._relay(held) and self._then is not None:
            then, self._then = self._then, None
            self.finish(then)

    def _cut(self, code: str) -> None:
        self.on_over_limit(code)
        then, self._then = self._then, None
        if then is not None:
            then(code)

    def send_last(self, data: bytes) -> None:
        """Write ``data``, unkept and unmetered, to every subscriber whose response
        has begun: the last thing they get.  (One that got nothing yet can
        still be answered with an error status instead.)"""
        for sub in self.subscribers:
            if sub.started:
                sub.write(data)

    def finish(self, then: Callable[[str | None], None]) -> None:
        """The body ended cleanly: relay an unterminated last event, if any,
        then call ``then`` (after the events held for a lease, if any: with
        the cut-off's code when the stream stops in them)."""
        if self._held is not None:
            self._then = then
            return
        if self.parser is not None and self.meter is not None:
            tail = self.parser.flush()
            if tail is not None:
                self._send([(tail.raw, self.meter.on_event(tail))])
        then(None)

    def _send(self, pieces: list[Piece]) -> None:
        if not self.overflowed:
            self.kept.extend(pieces)
            self.kept_bytes += len(pieces[0][0]) if len(pieces) == 1 else sum([len(raw) for raw, _ in pieces])
            if self.kept_bytes > self.keep:
                self.overflowed = True
                self.kept = []
        plain = None
        for sub in self.subscribers:
            if sub.strip_usage_chunk:
                sub.write(sub.select(pieces))
            else:
                if plain is None:
                    plain = pieces[0][0] if len(pieces) == 1 else b"".join(raw for raw, _ in pieces)
                sub.write(plain)
        if self.meter is not None and self.meter.done and not self._completed:
            # The stream said it is over ([DONE] or response.completed): answer
            # the clients now; clients such as the SDK hang up at this point.
            self._completed = True
            self.on_complete()

    # -- back-pressure and departures --

    def pause(self, sub: Subscriber) -> None:
        first = not self._paused
        self._paused.add(sub)
        if first and self.pump is not None:
            self.pump.pauseProducing()

    def resume(self, sub: Subscriber) -> None:
        self._paused.discard(sub)
        if not self._paused and self._held is None and self.pump is not None and self.pump.paused:
            self.pump.resumeProducing()

    def leave(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        was_paused = sub in self._paused
        self._paused.discard(sub)
        if not any(not s.ended for s in self.subscribers) and not self._completed:
            self.on_empty()
        elif was_paused:
            self.resume(sub)
