# -*- test-case-name: tests.test_relay -*-
"""The one streaming primitive: upstream body -> filter -> client, with back-pressure.

:class:`BodyPump` is both the upstream response's body protocol and a push
producer registered on the client request: when the client's socket fills,
twisted.web pauses us and we pause the upstream transport.  A watchdog ends a
relay that moved no byte for ``idle_timeout`` seconds, whether the upstream
went silent or the client stopped reading.
"""

from __future__ import annotations

from typing import Callable, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from zope.interface import implementer


class ChunkFilter(TypingProtocol):
    """Sees every upstream chunk; returns the bytes the client should get."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class PassThrough:
    """Relays bytes unchanged, keeping up to ``keep`` of them (for the usage)."""

    def __init__(self, keep: int = 0) -> None:
        self._keep = keep
        self._parts: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def feed(self, data: bytes) -> bytes:
        if self._keep and not self.overflowed:
            self._size += len(data)
            if self._size > self._keep:
                self.overflowed = True
                self._parts = []
            else:
                self._parts.append(data)
        return data

    def finish(self) -> bytes:
        return b""

    def kept(self) -> bytes | None:
        """The whole body, or ``None`` when it was larger than ``keep``."""
        return None if self.overflowed else b"".join(self._parts)


class StreamIdle(Exception):
    """No byte moved for the idle timeout."""


class ClientGone(Exception):
    """The client went away; the upstream was told to stop."""


class Sink(TypingProtocol):
    """Where the relayed bytes go (a twisted.web request, in production)."""

    def write(self, data: bytes) -> None: ...

    def registerProducer(self, producer: object, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


@implementer(IPushProducer)
class BodyPump(Protocol):
    """Relays an upstream body to a client request.

    ``done`` fires with ``None`` when the body ended cleanly, errbacks with
    :class:`StreamIdle` on a stall or with the transport's failure when the
    upstream dropped.  Cancelling ``done`` (Klein does it when the client
    disconnects) aborts the upstream connection at once.
    """

    def __init__(
        self,
        sink: Sink,
        chunk_filter: ChunkFilter,
        clock: IReactorTime,
        idle_timeout: float,
        on_first_byte: Callable[[], None] = lambda: None,
    ) -> None:
        self.sink = sink
        self.filter = chunk_filter
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_first_byte = on_first_byte
        self.bytes_in = 0
        self.paused = False
        self._registered = False
        self._watchdog: IDelayedCall | None = None
        self._stopped = False
        self._stop_reason: Exception | None = None
        self.done: Deferred[None] = Deferred(canceller=self._cancel)

    # -- upstream side (called by the HTTP client, in the reactor thread) --

    def connectionMade(self) -> None:
        self.sink.registerProducer(self, True)
        self._registered = True
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self.bytes_in += len(data)
        self._arm()
        out = self.filter.feed(data)
        if out:
            self._write(out)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._disarm()
        if self._stopped:
            self._fire_stop()
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            tail = self.filter.finish()
            if tail:
                self._write(tail)
        self._unregister()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _write(self, data: bytes) -> None:
        if self.on_first_byte is not None:
            self.on_first_byte()
            self.on_first_byte = None  # type: ignore[assignment]
        self.sink.write(data)

    # -- client side (IPushProducer, called by twisted.web) --

    def pauseProducing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._arm()
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client went away; abort the upstream at once.  Idempotent (called twice).

        ``done`` fails a tick later: twisted.web stops the producer before it
        tells the request, and Klein must learn the request is gone first or
        it reports the cancellation as an error.
        """
        self._abort(ClientGone(), fire=False)
        self.clock.callLater(0, self._fire_stop)

    # -- internals --

    def _abort(self, why: Exception, fire: bool = True) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_reason = why
        self._disarm()
        self._unregister()
        if self.transport is not None:
            self.transport.stopProducing()
        if fire:
            self._fire_stop()

    def _fire_stop(self) -> None:
        if not self.done.called:
            self.done.errback(Failure(self._stop_reason or ClientGone()))

    def _cancel(self, d: Deferred[None]) -> None:
        self._abort(CancelledError())

    def _arm(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self.idle_timeout)
        else:
            self._watchdog = self.clock.callLater(self.idle_timeout, self._idle)

    def _disarm(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _idle(self) -> None:
        self._watchdog = None
        self._abort(StreamIdle())

    def _unregister(self) -> None:
        if self._registered and getattr(self.sink, "channel", True) is not None:
            try:
                self.sink.unregisterProducer()
            except (AttributeError, RuntimeError):
                pass  # request already finished or its channel gone
        self._registered = False
