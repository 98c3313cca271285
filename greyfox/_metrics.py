# -*- test-case-name: tests.test_ledger -*-
"""Prometheus metrics, counted in plain dicts per request and exposed at scrape time.

``prometheus_client``'s labelled metrics take a lock and look up a child per
call, for every request.  So requests add to plain counters here, and a custom collector turns them
into metric families only when ``/metrics`` is scraped (the library's own
pattern for exporters).  A private registry: the text exposition is a pure
function, so it fits a Twisted process with no extra thread or server.  The
library is imported on the first scrape (1.2 MB of idle RSS otherwise).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ._store import LedgerRow

if TYPE_CHECKING:
    from prometheus_client.core import Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Our count of a stream's completion tokens minus the upstream's (tokens).
DIFFERENCE_BUCKETS = (-100, -10, -1, 0, 1, 10, 100)


def _histogram(bounds: tuple[float, ...]) -> list[int]:
    return [0] * (len(bounds) + 1)  # the last one is +Inf


class Metrics:
    """Counters fed once per request (when its ledger row is queued)."""

    def __init__(self, pending: Callable[[], int], degraded: Callable[[], bool]) -> None:
        self._pending = pending
        self._degraded = degraded
        self.requests: defaultdict[tuple[str, int, str], int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.cost: defaultdict[str, float] = defaultdict(float)
        self.saved_tokens = 0
        self.latency_counts = _histogram(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.difference_counts = _histogram(DIFFERENCE_BUCKETS)
        self.difference_sum = 0
        self._registry: Any = None

    def observe(self, row: LedgerRow) -> None:
        upstream = row.upstream or "none"
        self.requests[(upstream, row.status // 100, row.cache)] += 1  # (the class's text at scrape time)
        if row.cache != "HIT":
            self.tokens[(upstream, "prompt")] += row.prompt_tokens
            self.tokens[(upstream, "completion")] += row.completion_tokens
            # details, each already counted in prompt or completion above
            self.tokens[(upstream, "cached")] += row.cached_tokens
            self.tokens[(upstream, "cache_write")] += row.cache_write_tokens
            self.tokens[(upstream, "reasoning")] += row.reasoning_tokens
            if row.cost_usd:
                self.cost[upstream] += row.cost_usd
        self.saved_tokens += row.saved_tokens
        if row.latency_ms is not None:
            seconds = row.latency_ms / 1000
            self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def count_difference(self, tokens: int) -> None:
        """A stream with upstream usage: our count of its completion minus the upstream's."""
        self.difference_counts[bisect_left(DIFFERENCE_BUCKETS, tokens)] += 1
        self.difference_sum += tokens

    # -- the collector --

    def collect(self) -> Iterator["Metric"]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        requests = CounterMetricFamily(
            "greyfox_requests", "Requests relayed or answered", labels=["upstream", "status_class", "cache"]
        )
        for (upstream, status_class, cache), n in sorted(self.requests.items()):
            requests.add_metric([upstream, f"{status_class}xx", cache], n)
        yield requests
        tokens = CounterMetricFamily("greyfox_tokens", "Tokens charged", labels=["upstream", "kind"])
        for labels, n in sorted(self.tokens.items()):
            tokens.add_metric(list(labels), n)
        yield tokens
        cost = CounterMetricFamily("greyfox_cost_usd", "Dollars charged (priced models only)", labels=["upstream"])
        for upstream, usd in sorted(self.cost.items()):
            cost.add_metric([upstream], usd)
        yield cost
        yield CounterMetricFamily("greyfox_cache_saved_tokens", "Tokens answered from the cache", value=self.saved_tokens)
        yield HistogramMetricFamily(
            "greyfox_request_latency_seconds", "Whole-request latency",
            buckets=_cumulative(LATENCY_BUCKETS, self.latency_counts, floatToGoString), sum_value=self.latency_sum,
        )
        yield HistogramMetricFamily(
            "greyfox_stream_count_difference_tokens",
            "Streams with upstream usage: GreyFox's count of the completion tokens as they passed, minus the "
            "upstream's (no _sum: it can be negative)",
            buckets=_cumulative(DIFFERENCE_BUCKETS, self.difference_counts, floatToGoString), sum_value=self.difference_sum,
        )
        yield GaugeMetricFamily("greyfox_ledger_pending_rows", "Ledger rows not yet committed", value=float(self._pending()))
        yield GaugeMetricFamily("greyfox_degraded", "1 when the database is not writable", value=1.0 if self._degraded() else 0.0)

    def render(self) -> tuple[bytes, bytes]:
        """The text exposition and its content type."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self)
        return generate_latest(self._registry), CONTENT_TYPE_LATEST.encode()


def _cumulative(bounds: tuple[float, ...], counts: list[int], label: Callable[[float], str]) -> list[tuple[str, int]]:
    """Prometheus buckets (upper bound, count at or below it) from per-bucket counts."""
    buckets, running = [], 0
    for bound, n in zip([*map(label, bounds), "+Inf"], counts):
        running += n
        buckets.append((bound, running))
    return buckets
