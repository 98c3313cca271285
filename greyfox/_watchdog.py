# -*- test-case-name: tests.test_relay -*-
"""A timer for silences, on one DelayedCall however often it is put off."""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Watchdog:
    """Calls ``expired`` once nothing happened for ``timeout`` seconds, on one DelayedCall.

    An upstream call has two silences to time (no response headers within the
    read timeout, then no body byte within the idle timeout), and a stream
    moves many times a second: moving a DelayedCall per chunk would reorder
    the reactor's timer heap each time.  :meth:`touch` only notes the time; the
    DelayedCall, when it fires early, arms itself again for what is left.
    """

    def __init__(
        self, clock: IReactorTime, timeout: float, expired: Callable[[], None], look_within: float | None = None
    ) -> None:
        """:param look_within: the shortest timeout a later stage will set: the
        first look comes no later than that (moving a DelayedCall sooner
        costs the reactor a scan of its heap)."""
        self._clock = clock
        self._timeout = timeout
        self._expired = expired
        self._last = clock.seconds()
        first = timeout if look_within is None else min(timeout, look_within)
        self._call: IDelayedCall | None = clock.callLater(first, self._check)

    def touch(self) -> None:
        """Something happened: the silence starts again from now."""
        self._last = self._clock.seconds()

    def retarget(self, timeout: float, expired: Callable[[], None]) -> None:
        """A new stage: from now, ``timeout`` seconds of silence call ``expired``."""
        self._expired, self._timeout = expired, timeout
        self._last = now = self._clock.seconds()
        call = self._call
        if call is None:
            self._call = self._clock.callLater(timeout, self._check)
        elif now + timeout < call.getTime():
            call.reset(timeout)

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _check(self) -> None:
        self._call = None
        left = self._last + self._timeout - self._clock.seconds()
        if left > 0:  # (touched since, or an early look: see look_within)
            self._call = self._clock.callLater(left, self._check)
        else:
            self._expired()
