# -*- test-case-name: tests.test_collector -*-
"""When CPython's cycle collector makes its full passes: from the reactor, when no request waits.

A full pass walks every container object the process holds, and the cache
index (two objects per stored answer) grows with use: under load, passes of
30-60 ms came every few seconds (CPython starts one whenever long-lived
objects grew by a quarter), and every connection waited through each.

So the automatic full pass is turned off; the young generations still
collect as usual.  A full pass runs from the reactor, between events, when
anything reached the old generation since the last one, at most once a
minute, and when the proxy is idle (no request in flight, none arrived in
the last few seconds: a pause then delays nobody); under
unbroken load, every ten minutes regardless.  Cyclic garbage that got that
far (closed connections, mostly) waits that long at most.  The idea of
Synapse's ``_gc`` module (collections timed by the reactor), for the old
generation only, with the "out of band" twist of collecting when idle.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

#: Seconds between full collections, at least ...
FULL_PASS_INTERVAL = 60.0
#: ... and at most, while requests keep the proxy busy.
FULL_PASS_MAX_WAIT = 600.0
#: How often the collector looks for a moment to run one.
CHECK_EVERY = 5.0
#: A third threshold CPython never reaches: no automatic full passes.
_NEVER = 1 << 30


# The thresholds are the process's: the first running instance saves them,
# the last one to stop puts them back (tests run several at once).
_running = 0
_saved = gc.get_threshold()


class FullCollections(Service):
    """Full passes on a timer while running; CPython's own rule again when stopped."""

    def __init__(self, clock: Any, busy: Callable[[], bool] = lambda: False) -> None:
        """:param busy: whether requests are in flight now or arrived since it was last asked."""
        self.clock = clock
        self.busy = busy
        self._last = 0.0
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        global _running, _saved
        super().startService()
        if _running == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(_saved[0], _saved[1], _NEVER)
        _running += 1
        self._last = self.clock.seconds()
        self._loop = LoopingCall(self.collect)
        self._loop.clock = self.clock
        self._loop.start(CHECK_EVERY, now=False)

    def stopService(self) -> None:
        global _running
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            _running -= 1
            if _running == 0:
                gc.set_threshold(*_saved)

    def collect(self) -> None:
        """A full pass, if one is due and this is a good moment."""
        since = self.clock.seconds() - self._last
        if since < FULL_PASS_INTERVAL or (self.busy() and since < FULL_PASS_MAX_WAIT):
            return
        self._last = self.clock.seconds()
        if gc.get_count()[2] > 0:  # the middle generation was collected since the last pass
            gc.collect(2)
