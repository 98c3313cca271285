"""The model-like load (16 clients, upstream 10 to 30 ms) through several relays, in interleaved turns.

Each round measures the upstream direct, then each case in turn for the same
time: its CPU a request (from /proc) and the latency it adds (p50, p99, from
wrk).  Cases: ``greyfox`` (``twistd -n greyfox`` as bench/run.py starts it,
frozen while the others run), ``greyfox:DIR`` (the GreyFox of another
checkout, e.g. a ``git worktree`` of an older commit: two versions in the
same turns) or a floor spec (``bench/floor.py``: ``0``, ``300``,
``300/now``, ``300/idle``, ``core``, ``core+100``; started afresh each turn).
Rounds interleave the cases, each round starting one place further along
the list (a turn's place in its round may matter: the turn before it leaves
the machine in its own state), so that every case sees each phase of a
noisy machine and each place; compare cases over many rounds.

    python bench/think_turns.py --rounds 4 core core+100 core+200 greyfox
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: the same upstream, pinning, wrk and CPU readings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--secs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="greyfox-turns-")
    think = os.path.join(workdir, "think.lua")
    with open(think, "w") as f:
        f.write(run.THINK_LUA)
    with run.fake_upstream() as up:
        direct = f"http://127.0.0.1:{up}/v1/chat/completions"
        daemons: dict[str, Any] = {}
        try:
            for case in args.cases:
                if case.startswith("greyfox"):
                    daemons[case] = start_greyfox(case, up, workdir, think)
            for r in range(args.rounds):
                d = run.wrk(direct, 16, args.secs, think)
                print(f"round {r}: direct p50 {d['p50']:.2f} ms, p99 {d['p99']:.2f} ms", flush=True)
                shift = r % len(args.cases)  # each case takes each place in a round in turn
                for case in args.cases[shift:] + args.cases[:shift]:
                    p, ms = turn(case, daemons.get(case), up, think, args.secs)
                    print(f"  {case:12} {ms:.3f} ms CPU a request, p50 +{p['p50'] - d['p50']:.2f} ms, "
                          f"p99 +{p['p99'] - d['p99']:.2f} ms, {p['rps']:.0f} req/s, {p['errors']} errors", flush=True)
        finally:
            for gf in daemons.values():
                os.kill(gf.proc.pid, signal.SIGCONT)
                gf.stop()
    return 0


def start_greyfox(case: str, up: int, workdir: str, think: str) -> Any:
    """``greyfox`` or ``greyfox:DIR``, started, warmed and frozen until its turn."""
    source = case.partition(":")[2]
    saved = os.environ.get("PYTHONPATH")
    if source:  # (its greyfox package and twistd plugin come first on the path)
        os.environ["PYTHONPATH"] = os.path.abspath(source) + (os.pathsep + saved if saved else "")
    try:
        gf = run.GreyFox(up, workdir)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        gf.ready()
        run.wrk(gf.url + "/v1/chat/completions", 16, 2, think)  # warm its pool
    except BaseException:
        gf.stop()
        raise
    os.kill(gf.proc.pid, signal.SIGSTOP)
    return gf


def turn(case: str, gf: Any, up: int, think: str, secs: int) -> tuple[dict[str, Any], float]:
    if gf is not None:
        url = gf.url + "/v1/chat/completions"
        os.kill(gf.proc.pid, signal.SIGCONT)
        try:
            return run.with_cpu(gf.proc.pid, lambda: run.wrk(url, 16, secs, think))
        finally:
            os.kill(gf.proc.pid, signal.SIGSTOP)
    with run.floor_relay(up, case) as (proc, url):
        run.wrk(url, 16, 1, think)  # warm its pool
        return run.with_cpu(proc.pid, lambda: run.wrk(url, 16, secs, think))


if __name__ == "__main__":
    sys.exit(main())
