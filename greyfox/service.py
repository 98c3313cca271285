# -*- test-case-name: tests.test_daemon -*-
"""The GreyFox service: owns the listening port, the HTTP pool, the DB pool.

Everything with a lifetime is opened in ``startService`` and closed in
``stopService``, in the order that loses nothing: stop accepting, let
in-flight requests finish (then cancel stragglers), flush the ledger, close
the pools.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, Callable

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._api import Api
from ._app import GreyFoxApp
from ._cache import LEARN_BATCH, LEARN_WINDOW, Cache, recent_entries_txn
from ._collector import FullCollections
from ._config import Settings
from ._engines import engine_for
from ._http import QuietSite, no_delay_listening
from ._leases import INTERVAL as LEASE_INTERVAL, LeaseBook, LeaseKeeper, load_leases_txn, loop_calls_txn
from ._upstream import UpstreamClient
from ._metrics import Metrics
from ._pricing import PriceTable
from ._proxy import Proxy
from ._quota import Limits, Overrides, Quotas
from ._store import (
    Connection, Ledger, Pool, day_totals, day_totals_txn, limits_txn, prepare_database, recover_spill, release_ids_txn,
    row_json, spill,
)
from ._tokens import encoding_name_for, load_encodings

log = Logger()

#: Seconds in-flight requests get to finish when the service stops.
SHUTDOWN_GRACE = 10.0
#: Seconds between looks for cache entries other instances stored.
LEARN_INTERVAL = 1.0


class _Listener(Service):
    """Listens on a strports endpoint; a failure to bind raises at start."""

    def __init__(self, reactor: Any, description: str, factory: Any) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        outcome: list[Any] = []
        endpoint.listen(self.factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            failure = outcome[0]
            if failure.check(CannotListenError):
                sys.stderr.write(f"greyfox: GREYFOX_LISTEN: cannot listen on {self.description!r}: {failure.value.socketError}\n")
                raise SystemExit(1)
            failure.raiseException()
        self.port = outcome[0] if outcome else None
        if self.port is not None:
            no_delay_listening(self.port)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


def instance_name(port: Any) -> str:
    """The default ``GREYFOX_INSTANCE``: this host's name and the port it listens on."""
    import socket

    address = port.getHost() if port is not None else None
    where = getattr(address, "port", None) or getattr(address, "name", None) or "?"
    return f"{socket.gethostname()}:{where}"


def in_thread(reactor: Any, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """``f(*args)`` in the reactor's thread pool: work that must not hold up the reactor."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


class Encodings:
    """Tokenizers, loaded once, in a thread, the first time they are needed.

    They take about 70 MB and half a second to load, and a proxy whose
    upstreams report usage rarely needs them; until they are loaded a count
    falls back to a rough estimate.  With token limits configured they are
    loaded at start.
    """

    def __init__(self, reactor: Any, cache_dir: str) -> None:
        self._reactor = reactor
        self._cache_dir = cache_dir
        self._loaded: dict[str, Any] = {}
        self._by_model: dict[str, Any] = {}
        self._loading: defer.Deferred[None] | None = None

    def load(self) -> defer.Deferred[None]:
        if self._loading is None:
            d = in_thread(self._reactor, load_encodings, self._cache_dir)

            def loaded(encodings: dict[str, Any]) -> None:
                self._loaded = encodings
                self._by_model.clear()
                gc.freeze()  # they live as long as the process: see GreyFoxService.startService

            def failed(f: Failure) -> None:
                log.failure("could not load the tokenizers; token counts will be rough estimates", f)

            self._loading = d.addCallbacks(loaded, failed)
        return self._loading

    def when_loaded(self) -> defer.Deferred[None]:
        """A new Deferred that fires (with ``None``) once loading ended, well or not."""
        d: defer.Deferred[None] = defer.Deferred()
        self.load().addBoth(lambda result: (d.callback(None), result)[1])
        return d

    @property
    def ready(self) -> bool:
        return bool(self._loaded)

    def for_model(self, model: str) -> Any:
        try:
            return self._by_model[model]
        except KeyError:
            pass
        if not self._loaded:
            self.load()
            return None
        enc = self._loaded.get(encoding_name_for(model))
        if len(self._by_model) < 10_000:
            self._by_model[model] = enc
        return enc


class GreyFoxService(MultiService):
    """One GreyFox: a proxy, its ledger and its console on one port.

    The constructor prepares the database synchronously, so an unusable DB
    path stops the start before anything listens.
    """

    def __init__(self, settings: Settings, reactor: Any = None, on_row: Callable[[Any], None] | None = None,
                 on_replay_miss: Callable[[Any], None] | None = None) -> None:
        """:param on_row: told every ledger row as it is queued (``greyfox ci`` sums them).
        :param on_replay_miss: told every request replay mode could not answer."""
        super().__init__()
        self._on_row = on_row
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.settings = settings
        self.reactor = reactor
        self.engine = engine_for(settings.db)
        state = prepare_database(settings.db)
        self.dbpool = Pool(settings.db, reactor)
        # Reads on a connection of their own (SQLite's WAL lets them run beside
        # the writer): a write waiting on a locked database holds up no read.
        self.readpool = Pool(settings.db, reactor)
        self.ledger = Ledger(self.dbpool.runInteraction, reactor, state.last_id,
                             spill=lambda rows: in_thread(reactor, spill, settings.db, rows),
                             recover=lambda: in_thread(reactor, recover_spill, settings.db))
        self.cache = Cache(
            self.dbpool.runInteraction,
            reactor,
            state.cache_entries,
            ttl=settings.cache_ttl,
            max_bytes=int(settings.cache_max_mb * 1024 * 1024),
            read=self.readpool.runInteraction,
        )
        self.encodings = Encodings(reactor, os.path.join(self.engine.local_dir, "tiktoken"))
        self.metrics = Metrics(lambda: self.ledger.pending, lambda: self.ledger.degraded is not None)
        self.http = UpstreamClient(reactor, settings.connect_timeout)
        self.prices = PriceTable(settings.prices, base_urls={u.name: u.base_url for u in settings.upstreams.values()})
        now = reactor.seconds()
        self.quotas = Quotas(
            Limits(settings.daily_tokens, settings.user_rpm, settings.user_tpm),
            state.budget_override if state.budget_override is not None else settings.daily_budget_usd,
            settings.tz,
            settings.loop_max_repeats,
            settings.loop_window,
            now,
            overrides={u: Overrides(*v) for u, v in state.overrides.items()},
        )
        #: Instances may share a PostgreSQL database, and then share its limits by leases.
        self.leases: LeaseKeeper | None = None
        if self.engine.name == "postgresql":  # its own spend is loaded once it knows its name (startService)
            self.quotas.leases = LeaseBook(self.quotas.day_of(now))
            self.leasepool = Pool(settings.db, reactor)  # (grants wait for no ledger write or slow read)
            self.leases = LeaseKeeper(self.leasepool.runInteraction, self.quotas, lambda: self.proxy.instance or "",
                                      reactor)
        else:
            self.quotas.load_day(day_totals(settings.db, self.quotas.day_of(now)))
        self.proxy = Proxy(
            settings,
            self.http,
            reactor,
            self.ledger,
            self.prices,
            self.cache,
            state.secret,
            self.quotas,
            encoding_for=self.encodings.for_model,
            on_settle=self._settled,
            run_in_thread=lambda f, *args: in_thread(reactor, f, *args),
            load_encodings=self.encodings.when_loaded,
            on_count_difference=self.metrics.count_difference,
            **({"renew_leases": self.leases.sync} if self.leases is not None else {}),
            **({"on_replay_miss": on_replay_miss} if on_replay_miss is not None else {}),
        )
        self.cache_stats = state.cache_stats
        self.api = Api(settings, self.ledger, self.dbpool.runInteraction, reactor.seconds, reactor.seconds(),
                       self.cache, self.cache_stats, self.quotas, inflight=self.proxy.inflight,
                       read=self.readpool.runInteraction)
        app = GreyFoxApp(self.proxy, self.api, self.metrics, settings.admin_token)
        self.site = QuietSite(app.resource(), max_body=settings.max_body_bytes)
        self.site.displayTracebacks = False
        self.listener = _Listener(reactor, settings.listen, self.site)
        self.listener.setServiceParent(self)
        self._seen_id = self.ledger.last_id
        FullCollections(reactor, busy=self._busy).setServiceParent(self)
        if self.leases is not None:  # instances sharing the database learn each other's answers and use
            self._learned_to = self.cache.newest()
            self._learn_from = self._learned_to - LEARN_WINDOW
            self.quotas.loop_calls_new = {}
            self._resets_seen = now
            for interval, look in ((LEARN_INTERVAL, self._learn_cache), (LEARN_INTERVAL, self._learn_limits),
                                   (LEASE_INTERVAL, self.leases.tick), (LEASE_INTERVAL, self._share_loops)):
                learning = TimerService(interval, look)
                learning.clock = reactor
                learning.setServiceParent(self)

    def _busy(self) -> bool:
        """Whether a request is in flight or arrived since the last time this was asked.

        In-flight requests alone are not enough: a cache hit from memory is
        answered at once and is never in flight, so under a load of hits the
        proxy looked idle and full collections (tens of ms with a large cache
        index) landed in the middle of it (p99 of hits at c=64: ~100 ms).
        """
        seen, self._seen_id = self._seen_id, self.ledger.last_id
        return bool(self.proxy.in_flight) or self._seen_id != seen

    def _learn_cache(self) -> defer.Deferred[None]:
        """Add the entries other instances stored lately to the cache index (SPEC §8: a hit everywhere within 2 s)."""

        def learned(entries: list[Any]) -> None:
            self.cache.learn(entries)
            if entries:
                self._learned_to = max(self._learned_to, entries[-1].created)
            # A full batch: go on from its last entry; else look back over the window again.
            self._learn_from = entries[-1].created if len(entries) >= LEARN_BATCH else self._learned_to - LEARN_WINDOW

        d = self.readpool.runInteraction(recent_entries_txn, self._learn_from)
        return d.addCallbacks(learned, lambda f: None)  # (a database that does not answer now: the next look)

    def _learn_limits(self) -> defer.Deferred[None]:
        """Take the limit overrides and budget set through other instances (SPEC §8: within 2 s)."""
        writes = self.api.limit_writes

        def learned(found: tuple[dict[str, Any], float | None]) -> None:
            if self.api.limit_writes != writes:  # changed here meanwhile: the next look reads that too
                return
            overrides, budget = found
            self.quotas.overrides = {u: Overrides(*v) for u, v in overrides.items()}
            self.quotas.daily_budget_usd = self.settings.daily_budget_usd if budget is None else budget

        d = self.readpool.runInteraction(limits_txn)
        return d.addCallbacks(learned, lambda f: None)

    def _share_loops(self) -> defer.Deferred[None] | None:
        """Report this instance's calls per conversation and learn the others'
        (SPEC §8: the loop breaker counts across instances), and the breakers
        reset through other instances."""
        quotas = self.quotas
        if not quotas.loop_max_repeats or self.proxy.instance is None:  # (not named until it listens)
            return None
        calls, quotas.loop_calls_new = quotas.loop_calls_new or {}, {}
        now = self.reactor.seconds()

        def learned(found: tuple[dict[Any, int], list[tuple[str, float]]]) -> None:
            quotas.loops_elsewhere, resets = found
            for user, at in resets:
                quotas.reset_breaker(user)
                self._resets_seen = max(self._resets_seen, at)

        def failed(_: Any) -> None:  # the next report carries these calls
            for key, n in calls.items():
                quotas.loop_calls_new[key] = quotas.loop_calls_new.get(key, 0) + n  # type: ignore[index]

        d = self.leasepool.runInteraction(loop_calls_txn, self.proxy.instance, calls, now, quotas.loop_window,
                                          self._resets_seen)
        return d.addCallbacks(learned, failed)

    def _settled(self, call: Any, row: Any) -> None:
        self.metrics.observe(row)
        self.cache_stats.observe(row.cache, row.saved_tokens, row.saved_usd)
        if self._on_row is not None:
            self._on_row(row)

    def startService(self) -> None:
        s = self.settings
        upstreams = ", ".join(
            f"{u.name}={u.base_url}{'' if u.has_key else ' (no key: client credential passes through)'}"
            for u in s.upstreams.values()
        )
        log.info("GreyFox starting: mode={mode}, db={db}, upstreams: {upstreams}", mode=s.mode, db=self.engine.shown(),
                 upstreams=upstreams)
        warning = s.exposure_warning()
        if warning:
            log.warn("{warning}", warning=warning)
        # What exists now (modules, settings, the cache index loaded from the
        # database) lives as long as the process: freeze it, so that the
        # collector's full passes, which stop every connection, do not walk it
        # again.
        gc.collect()
        gc.freeze()
        super().startService()
        if self.proxy.instance is None:
            self.proxy.instance = instance_name(self.port)
        if self.leases is not None:
            self._load_own_day(self.proxy.instance)
        if s.daily_tokens or s.user_tpm or s.daily_budget_usd:
            self.encodings.load()  # admission estimates need them from the first request

    def _load_own_day(self, instance: str) -> None:
        """This instance's spend today, its leases (a restart under the same name
        takes them back) and the others' use: once, at start, before the first request."""
        quotas, book = self.quotas, self.quotas.leases
        assert book is not None
        day = quotas.day_of(self.reactor.seconds())
        conn = Connection(self.engine)
        try:
            quotas.load_day(day_totals_txn(conn, day, instance))
            book.granted, book.elsewhere = load_leases_txn(conn, day, instance)
        finally:
            conn.close()

    @property
    def port(self) -> Any:
        return self.listener.port

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield defer.maybeDeferred(super().stopService)  # stop accepting connections
        pending = list(self.proxy.in_flight)
        if pending:
            log.info("waiting up to {grace} s for {n} in-flight requests", grace=SHUTDOWN_GRACE, n=len(pending))
            waiting = defer.DeferredList(pending, consumeErrors=True)
            timer = self.reactor.callLater(SHUTDOWN_GRACE, lambda: [d.cancel() for d in pending])
            yield waiting
            if timer.active():
                timer.cancel()
        # Rows of long answers without usage are queued once our count of them is done (in a thread).
        deadline = self.reactor.seconds() + SHUTDOWN_GRACE
        yield self._wait_while(lambda: bool(self.proxy.counting) and self.reactor.seconds() < deadline)
        if self.proxy.counting:
            log.error("LOST the ledger rows of {n} answers still being counted at shutdown", n=len(self.proxy.counting))
        yield self.cache.flush()  # answers stored in the last moments (a failed write is logged, as ever)
        if self.leases is not None:  # report the last spend and hand back what is not used
            self.quotas.leases.stopping()
            yield self.leases.sync()
        # Give a failing database a few seconds, then keep the rows in a side
        # file that the next start inserts: nothing recorded is lost.
        deadline = self.reactor.seconds() + 5
        yield self._wait_while(
            lambda: bool(self.ledger.pending) and (self.ledger.degraded is None or self.reactor.seconds() < deadline))
        yield self._wait_while(lambda: bool(self.ledger.writing))  # let the last attempt finish, whatever it does
        if self.ledger.pending:
            rows = self.ledger.take_all()
            try:
                path = spill(self.settings.db, rows)
                log.warn("database not writable at shutdown: {n} ledger rows kept in {path}, inserted at next start",
                         n=len(rows), path=path)
            except OSError as e:  # a full disk: the log is the last place left
                log.critical("database and side file both failed ({e}): the {n} unsaved ledger rows follow, "
                             "one JSON line each (greyfox_unsaved_row)", n=len(rows), e=e)
                for row in rows:
                    log.critical("greyfox_unsaved_row {row}", row=row_json(row))
        if not self.ledger.pending:  # ids continue where they ended: no gap after a clean stop
            yield self.dbpool.runInteraction(release_ids_txn, self.ledger.last_id, self.ledger.reserved_to).addErrback(
                lambda _: None)
        yield self.http.close()
        self.dbpool.close()
        self.readpool.close()
        if self.leases is not None:
            self.leasepool.close()

    @defer.inlineCallbacks
    def _wait_while(self, busy: Callable[[], bool]) -> Any:
        """Look again every 20 ms until ``busy()`` is false (from the reactor: never inside
        the callbacks that change it)."""
        while busy():
            yield deferLater(self.reactor, 0.02, lambda: None)
