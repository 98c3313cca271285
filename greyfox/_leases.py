# -*- test-case-name: tests.test_leases -*-
"""Shares of the daily limits for instances that share one database (SPEC §8).

A *subject* is what a daily limit caps: ``tokens:<user>`` (the user's daily
tokens) or ``usd`` (the day's dollars, against the global budget).  Each
instance ``i`` holds, per subject and day, a *lease* ``g_i``: the most it may
have charged and reserved that day.  It admits a request with no round trip
when its own charged-plus-reserved ``h_i`` plus the request's reservation
stays within ``g_i``; otherwise the request waits for one transaction that
asks for more (:class:`LeaseKeeper`).  Each second every instance reports
``h_i`` and asks for about two seconds of its recent demand, or gives back
what it will not need, so an idle instance holds no more than it used.

Why a daily limit ``L`` is overshot by at most N requests' excess
-----------------------------------------------------------------
1. Grants are serialised (one advisory lock) and a grant never takes the
   sum past ``L``: instance ``i`` may raise ``g_i`` only to
   ``L - sum(max(g_j, h_j) for j != i)``.  So ``sum(g_j) <= L`` whenever
   every ``h_j <= g_j``.
2. An instance lowers its own ``g_i`` in memory before it writes the lower
   value, and raises it in memory only after the higher one is committed, so
   the database never shows less than the instance may use.
3. Admission reserves a request's worst case (prompt + ``max_tokens``) within
   ``g_i``, and the mid-stream cut-off ends a stream as soon as its tokens
   would carry ``h_i`` past ``g_i``.  So ``h_i`` exceeds ``g_i`` only by what
   one running request used beyond its reservation before the check ran (one
   chunk of a stream, or the part of a non-stream answer past its estimate).
   The same argument bounds one instance (§4); leases make it hold per
   instance, and summing over the N instances gives the bound.
4. An instance whose charges ran past ``g_i`` reports them: grants count
   ``max(g_j, h_j)``, so one instance's excess is never granted again.  Nor
   is a lease raised to cover its own excess: a stream that went past its
   lease goes on only if a grant leaves room beyond what it already used,
   else each renewal would let it pass by one more chunk.

A dead instance keeps its lease row until midnight.  Because leases track
demand, what it strands is about two seconds of what it was using; a
restart under the same ``GREYFOX_INSTANCE`` takes its row back.  An
instance that cannot reach the database keeps admitting within its lease
and refuses past it (SPEC §8: it serves what it can decide alone).

:class:`LeaseBook` is the arithmetic (pure); :func:`leases_txn` is the one
transaction; :class:`LeaseKeeper` runs it off the request path.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, Callable, Sequence

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ._engines import MIGRATION_LOCK

log = Logger()

#: Seconds of an instance's recent demand it asks to hold in advance.
AHEAD = 2.0
#: How often each instance reports and renews its leases.
INTERVAL = 1.0
#: Seconds a request or a stream waits for a renewal before the lease it has decides.
WAIT = 2.0
#: One advisory lock serialises grants of every instance (any id will do, the same in all).
LEASE_LOCK = MIGRATION_LOCK + 2


def tokens_subject(user: str) -> str:
    return "tokens:" + user


USD = "usd"


@attr.s(auto_attribs=True, frozen=True)
class Want:
    """What one instance reports of a subject, and the lease it asks for (``limit`` 0: no limit, nothing to lease)."""

    subject: str
    used: float
    held: float
    target: float
    limit: float


@attr.s(auto_attribs=True)
class Elsewhere:
    """What the other instances charged (``used``) and hold (``held``: charged + reserved) of a subject."""

    used: float = 0.0
    held: float = 0.0


class LeaseBook:
    """This instance's leases of one day, its recent demand, and the others' use as last seen.  Pure."""

    def __init__(self, day: str = "") -> None:
        #: Called when a subject needs more lease soon (a stream nearing its end of it).
        self.on_short: Callable[[], Any] = lambda: None
        self._start_day(day)

    def _start_day(self, day: str) -> None:
        self.day = day
        self.granted: dict[str, float] = {}
        self.elsewhere: dict[str, Elsewhere] = {}
        #: Reserved per subject in this interval and in the one before: the demand leases follow.
        self.demand: dict[str, float] = {}
        self.last_demand: dict[str, float] = {}
        #: Reservations waiting for a larger lease, per subject.
        self.asked: dict[str, float] = {}
        #: The last (used, held, granted) reported per subject: unchanged subjects are not written again.
        self.reported: dict[str, tuple[float, float, float]] = {}

    def roll(self, day: str) -> None:
        """A new day: no lease is held on it yet."""
        if day != self.day:
            self._start_day(day)

    def stopping(self) -> None:
        """The instance stops: the next report asks for no more than it holds."""
        self.demand.clear()
        self.last_demand.clear()
        self.asked.clear()

    def next_interval(self) -> None:
        """A heartbeat: demand is measured over the interval just ended (or the running one, if larger)."""
        self.last_demand, self.demand = self.demand, {}

    def rate(self, subject: str) -> float:
        return max(self.demand.get(subject, 0.0), self.last_demand.get(subject, 0.0)) / INTERVAL

    def room(self, subject: str, held: float) -> float:
        return self.granted.get(subject, 0.0) - held

    def others(self, subject: str) -> Elsewhere:
        return self.elsewhere.get(subject) or Elsewhere()

    def note(self, subject: str, amount: float) -> None:
        """``amount`` was reserved against ``subject``."""
        if amount:
            self.demand[subject] = self.demand.get(subject, 0.0) + amount

    def ask(self, subject: str, amount: float) -> None:
        """A request needs ``amount`` more than the lease has room for."""
        self.asked[subject] = self.asked.get(subject, 0.0) + amount

    def running_low(self, subject: str, amount: float) -> None:
        """A running request is near the end of the lease: ask for ``amount`` more now."""
        if subject not in self.asked:
            self.ask(subject, amount)
            self.on_short()

    def wants(self, held: dict[str, tuple[float, float]], limits: Callable[[str], float]) -> list[Want]:
        """The subjects to report (``held``: subject -> (used, held)) and the lease to ask for each.

        A limited subject asks for its held amount plus what waits plus
        :data:`AHEAD` seconds of its demand (at least as much again as waits):
        more when busy, back down to what it holds when idle.
        """
        out = []
        for subject in sorted(set(held) | set(self.granted) | set(self.asked)):
            used, h = held.get(subject, (0.0, 0.0))
            limit = limits(subject)
            asked = self.asked.get(subject, 0.0)
            target = h + asked + max(AHEAD * self.rate(subject), asked) if limit else h
            granted = self.granted.get(subject, 0.0)
            if self.reported.get(subject) == (used, h, granted) and target == granted:
                continue
            out.append(Want(subject, used, h, target, limit))
        return out

    def sent(self, wants: Sequence[Want]) -> None:
        """``wants`` are on their way: leases that shrink do so here first (the
        database must never show less than this instance may use)."""
        for w in wants:
            self.asked.pop(w.subject, None)
            if w.limit and w.target < self.granted.get(w.subject, 0.0):
                self.granted[w.subject] = w.target

    def apply(self, day: str, wants: Sequence[Want], granted: dict[str, float],
              elsewhere: dict[str, Elsewhere]) -> None:
        """The transaction's answer: raise leases that grew, and learn the others' use."""
        if day != self.day:
            return
        for w in wants:
            new = granted[w.subject]
            mine = self.granted.get(w.subject, 0.0)
            # A grow takes the new value; a shrink was applied when it was sent.
            self.granted[w.subject] = new if w.limit and w.target > mine else min(mine, new) if w.limit else new
            self.reported[w.subject] = (w.used, w.held, self.granted[w.subject])
        self.elsewhere = elsewhere

    def failed(self, wants: Sequence[Want]) -> None:
        """The report did not arrive: write every subject again next time."""
        for w in wants:
            self.reported.pop(w.subject, None)


def leases_txn(txn: Any, day: str, instance: str, wants: Sequence[Want], now: float
               ) -> tuple[dict[str, float], dict[str, Elsewhere]]:
    """Report ``wants``, grant what the limits allow (see the module docstring),
    and read what the other instances hold of every subject today."""
    granted: dict[str, float] = {}
    if any(w.limit for w in wants):
        txn.engine.lease_lock(txn, LEASE_LOCK)
    upsert = txn.engine.upsert("leases", ("day", "subject", "instance", "granted", "used", "held", "updated"),
                               ("day", "subject", "instance"))
    for w in wants:
        new = w.held
        if w.limit:
            mine, others = 0.0, 0.0
            for name, g, h in txn.execute("SELECT instance, granted, held FROM leases WHERE day = ? AND subject = ?",
                                          (day, w.subject)).fetchall():
                if name == instance:
                    mine = float(g)
                else:
                    others += max(float(g), float(h))
            if w.target <= mine:  # a shrink (already applied in memory)
                new = w.target
            else:  # (never raised to cover charges past the lease: those are excess, and stay so)
                new = max(mine, min(w.target, w.limit - others))
        txn.execute(upsert, (day, w.subject, instance, new, w.used, w.held, now))
        granted[w.subject] = new
    txn.execute("DELETE FROM leases WHERE day < ?", (_days_before(day, 2),))
    return granted, _elsewhere_txn(txn, day, instance)


def _elsewhere_txn(txn: Any, day: str, instance: str) -> dict[str, Elsewhere]:
    """What the other instances charged and hold of each subject on ``day``."""
    return {
        subject: Elsewhere(float(used), float(held))
        for subject, used, held in txn.execute(
            "SELECT subject, SUM(used), SUM(held) FROM leases WHERE day = ? AND instance != ? GROUP BY subject",
            (day, instance),
        ).fetchall()
    }


def _days_before(day: str, n: int) -> str:
    return (date.fromisoformat(day) - timedelta(days=n)).isoformat()


class LeaseKeeper:
    """Runs :func:`leases_txn` for this instance: each second, and at once
    when a request waits for more lease.  One transaction at a time; whoever
    asks meanwhile is served by the next one."""

    def __init__(self, run: Callable[..., Deferred[Any]], quotas: Any, instance: Callable[[], str],
                 clock: Any) -> None:
        self._run = run
        self._quotas = quotas
        self._instance = instance
        self._clock = clock
        self._running = False
        self._waiting: list[Deferred[None]] = []
        #: The last failure's text while the database does not answer, else ``None``.
        self.failing: str | None = None
        quotas.leases.on_short = self.sync

    def sync(self) -> Deferred[None]:
        """Report and renew now (or right after the running transaction); fires
        when done, or after :data:`WAIT` seconds of a database that does not
        answer; never with an error."""
        d: Deferred[None] = Deferred()
        d.addTimeout(WAIT, self._clock, onTimeoutCancel=lambda result, timeout: None)
        self._waiting.append(d)
        if not self._running:
            self._start()
        return d

    def tick(self) -> Deferred[None]:
        """The heartbeat: report and renew unless a transaction is already on its way."""
        self._quotas.leases.next_interval()
        if self._running or not self._instance():  # (not named until it listens)
            return succeed(None)
        return self.sync()

    def _start(self) -> None:
        waiting, self._waiting = self._waiting, []
        now = self._clock.seconds()
        day, wants = self._quotas.lease_wants(now)
        book = self._quotas.leases
        book.sent(wants)
        self._running = True

        def done(result: tuple[dict[str, float], dict[str, Elsewhere]]) -> None:
            book.apply(day, wants, *result)
            self.failing = None

        def failed(f: Any) -> None:
            book.failed(wants)
            if self.failing is None:
                log.warn("could not renew the leases of the daily limits (serving within those held): {e}",
                         e=f.getErrorMessage())
            self.failing = f.getErrorMessage()

        def finished(_: object) -> None:
            self._running = False
            _fire(waiting)
            if self._waiting:
                self._start()

        d = self._run(leases_txn, day, self._instance(), wants, now)
        d.addCallbacks(done, failed).addCallback(finished)


def loop_calls_txn(txn: Any, instance: str, calls: dict[tuple[str, int], int], now: float, window: float,
                   reset_since: float) -> tuple[dict[tuple[str, int], int], list[tuple[str, float]]]:
    """The loop breaker across instances: add this instance's calls per
    (user, conversation) since its last report, forget those past the window,
    and read the others' in it (conversations called more than once: one
    call is far from any loop, and most conversations are seen once), and
    the breakers reset through any instance since ``reset_since``."""
    txn.executemany('INSERT INTO loop_calls (instance, "user", fingerprint, at, calls) VALUES (?, ?, ?, ?, ?)',
                    [(instance, user, fp, now, n) for (user, fp), n in calls.items()])
    txn.execute("DELETE FROM loop_calls WHERE at <= ?", (now - window,))
    others = {
        (user, int(fp)): int(n)
        for user, fp, n in txn.execute(
            'SELECT "user", fingerprint, SUM(calls) FROM loop_calls WHERE instance != ? '
            'GROUP BY "user", fingerprint HAVING SUM(calls) > 1', (instance,)).fetchall()
    }
    resets = [(user, float(at)) for user, at in txn.execute(
        'SELECT "user", at FROM breaker_resets WHERE at > ?', (reset_since,)).fetchall()]
    return others, resets


def reset_breaker_txn(txn: Any, user: str, now: float) -> None:
    """An admin reset ``user``'s breakers: on every instance (they read it within a second)."""
    txn.execute('DELETE FROM loop_calls WHERE "user" = ?', (user,))
    txn.execute(txn.engine.upsert("breaker_resets", ("user", "at"), ("user",)), (user, now))


def _fire(waiting: list[Deferred[None]]) -> None:
    for d in waiting:
        if not d.called:  # (else it timed out)
            d.callback(None)


def load_leases_txn(txn: Any, day: str, instance: str) -> tuple[dict[str, float], dict[str, Elsewhere]]:
    """This instance's leases of ``day`` (a restart under the same name takes them back) and the others' use."""
    mine = {subject: float(g) for subject, g in txn.execute(
        "SELECT subject, granted FROM leases WHERE day = ? AND instance = ?", (day, instance)).fetchall()}
    return mine, _elsewhere_txn(txn, day, instance)
