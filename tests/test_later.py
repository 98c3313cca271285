"""What follows an answer waits for the reactor's next pass, in order, and nothing is dropped."""

from __future__ import annotations

from typing import Any, Callable

from greyfox._later import Later


class _Call:
    def __init__(self, f: Callable[..., Any]) -> None:
        self.f, self.called, self.cancelled = f, False, False

    def active(self) -> bool:
        return not (self.called or self.cancelled)

    def cancel(self) -> None:
        self.cancelled = True


class Passes:
    """``callLater(0, f)`` as the reactor runs it: what a pass schedules runs in the next one.
    (``task.Clock.advance(0)`` would run it in the same pass.)"""

    def __init__(self) -> None:
        self.scheduled: list[_Call] = []

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> _Call:
        assert delay == 0
        call = _Call(lambda: f(*args))
        self.scheduled.append(call)
        return call

    def run_pass(self) -> None:
        calls, self.scheduled = self.scheduled, []
        for call in calls:
            if call.active():
                call.called = True
                call.f()

    def pending(self) -> list[_Call]:
        return [c for c in self.scheduled if c.active()]


def test_jobs_run_at_the_next_pass_in_order():
    passes, ran = Passes(), []
    later = Later(passes)
    later(ran.append, 1)
    later(ran.append, 2)
    assert ran == [] and len(later) == 2 and len(passes.pending()) == 1  # one call for the pass, not one a job
    passes.run_pass()
    assert ran == [1, 2] and len(later) == 0
    assert passes.pending() == []  # nothing left scheduled when the queue is empty


def test_a_job_queued_by_a_job_waits_for_the_pass_after():
    """Each pass runs what the previous one queued: the work of a pass stays bounded."""
    passes, ran = Passes(), []
    later = Later(passes)
    later(lambda: (ran.append("first"), later(ran.append, "queued by first")))
    passes.run_pass()
    assert ran == ["first"]
    passes.run_pass()
    assert ran == ["first", "queued by first"]
    assert passes.pending() == []


def test_a_failing_job_is_logged_and_the_others_still_run(observe_errors):
    passes, ran = Passes(), []
    later = Later(passes)
    later(lambda: 1 / 0)
    later(ran.append, "after")
    passes.run_pass()
    assert ran == ["after"]
    assert [e["log_failure"].type for e in observe_errors] == [ZeroDivisionError]
    observe_errors.clear()


def test_drain_runs_everything_now_and_cancels_the_pass():
    """At shutdown, before the ledger's last write: jobs that queue jobs are run too."""
    passes, ran = Passes(), []
    later = Later(passes)
    later(lambda: (ran.append(1), later(ran.append, 2)))
    later.drain()
    assert ran == [1, 2] and len(later) == 0
    assert passes.pending() == []
    passes.run_pass()
    assert ran == [1, 2]
