"""``greyfox ci -- CMD``: a real test command, run against recorded answers, that never spends."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from greyfox._cisummary import Summary, exit_status, merge_cassette, summarize
from greyfox._store import LedgerRow

from .conftest import ANTHROPIC_KEY, PROXY_KEY, in_thread

SUITE = str(Path(__file__).with_name("ci_suite.py"))


def greyfox_ci(upstream: Any, tmp_path: Path, *args: str, key: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``greyfox ci ARGS -- python ci_suite.py`` in a child process, GreyFox's upstream the fake one."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("OPENAI_", "ANTHROPIC_", "GREYFOX_", "GITHUB_"))}
    environ["OPENAI_BASE_URL"] = f"{upstream.url}/openai/v1"
    environ["ANTHROPIC_BASE_URL"] = f"{upstream.url}/anthropic"
    if key:
        environ["OPENAI_API_KEY"] = PROXY_KEY
        environ["ANTHROPIC_API_KEY"] = ANTHROPIC_KEY
    environ.update(env)
    command = [sys.executable, "-m", "greyfox", "ci", *args, "--", sys.executable, SUITE]
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=120)


def run(upstream: Any, tmp_path: Path, *args: str, **env: Any) -> Any:
    return in_thread(greyfox_ci, upstream, tmp_path, *args, **env)


async def record(upstream: Any, tmp_path: Path, cassette: str = "c.jsonl") -> list[str]:
    done = await run(upstream, tmp_path, "--cassette", cassette, "--mode", "record-missing")
    assert done.returncode == 0, done.stderr
    return (tmp_path / cassette).read_text().splitlines()


@pytest_twisted.ensureDeferred
async def test_recorded_once_the_suite_replays_with_no_key_and_no_upstream_call(upstream, tmp_path):
    lines = await record(upstream, tmp_path)
    assert len(lines) == 3  # the repeated call was a hit; the stream and the message are entries of their own
    assert len(upstream.received) == 3
    assert {r.path for r in upstream.received} == {"/openai/v1/chat/completions", "/anthropic/v1/messages"}
    assert PROXY_KEY not in (tmp_path / "c.jsonl").read_text() and ANTHROPIC_KEY not in (tmp_path / "c.jsonl").read_text()
    done = await run(upstream, tmp_path, "--cassette", "c.jsonl", key=False)
    assert done.returncode == 0, done.stderr
    assert len(upstream.received) == 3  # replay never reaches the upstream
    assert done.stdout.count("answer:") == 4 and "failed: 0" in done.stdout
    assert "4 requests, 4 hits, 0 misses" in done.stderr


@pytest_twisted.ensureDeferred
async def test_a_changed_prompt_fails_the_run_with_one_line_naming_the_field(upstream, tmp_path):
    await record(upstream, tmp_path)
    summary_file = tmp_path / "step-summary.md"
    summary_file.write_text("earlier step\n")
    done = await run(upstream, tmp_path, "--cassette", "c.jsonl", "--report", "report.md", key=False,
                     PROMPT="Say goodbye", GITHUB_STEP_SUMMARY=str(summary_file))
    assert done.returncode == 1, done.stderr
    assert "failed: 3" in done.stdout  # the suite saw the 404s and still exited 0: the misses decide
    line = 'miss: /v1/chat/completions (gpt-4o-mini): messages[0].content: "Say hello" → "Say goodbye"'
    assert line in done.stderr
    assert 'miss: /v1/messages (claude-sonnet-4-5): messages[0].content: "Say hello" → "Say goodbye"' in done.stderr
    assert done.stderr.count("miss: ") == 2  # the same miss twice is listed once
    assert "4 requests, 1 hits, 3 misses" in done.stderr
    report = (tmp_path / "report.md").read_text()
    assert line in report and "| 4 | 1 | 3 |" in report
    assert summary_file.read_text() == "earlier step\n" + report + "\n"  # appended, as GitHub expects
    assert len(upstream.received) == 3


@pytest_twisted.ensureDeferred
async def test_record_missing_adds_exactly_the_new_entry_in_key_order(upstream, tmp_path):
    before = await record(upstream, tmp_path)
    done = await run(upstream, tmp_path, "--cassette", "c.jsonl", "--mode", "record-missing", PROMPT="Say goodbye")
    assert done.returncode == 0, done.stderr
    after = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(upstream.received) == 5  # only the new prompts went upstream, once each
    assert set(before) < set(after) and len(after) == 5  # the old lines unchanged, byte for byte
    new = [json.loads(line) for line in set(after) - set(before)]
    assert sorted(d["path"] for d in new) == ["/chat/completions", "/messages"]
    assert all(d["request"]["messages"] == [{"role": "user", "content": "Say goodbye"}] for d in new)
    assert [json.loads(x)["key"] for x in after] == sorted(json.loads(x)["key"] for x in after)
    assert "2 new entries written to c.jsonl" in done.stderr


@pytest_twisted.ensureDeferred
async def test_record_fetches_again_what_the_run_uses_and_keeps_the_rest(upstream, tmp_path):
    await record(upstream, tmp_path)
    done = await run(upstream, tmp_path, "--cassette", "c.jsonl", "--mode", "record-missing", PROMPT="Unused later")
    assert done.returncode == 0, done.stderr
    before = {json.loads(x)["key"]: x for x in (tmp_path / "c.jsonl").read_text().splitlines()}
    assert len(before) == 5 and len(upstream.received) == 5
    done = await run(upstream, tmp_path, "--cassette", "c.jsonl", "--mode", "record")
    assert done.returncode == 0, done.stderr
    assert len(upstream.received) == 8  # the three entries this run uses were fetched again
    after = {json.loads(x)["key"]: x for x in (tmp_path / "c.jsonl").read_text().splitlines()}
    assert after.keys() == before.keys()
    unused = [k for k in before if "Unused later" in before[k]]
    assert [k for k in after if after[k] == before[k]] == unused  # re-recorded lines changed (their time)


@pytest_twisted.ensureDeferred
async def test_the_commands_own_failure_wins(upstream, tmp_path):
    await record(upstream, tmp_path)
    done = await run(upstream, tmp_path, "--cassette", "c.jsonl", key=False, PROMPT="Say goodbye", EXIT="3")
    assert done.returncode == 3


@pytest_twisted.ensureDeferred
async def test_spending_over_the_budget_fails_the_run(upstream, tmp_path):
    done = await run(upstream, tmp_path, "--cassette", "a.jsonl", "--mode", "record-missing", "--budget-usd", "0.001")
    assert done.returncode == 1
    assert re.search(r"over budget: \$0\.00[1-9]\d+ spent, --budget-usd 0.001\n", done.stderr), done.stderr
    done = await run(upstream, tmp_path, "--cassette", "b.jsonl", "--mode", "record-missing", "--budget-usd", "1")
    assert done.returncode == 0, done.stderr


@pytest_twisted.ensureDeferred
async def test_a_run_that_cannot_start_says_why_in_one_line_and_exits_2(upstream, tmp_path):
    done = await run(upstream, tmp_path, "--cassette", "missing.jsonl")
    assert done.returncode == 2 and done.stderr == "greyfox ci: missing.jsonl: no such cassette (record one with --mode record-missing)\n"
    (tmp_path / "bad.jsonl").write_text('{"version": 1}\n')
    done = await run(upstream, tmp_path, "--cassette", "bad.jsonl")
    assert done.returncode == 2 and "bad.jsonl: line 1: key must be 64 hex digits" in done.stderr
    assert "answer:" not in done.stdout  # the command never ran
    assert len(upstream.received) == 0


# -- the verdict (pure) --


def row(cache: str, tokens: int = 10, cost: float | None = 0.001, saved_usd: float = 0.0) -> LedgerRow:
    return LedgerRow(id=1, ts=0.0, day="2026-12-04", user="u", endpoint="/v1/chat/completions", cache=cache,
                     status=200, total_tokens=tokens, cost_usd=0.0 if cache == "HIT" else cost,
                     saved_tokens=tokens if cache == "HIT" else 0, saved_usd=saved_usd)


def test_the_summary_adds_spend_and_savings_and_counts_unpriced_answers():
    s = summarize("record-missing", "c", [row("MISS"), row("HIT", saved_usd=0.002), row("MISS", cost=None)], 0)
    assert (s.requests, s.hits, s.misses, s.tokens_spent, s.tokens_saved, s.unpriced) == (3, 1, 2, 20, 10, 1)
    assert s.spent_usd == pytest.approx(0.001) and s.saved_usd == pytest.approx(0.002)


@pytest.mark.parametrize("mode, command, misses, spent, budget, status", [
    ("replay", 0, 0, 0.0, None, 0),
    ("replay", 0, 1, 0.0, None, 1),
    ("replay", 4, 1, 0.0, None, 4),
    ("record-missing", 0, 3, 0.0, None, 0),  # a miss recorded is no failure
    ("record-missing", 0, 3, 0.5, 0.4, 1),
    ("record-missing", 0, 3, 0.4, 0.4, 0),  # exceeds, not reaches
    ("record", 2, 0, 0.5, 0.4, 2),
])
def test_exit_status(mode, command, misses, spent, budget, status):
    summary = Summary(mode, "c", misses=misses, spent_usd=spent, budget_usd=budget)
    assert exit_status(command, summary) == status


def test_merging_a_cassette_keeps_old_lines_or_replaces_fetched_ones():
    old = {"b": "old b", "a": "old a"}
    fetched = {"a": "new a", "c": "new c"}
    assert merge_cassette(old, fetched, "record-missing") == ["old a", "old b", "new c"]
    assert merge_cassette(old, fetched, "record") == ["new a", "old b", "new c"]


def test_sigterm_reaches_the_command_and_a_signal_death_is_128_plus_n(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), sys.exit(7)))\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    ci = subprocess.Popen([sys.executable, "-m", "greyfox", "ci", "--cassette", "c.jsonl", "--", sys.executable,
                           "-c", child], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert ci.stdout.readline() == "ready\n"
        ci.send_signal(signal.SIGINT)  # (ignored: a terminal's Ctrl-C reaches the command itself)
        ci.send_signal(signal.SIGTERM)
        out, err = ci.communicate(timeout=60)
    finally:
        ci.kill()
    assert out == "got TERM\n" and ci.returncode == 7, err
    done = subprocess.run([sys.executable, "-m", "greyfox", "ci", "--cassette", "c.jsonl", "--", sys.executable,
                           "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGKILL


def test_ctrl_c_in_a_terminal_stops_the_command_and_greyfox_reports_its_end(tmp_path):
    """A terminal sends SIGINT to the whole foreground process group."""
    (tmp_path / "c.jsonl").write_text("")
    child = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    ci = subprocess.Popen([sys.executable, "-m", "greyfox", "ci", "--cassette", "c.jsonl", "--", sys.executable,
                           "-c", child], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    try:
        assert ci.stdout.readline() == "ready\n"
        os.killpg(ci.pid, signal.SIGINT)
        out, err = ci.communicate(timeout=60)
    finally:
        ci.kill()
    assert "KeyboardInterrupt" in err and "greyfox ci (replay, c.jsonl): 0 requests" in err
    assert ci.returncode == 128 + signal.SIGINT  # (Python dies of the signal after its traceback)
