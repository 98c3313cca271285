"""The benchmark still runs (smoke mode: seconds).  No timing is asserted here."""

import os
import shutil
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run.py")

pytestmark = pytest.mark.bench


@pytest.mark.skipif(shutil.which("wrk") is None and not os.environ.get("CI"), reason="needs wrk (apt-get install wrk)")
def test_benchmark_smoke_run_prints_its_table_and_goals():
    postgres = os.environ.get("GREYFOX_TEST_POSTGRES")
    args = ["--postgres", postgres] if postgres else []
    result = subprocess.run([sys.executable, BENCH, "--smoke", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for scenario in ("relay, cache miss, c=16", "cache hits, c=64", "stream, first event alone", "MiB stream"):
        assert scenario in result.stdout
    assert "x floor" in result.stdout and "first request served" in result.stdout
    relay_rows = [line for line in result.stdout.splitlines() if line.startswith("| relay, cache miss")]
    assert len(relay_rows) == 3 and all(" 0 req/s" not in row for row in relay_rows), relay_rows
    [scale_out] = [line for line in result.stdout.splitlines() if line.startswith("| relay on PostgreSQL")]
    if postgres:
        assert "2: " in scale_out and " 0 req/s" not in scale_out, scale_out
