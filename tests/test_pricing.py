"""Dollars from tokens: plain arithmetic, and no silent zero for unknown models."""

import pytest

from greyfox._pricing import Price, PriceTable
from greyfox._usage import Usage


def test_cost_splits_cached_and_uncached_input():
    price = Price(input=2.50, output=10.00, cached_input=1.25)
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400)
    assert price.cost(usage) == pytest.approx((600 * 2.50 + 400 * 1.25 + 500 * 10.00) / 1e6)


def test_cached_tokens_bill_at_full_price_without_a_cached_rate():
    assert Price(1.0, 2.0).cost(Usage(1000, 0, 1000)) == pytest.approx(0.001)


def test_shipped_table_knows_the_common_models_and_date_suffixes():
    table = PriceTable.shipped()
    assert table.date
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "gpt-5", "o3-mini", "text-embedding-3-small",
                  "deepseek-chat", "deepseek-reasoner", "anthropic/claude-sonnet-4"):
        assert table.lookup(model) is not None, model
    assert table.lookup("gpt-4o-mini-2024-07-18") == table.lookup("gpt-4o-mini")


def test_unknown_model_costs_none_not_zero():
    assert PriceTable.shipped().cost("my-local-llama", Usage(10, 10)) is None


def test_config_overrides_win():
    table = PriceTable.shipped({"gpt-4o": {"input": 1.0, "output": 1.0}, "my-local-llama": {"input": 0, "output": 0}})
    assert table.cost("gpt-4o", Usage(1_000_000, 0)) == pytest.approx(1.0)
    assert table.cost("my-local-llama", Usage(10, 10)) == 0
