# -*- test-case-name: tests.test_api -*-
"""The JSON admin API's logic: argument checks, queries, response shapes.

Handlers return ``(status, document)``; the Klein layer in :mod:`greyfox._app`
turns them into responses.  Reads first wait for the ledger's queued rows to
be committed (unless the database is failing), so a request answered a moment
ago is already in ``/api/requests``.
"""

from __future__ import annotations

import os
from datetime import date, datetime, time, timedelta
from typing import Any, Callable, Mapping
from zoneinfo import ZoneInfo

from twisted.internet.defer import Deferred

from . import __version__
from . import _errors as errors, _json
from ._cache import Cache, CacheStats
from ._engines import engine_for
from ._config import Settings
from ._quota import Overrides, Quotas
from ._proxy import valid_user
from ._leases import reset_breaker_txn
from ._store import set_budget_txn, set_override_txn
from ._store import GROUPS, SPLITS, Ledger, requests_txn, usage_txn

Result = tuple[int, dict[str, Any]]

#: How long a ledger write may wait on the database before /healthz says
#: degraded, and before an API read stops waiting for the rows to be written.
STALL_SECONDS = 1.0


def _arg(args: Mapping[bytes, list[bytes]], name: str) -> str | None:
    values = args.get(name.encode())
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def _day(value: str, name: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise errors.bad_request(f"{name} must be a date YYYY-MM-DD, not {value!r}.", "invalid_date", name) from None


def _whole(value: str, name: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = low - 1
    if not low <= n <= high:
        raise errors.bad_request(f"{name} must be a whole number from {low} to {high}.", "invalid_number", name)
    return n


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = _json.loads_request(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.bad_request(f"The request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(doc, dict):
        raise errors.bad_request("The request body must be a JSON object.", "invalid_json")
    return doc


class Api:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        run: Callable[..., Deferred[Any]],
        seconds: Callable[[], float],
        started: float,
        cache: Cache,
        cache_stats: CacheStats,
        quotas: Quotas,
        inflight: Callable[[], list[dict[str, Any]]] = list,
        read: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """:param inflight: the requests in flight now (``Proxy.inflight``).
        :param read: runs the read-only queries (``run`` when not given): on
            a connection of their own, a write waiting on a locked database
            does not hold them up."""
        self._inflight = inflight
        self.read = read or run
        self.cache = cache
        self.cache_stats = cache_stats
        self.quotas = quotas
        self.settings = settings
        self.ledger = ledger
        self.run = run
        #: Limit changes made through this instance (a look at the shared database
        #: that began before one must not undo it: see GreyFoxService._learn_limits).
        self.limit_writes = 0
        self.seconds = seconds
        self.started = started
        self.tz = ZoneInfo(settings.tz)

    async def _settled(self) -> None:
        """Let the rows recorded so far reach the database, for a second at most:
        a locked database must not hold an API read up."""
        if self.ledger.degraded is None:
            await self.ledger.flush(within=STALL_SECONDS)

    def _midnight(self, day: date) -> float:
        return datetime.combine(day, time(0), self.tz).timestamp()

    def today(self) -> date:
        return datetime.fromtimestamp(self.seconds(), self.tz).date()

    async def usage(self, args: Mapping[bytes, list[bytes]]) -> Result:
        group = _arg(args, "group") or "user"
        if group not in GROUPS:
            raise errors.bad_request(f"group must be one of {', '.join(GROUPS)}.", "invalid_group", "group")
        split = _arg(args, "split") or None
        if split is not None and (split not in SPLITS or split == group):
            raise errors.bad_request(f"split must be one of {', '.join(SPLITS)} and differ from group.", "invalid_split", "split")
        today = self.today()
        raw_from, raw_to = _arg(args, "from"), _arg(args, "to")
        day_from = _day(raw_from, "from") if raw_from else today
        day_to = _day(raw_to, "to") if raw_to else (day_from if raw_from and not raw_to else today)
        if day_to < day_from:
            raise errors.bad_request("to must not be before from.", "invalid_range", "to")
        await self._settled()
        start = self._midnight(day_from)
        offset = int(datetime.fromtimestamp(start, self.tz).utcoffset().total_seconds())  # type: ignore[union-attr]
        rows = await self.read(usage_txn, group, start, self._midnight(day_to + timedelta(days=1)), split, offset)
        doc = {"group": group, "from": day_from.isoformat(), "to": day_to.isoformat(), "rows": rows}
        if split is not None:
            doc["split"] = split
        return 200, doc

    async def requests(self, args: Mapping[bytes, list[bytes]]) -> Result:
        limit = _whole(_arg(args, "limit") or "50", "limit", 1, 500)
        raw_before = _arg(args, "before")
        before = _whole(raw_before, "before", 1, 2**62) if raw_before else None
        filters: dict[str, Any] = {}
        for name, column in (("user", "user"), ("model", "model"), ("cache", "cache")):
            value = _arg(args, name)
            if value:
                filters[column] = value.upper() if name == "cache" else value
        status = _arg(args, "status")
        if status:
            filters["status"] = _whole(status, "status", 100, 599)
        await self._settled()
        rows = await self.read(requests_txn, limit + 1, before, filters)
        more = len(rows) > limit
        rows = rows[:limit]
        return 200, {
            "requests": [self.present(r) for r in rows],
            "next": rows[-1]["id"] if more else None,
        }

    def present(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A ledger row as the API shows it."""
        out = dict(row)
        out["time"] = datetime.fromtimestamp(out.pop("ts"), self.tz).isoformat(timespec="milliseconds")
        out.pop("day", None)
        out["stream"] = bool(out["stream"])
        out["cost_known"] = out["cost_usd"] is not None
        return out

    def status(self) -> Result:
        engine = engine_for(self.settings.db)
        size = None
        if engine.name == "sqlite":
            try:
                size = os.path.getsize(engine.location)
            except OSError:
                pass
        return 200, {
            "version": __version__,
            "uptime_s": round(self.seconds() - self.started, 3),
            "mode": self.settings.mode,
            "default_upstream": self.settings.default_upstream,
            "upstreams": [
                {"name": u.name, "base_url": u.base_url, "key_configured": u.has_key}
                for u in self.settings.upstreams.values()
            ],
            "db": {"engine": engine.name, "path": os.path.abspath(engine.location) if engine.name == "sqlite" else engine.shown(),
                   "size_bytes": size},
            "ledger": {
                "pending_rows": self.ledger.pending,
                "written_rows": self.ledger.written,
                "degraded": self.ledger.degraded,
            },
        }

    def cache_info(self) -> Result:
        st = self.cache_stats
        lookups = st.hits + st.misses
        return 200, {
            "entries": self.cache.stored,
            "bytes": self.cache.bytes,
            "max_bytes": self.cache.max_bytes,
            "hits": st.hits,
            "misses": st.misses,
            "hit_rate": round(st.hits / lookups, 4) if lookups else None,
            "saved_tokens": st.saved_tokens,
            "saved_usd": round(st.saved_usd, 10),
        }

    async def cache_clear(self, args: Mapping[bytes, list[bytes]]) -> Result:
        """``DELETE /api/cache[?model=M][&older_than_days=N]``."""
        model = _arg(args, "model")
        days = _arg(args, "older_than_days")
        older_than = None
        if days is not None:
            try:
                n = float(days)
            except ValueError:
                n = -1
            if not n >= 0:
                raise errors.bad_request("older_than_days must be a number >= 0.", "invalid_number", "older_than_days")
            older_than = self.seconds() - n * 86400
        deleted = await self.cache.clear(model=model, older_than=older_than)
        return 200, {"deleted": deleted, "entries": self.cache.stored, "bytes": self.cache.bytes}

    def inflight(self) -> Result:
        """``GET /api/inflight``: every request in flight, oldest first, with its tokens so far."""
        requests = sorted(self._inflight(), key=lambda r: r["id"])
        for r in requests:
            r["started"] = datetime.fromtimestamp(r["started"], self.tz).isoformat(timespec="milliseconds")
        return 200, {"requests": requests}

    # -- quotas --

    def _iso(self, ts: float) -> str:
        return datetime.fromtimestamp(ts, self.tz).isoformat()

    def quotas_view(self) -> Result:
        now = self.seconds()
        users = self.quotas.users(now)
        for u in users:
            u["resets_at"] = self._iso(u["resets_at"])
            if u["breaker_until"] is not None:
                u["breaker_until"] = self._iso(u["breaker_until"])
        view = self.quotas.global_view(now)
        view["resets_at"] = self._iso(view["resets_at"])
        return 200, {
            "defaults": {"daily_tokens": self.settings.daily_tokens or None, "rpm": self.settings.user_rpm or None,
                         "tpm": self.settings.user_tpm or None},
            "users": users,
            "global": view,
        }

    async def set_user(self, user: str, body: bytes) -> Result:
        """``PUT /api/quotas/{user}``: set or clear (null) a user's limits; effective at once."""
        if not valid_user(user):
            raise errors.bad_request("Not a valid user id.", "invalid_user_id")
        doc = _json_object(body)
        current = self.quotas.overrides.get(user, Overrides())
        values = {}
        for field in ("daily_tokens", "rpm", "tpm"):
            if field not in doc:
                values[field] = getattr(current, field)
                continue
            value = doc[field]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise errors.bad_request(f"{field} must be a whole number >= 0 or null.", "invalid_number", field)
            values[field] = value
        unknown = set(doc) - {"daily_tokens", "rpm", "tpm"}
        if unknown:
            raise errors.bad_request(f"Unknown field(s): {', '.join(sorted(unknown))}.", "invalid_field")
        overrides = Overrides(**values)
        self.limit_writes += 1
        await self.run(set_override_txn, user, (overrides.daily_tokens, overrides.rpm, overrides.tpm))
        if overrides.is_empty():
            self.quotas.overrides.pop(user, None)
        else:
            self.quotas.overrides[user] = overrides
        return 200, {"user": user, "overrides": values}

    async def set_budget(self, body: bytes) -> Result:
        """``PUT /api/quotas``: the global daily budget (null = back to the setting)."""
        doc = _json_object(body)
        if "daily_budget_usd" not in doc:
            raise errors.bad_request("Send {\"daily_budget_usd\": x}.", "invalid_field", "daily_budget_usd")
        value = doc["daily_budget_usd"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise errors.bad_request("daily_budget_usd must be a number >= 0 or null.", "invalid_number", "daily_budget_usd")
        self.limit_writes += 1
        await self.run(set_budget_txn, None if value is None else float(value))
        self.quotas.daily_budget_usd = self.settings.daily_budget_usd if value is None else float(value)
        return 200, {"daily_budget_usd": self.quotas.daily_budget_usd or None}

    async def reset_breaker(self, user: str) -> Result:
        """``DELETE /api/quotas/{user}/breaker``: here at once, on instances sharing the database within a second."""
        await self.run(reset_breaker_txn, user, self.seconds())
        return 200, {"user": user, "reset": self.quotas.reset_breaker(user)}

    def health(self) -> Result:
        if self.ledger.degraded is not None:
            return 503, {"status": "degraded", "reason": self.ledger.degraded}
        stalled = self.ledger.stalled()
        if stalled > STALL_SECONDS:
            return 503, {"status": "degraded",
                         "reason": f"the database has not taken a ledger write for {stalled:.1f} s (locked?)"}
        return 200, {"status": "ok"}
