# -*- test-case-name: tests.test_pricing -*-
"""Dollars from tokens.  A model we have no price for costs ``None``, never 0."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any, Mapping

import attr

from ._usage import Usage

_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Price:
    """USD per 1M tokens."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, usage: Usage) -> float:
        cached = usage.cached_tokens if self.cached_input is not None else 0
        cached_rate = self.cached_input if self.cached_input is not None else self.input
        dollars = (
            (usage.prompt_tokens - cached) * self.input
            + cached * cached_rate
            + usage.completion_tokens * self.output
        ) / 1_000_000
        return round(dollars, 10)


def load_shipped() -> tuple[str, dict[str, dict[str, float]]]:
    """The packaged price table: (its date, model -> row)."""
    doc = json.loads((resources.files("greyfox") / "data" / "prices.json").read_text("utf-8"))
    return doc["_date"], doc["models"]


class PriceTable:
    """Looks up a model's price: exact id first, then without a date suffix."""

    def __init__(self, rows: Mapping[str, Mapping[str, Any]], date: str = "") -> None:
        self.date = date
        self._prices = {
            model: Price(float(r["input"]), float(r["output"]), None if r.get("cached_input") is None else float(r["cached_input"]))
            for model, r in rows.items()
        }
        self._resolved: dict[str, Price | None] = {}  # model as asked -> its price (or None)
        # The last answer: a relayed answer's usage is priced for its cache
        # entry and again for its ledger row (Usage is frozen; prices are fixed).
        self._last: tuple[str, Usage | None, float | None] = ("", None, None)

    @classmethod
    def shipped(cls, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> "PriceTable":
        date, rows = load_shipped()
        merged = dict(rows)
        merged.update(overrides or {})
        return cls(merged, date)

    def lookup(self, model: str) -> Price | None:
        try:
            return self._resolved[model]
        except KeyError:
            pass
        price = self._prices.get(model)
        if price is None:
            price = self._prices.get(_DATE_SUFFIX.sub("", model))
        if len(self._resolved) < 4096:  # model names come from clients: bounded
            self._resolved[model] = price
        return price

    def cost(self, model: str, usage: Usage) -> float | None:
        last = self._last
        if usage is last[1] and model == last[0]:
            return last[2]
        price = self.lookup(model)
        cost = None if price is None else price.cost(usage)
        self._last = (model, usage, cost)
        return cost
