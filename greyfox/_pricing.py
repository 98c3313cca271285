# -*- test-case-name: tests.test_pricing -*-
"""Dollars from tokens.  A model nobody has a price for costs ``None``, never 0.

Where a price comes from, in order (each row's ``cost_source``):

* ``upstream``: the upstream's own figure in its usage (OpenRouter's ``cost``);
* ``config``: ``[prices."MODEL"]`` in the config file, MODEL as sent upstream;
* ``table``: the ``genai-prices`` database, a maintained package with
  historic prices, cache read and write rates and per-provider rates.

The database is asked once per (upstream, model) and its rates kept as
floats, so pricing a request is a few multiplications; only a model whose
price changes with the time of the request (an off-peak discount) is asked
again, for its rates at that time.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import attr

from ._usage import Usage

#: GreyFox's built-in upstreams and the database's names for their providers.
PROVIDERS = {"openai": "openai", "deepseek": "deepseek", "openrouter": "openrouter", "anthropic": "anthropic"}

#: (upstream, model) pairs remembered; model names come from clients, so bounded.
MEMO_SIZE = 4096


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Price:
    """USD per 1M tokens.  Without their own rates, cached and cache-write
    tokens cost the input rate.  ``tiers``: ``(start, price)`` pairs, the
    price of a request whose prompt is longer than ``start`` tokens."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None
    tiers: tuple[tuple[int, "Price"], ...] = ()

    def cost(self, usage: Usage) -> float:
        price = self
        for start, tier in reversed(self.tiers):
            if usage.prompt_tokens > start:
                price = tier
                break
        return price._linear(usage)

    def _linear(self, usage: Usage) -> float:
        cached = usage.cached_tokens
        written = usage.cache_write_tokens
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write is None else self.cache_write
        dollars = (
            (usage.prompt_tokens - cached - written) * self.input
            + cached * cached_rate
            + written * write_rate
            + usage.completion_tokens * self.output
        ) / 1_000_000
        return round(dollars, 10)


def price_of(row: Mapping[str, Any]) -> Price:
    """A config file's ``[prices."MODEL"]`` row (validated by the config loader)."""
    return Price(float(row["input"]), float(row["output"]),
                 None if row.get("cached_input") is None else float(row["cached_input"]),
                 None if row.get("cache_write") is None else float(row["cache_write"]))


#: ``(upstream name, base URL, model, when) -> (Price or None, whether it depends on when)``.
Database = Callable[[str, str, str, float], tuple[Price | None, bool]]


class PriceTable:
    """Prices by (upstream, model): the config's overrides, else the database.

    :param overrides: model -> ``{"input", "output", "cached_input", "cache_write"}``.
    :param database: see :data:`Database`; :func:`genai_prices_database` by default.
    :param base_urls: upstream name -> base URL (how the database tells custom upstreams apart).
    """

    def __init__(self, overrides: Mapping[str, Mapping[str, Any]] | None = None, database: Database | None = None,
                 base_urls: Mapping[str, str] | None = None) -> None:
        self._overrides = {model: price_of(row) for model, row in (overrides or {}).items()}
        self._database = database if database is not None else genai_prices_database()
        self._base_urls = dict(base_urls or {})
        self._memo: dict[tuple[str, str], Price | None] = {}
        # The last answer: a relayed answer is priced for its cache entry and
        # again for its ledger row (Usage is frozen).
        self._last: tuple[str, str, Usage | None, tuple[float | None, str | None]] = ("", "", None, (None, None))

    def lookup(self, upstream: str, model: str, when: float | None = None) -> tuple[Price | None, str | None]:
        """The price of ``model`` on ``upstream`` at ``when`` (now when ``None``), and its source."""
        override = self._overrides.get(model)
        if override is not None:
            return override, "config"
        memo_key = (upstream, model)
        try:
            price = self._memo[memo_key]
        except KeyError:
            at = when if when is not None else datetime.now(timezone.utc).timestamp()
            price, timed = self._database(upstream, self._base_urls.get(upstream, ""), model, at)
            if not timed and len(self._memo) < MEMO_SIZE:
                self._memo[memo_key] = price
        return price, (None if price is None else "table")

    def priced(self, upstream: str, model: str, usage: Usage, when: float | None = None) -> tuple[float | None, str | None]:
        """``(dollars, cost_source)`` of ``usage``; ``(None, None)`` when no price is known."""
        last = self._last
        if usage is last[2] and model == last[1] and upstream == last[0]:
            return last[3]
        if usage.cost_usd is not None:
            result: tuple[float | None, str | None] = (usage.cost_usd, "upstream")
        else:
            price, source = self.lookup(upstream, model, when)
            result = (None, None) if price is None else (price.cost(usage), source)
        self._last = (upstream, model, usage, result)
        return result


def genai_prices_database() -> Database:
    """The ``genai-prices`` package as a :data:`Database` (imported here, at start-up:
    it takes a fifth of a second, which no request should wait for)."""
    from genai_prices import data_snapshot
    from genai_prices.types import ModelPrice

    snapshot = data_snapshot.get_snapshot()
    converted: dict[int, tuple[Any, Price | None]] = {}  # id(ModelPrice) -> (it, our rates)

    def lookup(upstream: str, base_url: str, model: str, when: float) -> tuple[Price | None, bool]:
        provider_id = PROVIDERS.get(upstream)
        try:
            if provider_id is not None:
                _, info = snapshot.find_provider_model(model, None, provider_id, None)
            else:  # a declared upstream: known by its URL, or else by the model name alone
                try:
                    _, info = snapshot.find_provider_model(model, None, None, base_url)
                except LookupError:
                    _, info = snapshot.find_provider_model(model, None, None, None)
        except LookupError:
            return None, False
        timed = not isinstance(info.prices, ModelPrice)
        model_price = info.get_prices(datetime.fromtimestamp(when, timezone.utc))
        known = converted.get(id(model_price))
        if known is None or known[0] is not model_price:
            known = converted[id(model_price)] = (model_price, _rates(model_price))
        return known[1], timed  # (None: priced by something other than tokens)

    return lookup


_RATES = {"input": "input_mtok", "output": "output_mtok", "cached_input": "cache_read_mtok",
          "cache_write": "cache_write_mtok"}


def _rates(model_price: Any) -> Price | None:
    """Our :class:`Price` of a genai-prices ``ModelPrice`` (tiers kept); ``None``
    for a model with no token prices (images, per-request pricing)."""
    from genai_prices.types import TieredPrices

    values = {ours: getattr(model_price, theirs) for ours, theirs in _RATES.items()}
    if values["input"] is None and values["output"] is None:
        return None
    starts = sorted({t.start for v in values.values() if isinstance(v, TieredPrices) for t in v.tiers})

    def at(prompt: int) -> Price:
        def rate(value: Any) -> float | None:
            if value is None:
                return None
            if isinstance(value, TieredPrices):
                chosen = value.base
                for tier in reversed(value.tiers):
                    if prompt > tier.start:
                        chosen = tier.price
                        break
                return float(chosen)
            return float(value)

        rates = {ours: rate(v) for ours, v in values.items()}
        return Price(rates["input"] or 0.0, rates["output"] or 0.0, rates["cached_input"], rates["cache_write"])

    base = at(0)
    return attr.evolve(base, tiers=tuple((start, at(start + 1)) for start in starts)) if starts else base
