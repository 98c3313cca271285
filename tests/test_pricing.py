"""Dollars from tokens: the price database's own figures, config overrides, the upstream's word, never a silent 0."""

from datetime import datetime, timezone

import genai_prices
import pytest

from greyfox._pricing import Price, PriceTable
from greyfox._usage import Usage


def test_cost_splits_cached_written_and_uncached_input():
    price = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=400, cache_write_tokens=100)
    assert price.cost(usage) == pytest.approx((500 * 3.0 + 400 * 0.3 + 100 * 3.75 + 500 * 15.0) / 1e6)


def test_cached_and_written_tokens_bill_at_the_input_rate_without_rates_of_their_own():
    assert Price(1.0, 2.0).cost(Usage(1000, 0, 600, 400)) == pytest.approx(0.001)


#: (upstream, model as sent upstream, the database's provider id) for each built-in provider.
PROVIDERS = [
    ("openai", "gpt-4o-mini", "openai"),
    ("openai", "o3-mini", "openai"),
    ("deepseek", "deepseek-chat", "deepseek"),
    ("openrouter", "anthropic/claude-sonnet-4", "openrouter"),
    ("anthropic", "claude-sonnet-4-5", "anthropic"),
    ("anthropic", "claude-3-5-haiku-20241022", "anthropic"),
]
USAGES = [
    Usage(1200, 300),
    Usage(5000, 800, cached_tokens=3000, reasoning_tokens=500),
    Usage(9000, 100, cached_tokens=4000, cache_write_tokens=2000),
    Usage(250_000, 1000, cached_tokens=100_000),  # past a long-context tier
]


@pytest.mark.parametrize("upstream, model, provider", PROVIDERS)
def test_a_rows_dollars_are_the_price_databases_own_figure(upstream, model, provider):
    table = PriceTable()
    now = datetime.now(timezone.utc)
    for usage in USAGES:
        theirs = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                               cache_read_tokens=usage.cached_tokens, cache_write_tokens=usage.cache_write_tokens),
            model, provider_id=provider, genai_request_timestamp=now,
        )
        dollars, source = table.priced(upstream, model, usage, now.timestamp())
        assert source == "table"
        assert dollars == pytest.approx(float(theirs.total_price), rel=1e-9, abs=1e-10), usage


def test_an_unknown_model_costs_none_not_zero():
    assert PriceTable().priced("openai", "my-local-llama", Usage(10, 10)) == (None, None)


def test_config_overrides_win_and_say_so():
    table = PriceTable({"gpt-4o": {"input": 1.0, "output": 1.0}, "my-local-llama": {"input": 0, "output": 0}})
    assert table.priced("openai", "gpt-4o", Usage(1_000_000, 0)) == (pytest.approx(1.0), "config")
    assert table.priced("openai", "my-local-llama", Usage(10, 10)) == (0, "config")


def test_the_upstreams_own_cost_wins_over_every_table():
    table = PriceTable({"anthropic/claude-sonnet-4": {"input": 1.0, "output": 1.0}})
    usage = Usage(1000, 100, cost_usd=0.0042)
    assert table.priced("openrouter", "anthropic/claude-sonnet-4", usage) == (0.0042, "upstream")


def test_the_database_is_asked_once_per_model_unless_its_price_depends_on_the_time():
    asked = []

    def database(upstream, base_url, model, when):
        asked.append(model)
        return Price(1.0, 2.0), model == "off-peak-model"

    table = PriceTable(database=database)
    for _ in range(3):
        table.priced("x", "steady-model", Usage(10, 10))
        table.priced("x", "off-peak-model", Usage(10, 10))
    assert asked.count("steady-model") == 1 and asked.count("off-peak-model") == 3
