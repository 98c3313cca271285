# -*- test-case-name: tests.test_later -*-
"""Work that can wait until the reactor has served what is ready.

A relayed answer leaves as soon as GreyFox has it; what follows (the usage,
the cache entry, the ledger row, the quota settled) is for GreyFox, not for
the client.  Run inline, it holds up every request that became ready in the
same pass; queued here, it runs at the start of the next pass, after every
socket that was ready has been served.  At the model-like load this halved
the p99 a relay adds at the same CPU a request (bench/README.md).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class Later:
    """A queue of jobs, run in order at the reactor's next pass.

    Each pass runs the jobs queued before it began (those a job queues wait
    for the pass after), so the work a pass does is bounded by what the
    previous pass queued, and nothing waits more than a pass under any load.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._jobs: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._call: IDelayedCall | None = None

    def __call__(self, f: Callable[..., Any], *args: Any) -> None:
        """Run ``f(*args)`` at the next pass."""
        self._jobs.append((f, args))
        if self._call is None:
            self._call = self._clock.callLater(0, self._run)

    def __len__(self) -> int:
        return len(self._jobs)

    def drain(self) -> None:
        """Run every queued job now, and those they queue (at shutdown: before the ledger's last write)."""
        while self._jobs:
            self._run_one()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _run(self) -> None:
        self._call = None
        for _ in range(len(self._jobs)):
            self._run_one()
        if self._jobs and self._call is None:
            self._call = self._clock.callLater(0, self._run)

    def _run_one(self) -> None:
        f, args = self._jobs.popleft()
        try:
            f(*args)
        except Exception:
            log.failure("deferred work failed: {f}", f=getattr(f, "__qualname__", f))
