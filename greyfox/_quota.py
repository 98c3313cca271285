# -*- test-case-name: tests.test_quota -*-
"""Quota arithmetic: reserve before the upstream is paid, settle after.  Pure.

Every method takes the current time, so tests drive days and minutes with a
fake clock.  The reactor runs one admission at a time, so check-and-reserve
is atomic without locks; concurrent requests can overshoot a limit only by
what a request really used beyond its reservation.

Instances that share a database also hold a lease of each daily limit
(:mod:`greyfox._leases`): then the counters here are this instance's own,
what the others use is learned each second, and a request the lease has no
room for raises :class:`LeaseShort` for the caller to wait for more.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import deque
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Mapping
from zoneinfo import ZoneInfo

import attr

from ._leases import USD, Elsewhere, Want, tokens_subject

if TYPE_CHECKING:
    from ._leases import LeaseBook

WINDOW = 60.0  # seconds of the per-minute limits
#: What :meth:`Quotas.overrun` says of a stream at the end of this instance's lease: wait for a renewal.
WAIT_FOR_LEASE = "wait_for_lease"
#: The loop table is swept of expired conversations when it grows past this (then: twice its size after a sweep).
LOOP_SWEEP_MIN = 4096


@attr.s(auto_attribs=True, frozen=True)
class Limits:
    """A user's limits; 0 = unlimited."""

    daily_tokens: int = 0
    rpm: int = 0
    tpm: int = 0


@attr.s(auto_attribs=True, frozen=True)
class Overrides:
    """Per-user settings from the admin API; ``None`` = the default."""

    daily_tokens: int | None = None
    rpm: int | None = None
    tpm: int | None = None

    def is_empty(self) -> bool:
        return self.daily_tokens is None and self.rpm is None and self.tpm is None


@attr.s(auto_attribs=True)
class Reservation:
    """What an admitted request holds until it is settled."""

    user: str
    day: str
    tokens: int
    usd: float
    tpm_entry: list[float] | None = None  # [time, tokens] in the user's TPM window
    settled: bool = False


class Refused(Exception):
    """A request that would break a limit.  ``code`` is the API error code."""

    def __init__(self, code: str, message: str, retry_after: float, limit: int | None = None,
                 remaining: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.limit = limit
        self.remaining = remaining


class LeaseShort(Exception):
    """The request is within the limits but not within this instance's lease of
    them: more has been asked for; admit it again once the leases are renewed."""


def conversation_fingerprint(model: str | None, body: Mapping[str, Any]) -> int:
    """Model + system prompt + first user message: what a runaway loop keeps resending.

    A loop that appends to a growing conversation keeps the same fingerprint;
    a different conversation gets another one.
    """
    parts: list[Any] = [model]
    messages = body.get("messages")
    if isinstance(messages, list):
        system = first_user = None
        for m in messages:
            if not isinstance(m, dict):
                continue
            role = m.get("role")
            if system is None and role in ("system", "developer"):
                system = [m.get("content")]
            elif first_user is None and role == "user":
                first_user = [m.get("content")]
                break  # a system prompt comes first, if there is one
        if system is None and "system" in body:  # the Messages API's, beside the messages
            system = [body["system"]]
        parts += [system, first_user]
    else:
        parts.append(body.get("instructions"))
        for key in ("prompt", "input"):
            value = body.get(key)
            parts.append(value[:1] if isinstance(value, list) else value)
    # repr, not JSON: the parts come from one parsed body, so the same request
    # gives the same text.  A hash that is the same in every process (not
    # Python's, which is keyed per process): instances sharing a database
    # count each other's calls by it.  63 bits: a PostgreSQL BIGINT.
    digest = hashlib.blake2b(repr(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def duration(seconds: float) -> str:
    """``3725`` -> ``1h2m5s``, the style of OpenAI's ``x-ratelimit-reset-*`` headers."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m or h else "") + f"{s}s"
    return out


@attr.s(auto_attribs=True)
class _Day:
    day: str
    used: dict[str, int] = attr.Factory(dict)
    reserved: dict[str, int] = attr.Factory(dict)
    spent_usd: float = 0.0
    reserved_usd: float = 0.0

    def held(self, user: str) -> int:
        """The user's tokens charged and reserved (here)."""
        return self.used.get(user, 0) + self.reserved.get(user, 0)

    @property
    def held_usd(self) -> float:
        return self.spent_usd + self.reserved_usd


class Quotas:
    """Per-user daily tokens, per-minute requests and tokens, a global daily budget,
    and the runaway-loop breaker.

    Counters live in memory; :meth:`load_day` rebuilds today's from the ledger
    at start, so a restart keeps the day's spend.
    """

    def __init__(
        self,
        defaults: Limits,
        daily_budget_usd: float,
        tz: str,
        loop_max_repeats: int,
        loop_window: float,
        now: float,
        overrides: Mapping[str, Overrides] | None = None,
    ) -> None:
        self.defaults = defaults
        self.daily_budget_usd = daily_budget_usd
        self.tz = ZoneInfo(tz)
        self.loop_max_repeats = loop_max_repeats
        self.loop_window = loop_window
        self.overrides: dict[str, Overrides] = dict(overrides or {})
        self._day_start = self._day_end = 0.0
        self._today = _Day(self.day_of(now))
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[list[float]]] = {}
        # (user, fingerprint) -> times of its calls in the window, oldest first.
        # Tuples of floats: the cycle collector stops tracking them, and a
        # proxy remembers one per conversation seen in the window.
        self._loops: dict[tuple[str, Hashable], tuple[float, ...]] = {}
        self._sweep_at = LOOP_SWEEP_MIN
        self.breakers: dict[tuple[str, Hashable], float] = {}  # (user, fingerprint) -> open until
        #: This instance's leases of the daily limits when instances share a database, else ``None``.
        self.leases: LeaseBook | None = None
        #: Instances sharing a database: calls per (user, fingerprint) since they
        #: were last reported (else ``None``), and the others' calls in the window.
        self.loop_calls_new: dict[tuple[str, Hashable], int] | None = None
        self.loops_elsewhere: dict[tuple[str, Hashable], int] = {}

    def load_day(self, used_today: Iterable[tuple[str, int, float]]) -> None:
        """Add ``(user, tokens, usd)`` already charged today."""
        for user, tokens, usd in used_today:
            self._today.used[user] = self._today.used.get(user, 0) + int(tokens or 0)
            self._today.spent_usd += float(usd or 0)

    # -- time --

    def day_of(self, now: float) -> str:
        if self._day_start <= now < self._day_end:  # today, the common case: no time-zone arithmetic
            return self._today.day
        return datetime.fromtimestamp(now, self.tz).date().isoformat()

    def next_midnight(self, now: float) -> float:
        today = datetime.fromtimestamp(now, self.tz).date()
        return datetime.combine(today + timedelta(days=1), time(0), self.tz).timestamp()

    def _day(self, now: float) -> _Day:
        if self._day_start <= now < self._day_end:  # the common case: no time-zone arithmetic
            return self._today
        day = self.day_of(now)
        if day != self._today.day:
            self._today = _Day(day)
            if self.leases is not None:
                self.leases.roll(day)
        self._day_end = self.next_midnight(now)
        self._day_start = datetime.combine(date.fromisoformat(day), time(0), self.tz).timestamp()
        return self._today

    # -- limits --

    def limits_for(self, user: str) -> Limits:
        o = self.overrides.get(user)
        if o is None:
            return self.defaults
        d = self.defaults
        return Limits(
            d.daily_tokens if o.daily_tokens is None else o.daily_tokens,
            d.rpm if o.rpm is None else o.rpm,
            d.tpm if o.tpm is None else o.tpm,
        )

    def counts_tokens(self, user: str) -> bool:
        """Whether any limit needs this user's requests estimated in tokens or dollars."""
        limits = self.limits_for(user)
        return bool(limits.daily_tokens or limits.tpm or self.daily_budget_usd)

    def remaining(self, user: str, now: float) -> int | None:
        """Daily tokens the user may still reserve, or ``None`` when unlimited."""
        limit = self.limits_for(user).daily_tokens
        if not limit:
            return None
        day = self._day(now)
        return max(0, int(limit - day.held(user) - self._others(tokens_subject(user)).held))

    def _others(self, subject: str) -> Elsewhere:
        """What other instances charged and hold of ``subject``, as last seen (nothing without leases)."""
        return Elsewhere() if self.leases is None else self.leases.others(subject)

    def admit(self, user: str, tokens: int, usd: float, fingerprint: Hashable | None, now: float,
              waited: bool = False) -> Reservation:
        """Check every limit, then reserve; raise :class:`Refused` naming the first that would break.

        With leases, raise :class:`LeaseShort` when only this instance's lease
        is too small; ``waited``: the lease was renewed since, refuse instead."""
        day = self._day(now)
        limits = self.limits_for(user)
        calls = self._check_loop(user, fingerprint, now)

        requests = self._requests.setdefault(user, deque())
        _expire(requests, now)
        if limits.rpm and len(requests) + 1 > limits.rpm:
            raise Refused("rate_limit", f"User {user!r} is over {limits.rpm} requests per minute (GREYFOX_USER_RPM).",
                          requests[0] + WINDOW - now, limits.daily_tokens or None, self.remaining(user, now))

        if limits.daily_tokens:
            left = int(limits.daily_tokens - day.held(user) - self._others(tokens_subject(user)).held)
            if tokens > left:
                raise Refused(
                    "daily_token_limit",
                    f"User {user!r} has {max(0, left)} of {limits.daily_tokens} daily tokens left; this request may use "
                    f"up to {tokens} (prompt + max_tokens). The quota resets at midnight ({self.tz.key}).",
                    self.next_midnight(now) - now, limits.daily_tokens, max(0, left),
                )

        window = self._tokens.get(user)
        if window is not None:
            _expire_pairs(window, now)
        if limits.tpm:
            window = window if window is not None else self._tokens.setdefault(user, deque())
            in_window = sum(entry[1] for entry in window)
            if in_window + tokens > limits.tpm:
                retry = (window[0][0] + WINDOW - now) if window else WINDOW
                raise Refused("rate_limit", f"User {user!r} is over {limits.tpm} tokens per minute (GREYFOX_USER_TPM); "
                              f"this request may use up to {tokens}.", retry, limits.daily_tokens or None,
                              self.remaining(user, now))

        if self.daily_budget_usd:
            left_usd = self.daily_budget_usd - day.held_usd - self._others(USD).held
            if usd > left_usd or left_usd <= 0:
                raise Refused(
                    "daily_budget",
                    f"The daily budget of ${self.daily_budget_usd:g} is spent (${day.spent_usd:.4f} used, "
                    f"${day.reserved_usd:.4f} reserved). It resets at midnight ({self.tz.key}).",
                    self.next_midnight(now) - now, limits.daily_tokens or None, self.remaining(user, now),
                )

        if self.leases is not None:
            self._within_leases(user, limits, day, tokens, usd, waited, now)

        # Every check passed: reserve against all of them at once.
        requests.append(now)
        entry = None
        if limits.tpm:  # (an override set later counts from then on)
            entry = [now, float(tokens)]
            window.append(entry)  # type: ignore[union-attr]
        day.reserved[user] = day.reserved.get(user, 0) + tokens
        day.reserved_usd += usd
        if self.leases is not None:
            self.leases.note(tokens_subject(user), tokens)
            self.leases.note(USD, usd)
        if fingerprint is not None and self.loop_max_repeats:
            self._loops[(user, fingerprint)] = calls + (now,)
            if self.loop_calls_new is not None:
                self.loop_calls_new[(user, fingerprint)] = self.loop_calls_new.get((user, fingerprint), 0) + 1
            if len(self._loops) > self._sweep_at:
                self._sweep(now)
        return Reservation(user, day.day, tokens, usd, entry)

    def _within_leases(self, user: str, limits: Limits, day: _Day, tokens: int, usd: float, waited: bool,
                       now: float) -> None:
        """Raise :class:`LeaseShort` (or, having waited, :class:`Refused`) when a lease has no room for the request."""
        leases = self.leases
        assert leases is not None
        needs: dict[str, float] = {}
        subject = tokens_subject(user)
        if limits.daily_tokens and tokens and tokens > leases.room(subject, day.held(user)):
            needs[subject] = tokens
        if self.daily_budget_usd and usd and usd > leases.room(USD, day.held_usd):
            needs[USD] = usd
        if not needs:
            return
        if not waited:
            for short, amount in needs.items():
                leases.ask(short, amount)
            raise LeaseShort()
        retry = self.next_midnight(now) - now
        if subject in needs:
            raise Refused(
                "daily_token_limit",
                f"User {user!r} is near the {limits.daily_tokens} daily tokens shared by the GreyFox instances, and "
                f"this instance could not get a share of the rest for this request (up to {tokens} tokens).",
                retry, limits.daily_tokens, self.remaining(user, now))
        raise Refused(
            "daily_budget",
            f"The daily budget of ${self.daily_budget_usd:g} is nearly spent across the GreyFox instances, and this "
            f"instance could not get a share of the rest for this request (up to ${usd:.4f}).",
            retry, limits.daily_tokens or None, self.remaining(user, now))

    def lease_wants(self, now: float) -> tuple[str, list[Want]]:
        """Today, and what to report and ask of each subject (see :class:`greyfox._leases.LeaseBook`)."""
        day = self._day(now)
        leases = self.leases
        assert leases is not None
        held = {tokens_subject(u): (float(day.used.get(u, 0)), float(day.held(u))) for u in set(day.used) | set(day.reserved)}
        if day.held_usd or USD in leases.granted:
            held[USD] = (day.spent_usd, day.held_usd)

        def limit(subject: str) -> float:
            if subject == USD:
                return self.daily_budget_usd
            return self.limits_for(subject.partition(":")[2]).daily_tokens

        return day.day, leases.wants(held, limit)

    def _check_loop(self, user: str, fingerprint: Hashable | None, now: float) -> tuple[float, ...]:
        """The conversation's calls still in the window; raise when one more would be a loop."""
        if fingerprint is None or not self.loop_max_repeats:
            return ()
        key = (user, fingerprint)
        until = self.breakers.get(key)
        if until is not None:
            if now < until:
                raise Refused("runaway_loop", self._loop_message(user), until - now)
            del self.breakers[key]
        calls = self._loops.get(key, ())
        if calls and calls[0] <= now - self.loop_window:
            calls = calls[bisect_right(calls, now - self.loop_window):]
        if len(calls) + self.loops_elsewhere.get(key, 0) + 1 > self.loop_max_repeats:
            self.breakers[key] = now + self.loop_window
            self._loops.pop(key, None)
            raise Refused("runaway_loop", self._loop_message(user), self.loop_window)
        return calls

    @property
    def conversations(self) -> int:
        """Conversations the loop breaker remembers (those seen in its window, and some not yet swept)."""
        return len(self._loops)

    def _sweep(self, now: float) -> None:
        """Forget conversations and breakers the window has passed: without
        this, every conversation ever seen stayed in memory.  Runs when the
        table has doubled since the last sweep, so its cost per call is constant."""
        cutoff = now - self.loop_window
        self._loops = {k: calls for k, calls in self._loops.items() if calls[-1] > cutoff}
        self.breakers = {k: until for k, until in self.breakers.items() if until > now}
        self._sweep_at = max(LOOP_SWEEP_MIN, 2 * len(self._loops))

    def _loop_message(self, user: str) -> str:
        return (
            f"Runaway loop: user {user!r} sent more than {self.loop_max_repeats} calls with the same model and "
            f"conversation start within {self.loop_window:g} s. Refused until the window passes or an admin "
            f"resets it (DELETE /api/quotas/{{user}}/breaker)."
        )

    def tripped(self, user: str, now: float) -> list[float]:
        """When each open breaker of ``user`` closes."""
        return [until for (u, _), until in self.breakers.items() if u == user and until > now]

    def reset_breaker(self, user: str) -> int:
        keys = [k for k in self.breakers if k[0] == user]
        for k in keys:
            del self.breakers[k]
        for k in [k for k in self._loops if k[0] == user]:
            del self._loops[k]
        self.loops_elsewhere = {k: n for k, n in self.loops_elsewhere.items() if k[0] != user}
        if self.loop_calls_new:
            self.loop_calls_new = {k: n for k, n in self.loop_calls_new.items() if k[0] != user}
        return len(keys)

    def overrun(self, reservation: Reservation, tokens: int, usd: float, waited: bool = False) -> str | None:
        """The code of the limit that a running request, having used ``tokens``
        and ``usd`` so far, carries its user (or the day) past; ``None`` when
        it is within them.  What other requests hold reserved counts as used.

        With leases: :data:`WAIT_FOR_LEASE` when it is past this instance's
        lease only (more has been asked for); ``waited``: it was renewed since,
        and the lease decides."""
        day = self._today
        if reservation.settled or day.day != reservation.day:
            return None
        user = reservation.user
        # A stream past its reservation holds what it used: the others running
        # beside it see that, not just its reservation.
        if tokens > reservation.tokens:
            day.reserved[user] = day.reserved.get(user, 0) + tokens - reservation.tokens
            if self.leases is not None:
                self.leases.note(tokens_subject(user), tokens - reservation.tokens)
            reservation.tokens = tokens
        if usd > reservation.usd:
            day.reserved_usd += usd - reservation.usd
            if self.leases is not None:
                self.leases.note(USD, usd - reservation.usd)
            reservation.usd = usd
        limit = self.limits_for(user).daily_tokens
        past_lease = None
        if limit:
            held = day.held(user)
            if held + self._others(tokens_subject(user)).held > limit:
                return "daily_token_limit"
            if self._past_lease(tokens_subject(user), held, tokens):
                past_lease = "daily_token_limit"
        budget = self.daily_budget_usd
        if budget:
            held_usd = day.held_usd
            if held_usd + self._others(USD).held > budget:
                return "daily_budget"
            if past_lease is None and self._past_lease(USD, held_usd, usd):
                past_lease = "daily_budget"
        if past_lease is not None and not waited:
            return WAIT_FOR_LEASE
        return past_lease

    def _past_lease(self, subject: str, held: float, step: float) -> bool:
        """Whether ``held`` is past this instance's lease.  Within ``step`` of
        its end (the request's use so far, or its reservation), ask for that
        much more: a long stream's lease grows geometrically."""
        leases = self.leases
        if leases is None:
            return False
        room = leases.room(subject, held)
        if room < step:
            leases.running_low(subject, step)
        return room < 0

    def settle(self, reservation: Reservation, tokens: int, usd: float) -> None:
        """Replace the reservation by what was really charged (0 when nothing was)."""
        if reservation.settled:
            return
        reservation.settled = True
        day = self._today
        if reservation.tpm_entry is not None:
            reservation.tpm_entry[1] = float(tokens)
        if day.day != reservation.day:
            return  # the day rolled over while it ran; the ledger has it on its day
        day.reserved[reservation.user] = day.reserved.get(reservation.user, 0) - reservation.tokens
        if not day.reserved[reservation.user]:
            del day.reserved[reservation.user]
        day.reserved_usd = max(0.0, day.reserved_usd - reservation.usd)
        day.used[reservation.user] = day.used.get(reservation.user, 0) + tokens
        day.spent_usd += usd

    # -- the admin view --

    def users(self, now: float) -> list[dict[str, Any]]:
        day = self._day(now)
        names = set(day.used) | set(day.reserved) | set(self.overrides)
        if self.leases is not None:
            names |= {s.partition(":")[2] for s in self.leases.elsewhere if s.startswith("tokens:")}
        resets_at = self.next_midnight(now)
        out = []
        for user in sorted(names):
            limits = self.limits_for(user)
            o = self.overrides.get(user, Overrides())
            others = self._others(tokens_subject(user))
            out.append(
                {
                    "user": user,
                    "daily_tokens": limits.daily_tokens or None,
                    "rpm": limits.rpm or None,
                    "tpm": limits.tpm or None,
                    "overrides": attr.asdict(o),
                    "used": day.used.get(user, 0) + int(others.used),
                    "reserved": day.reserved.get(user, 0) + int(others.held - others.used),
                    "remaining": self.remaining(user, now),
                    "resets_at": resets_at,
                    "breaker_until": max(self.tripped(user, now), default=None),
                }
            )
        return out

    def global_view(self, now: float) -> dict[str, Any]:
        day = self._day(now)
        others = self._others(USD)
        spent = day.spent_usd + others.used
        reserved = day.reserved_usd + others.held - others.used
        return {
            "daily_budget_usd": self.daily_budget_usd or None,
            "spent_usd": round(spent, 10),
            "reserved_usd": round(reserved, 10),
            "remaining_usd": round(max(0.0, self.daily_budget_usd - spent - reserved), 10)
            if self.daily_budget_usd else None,
            "resets_at": self.next_midnight(now),
        }


def _expire(times: deque[float], now: float) -> None:
    while times and times[0] <= now - WINDOW:
        times.popleft()


def _expire_pairs(entries: deque[list[float]], now: float) -> None:
    while entries and entries[0][0] <= now - WINDOW:
        entries.popleft()
