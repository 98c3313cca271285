# -*- test-case-name: tests.test_api -*-
"""Prometheus counters, fed once per request when its ledger row is queued.

Uses ``prometheus_client`` with a private registry: its text exposition is a
pure function, so it fits a Twisted process with no extra thread or server.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ._store import LedgerRow

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, pending: Callable[[], int], degraded: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "greyfox_requests", "Requests relayed or answered", ["upstream", "status_class", "cache"], registry=r
        )
        self.tokens = Counter("greyfox_tokens", "Tokens charged", ["upstream", "kind"], registry=r)
        self.cost = Counter("greyfox_cost_usd", "Dollars charged (priced models only)", ["upstream"], registry=r)
        self.saved_tokens = Counter("greyfox_cache_saved_tokens", "Tokens answered from the cache", registry=r)
        self.latency = Histogram(
            "greyfox_request_latency_seconds",
            "Whole-request latency",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        g = Gauge("greyfox_ledger_pending_rows", "Ledger rows not yet committed", registry=r)
        g.set_function(lambda: float(pending()))
        h = Gauge("greyfox_degraded", "1 when the database is not writable", registry=r)
        h.set_function(lambda: 1.0 if degraded() else 0.0)

    def observe(self, row: LedgerRow) -> None:
        upstream = row.upstream or "none"
        self.requests.labels(upstream, f"{row.status // 100}xx", row.cache).inc()
        if row.cache != "HIT":
            self.tokens.labels(upstream, "prompt").inc(row.prompt_tokens)
            self.tokens.labels(upstream, "completion").inc(row.completion_tokens)
            if row.cost_usd:
                self.cost.labels(upstream).inc(row.cost_usd)
        self.saved_tokens.inc(row.saved_tokens)
        if row.latency_ms is not None:
            self.latency.observe(row.latency_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
