"""The benchmark still runs (smoke mode: seconds).  No timing is asserted here."""

import os
import shutil
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run.py")


@pytest.mark.skipif(shutil.which("wrk") is None and not os.environ.get("CI"), reason="needs wrk (apt-get install wrk)")
def test_benchmark_smoke_run_prints_its_table():
    result = subprocess.run([sys.executable, BENCH, "--smoke"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for scenario in ("relay, cache miss, c=16", "cache hits, c=64", "stream (40 chunks), c=1", "ledger off vs on"):
        assert scenario in result.stdout
    assert "idle RSS" in result.stdout


@pytest.mark.parametrize("kind", ["relay", "hit"])
def test_in_process_harness_still_serves_its_requests(kind):
    harness = os.path.join(os.path.dirname(BENCH), "inprocess.py")
    result = subprocess.run([sys.executable, harness, kind, "50"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]  # (it checks the responses are MISS or HIT)
    assert result.stdout.startswith(f"{kind}: ")


@pytest.mark.skipif(shutil.which("valgrind") is None and not os.environ.get("CI"), reason="needs valgrind (apt-get install valgrind)")
def test_daemon_instruction_count_still_runs():
    counter = os.path.join(os.path.dirname(BENCH), "daemon_count.py")
    result = subprocess.run([sys.executable, counter, "--n1", "2", "--n2", "4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]  # (it checks every answer is a 200)
    assert result.stdout.startswith("GreyFox: ") and "instructions a relayed request" in result.stdout


@pytest.mark.skipif(shutil.which("wrk") is None and not os.environ.get("CI"), reason="needs wrk (apt-get install wrk)")
def test_think_turns_runs_greyfox_and_the_floor_modes_side_by_side():
    turns = os.path.join(os.path.dirname(BENCH), "think_turns.py")
    cases = ["20/idle", "core+20", "greyfox"]
    result = subprocess.run([sys.executable, turns, "--secs", "1", "--rounds", "1", *cases],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert [row[0] for row in rows] == cases
    for row in rows:  # every relay answered, with 200s only
        assert float(row[row.index("req/s,") - 1]) > 0 and row[row.index("errors") - 1] == "0", row
