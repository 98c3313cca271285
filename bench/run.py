"""GreyFox benchmark: the same load direct to a fake upstream, through the floor, and through GreyFox.

One invocation, one machine phase, the same pinning (2 cores: the relay
measured on CPU 0; the fake upstream and the load drivers on CPU 1).  The
*floor* (``bench/floor.py``) is a relay on the card's own stack (a Klein
route calling treq, streaming through a push producer) with no GreyFox code;
GreyFox runs as users run it, ``twistd -n greyfox``, with a daily token limit
set so that every request is estimated and reserved.  The goals are ratios
read in this one run; the table ends with each goal, met or missed.

    python bench/run.py            # full run (a few minutes)
    python bench/run.py --smoke    # seconds: proves the benchmark still works

Load drivers: ``wrk`` (Debian's package; C, so it costs the shared core far
less than a Python client) with a Lua script that makes every request body
unique, for the request/response scenarios; a small asyncio client for the
streaming ones, which need time to first byte.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY_CPU, LOAD_CPU = "0", "1"

UNIQUE_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-App-User-Id"] = "bench"
local n = 0
local run = tostring(os.time()) .. tostring(math.random(1, 1000000000))
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil,
    '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"bench ' .. run .. ' ' .. n .. '"}]}')
end
"""
FIXED_BODY = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"the same prompt"}]}'
FIXED_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-App-User-Id"] = "bench"
wrk.body = '%s'
""" % FIXED_BODY


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, timeout: float = 20) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"port {port} did not open")


def pinned(cpu: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1 else cmd


def wait_http(url: str, timeout: float = 20) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except Exception:
            time.sleep(0.01)
    raise RuntimeError(f"{url} did not come up")


def post(url: str, body: str) -> bytes:
    req = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json", "X-App-User-Id": "bench"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(pid: int, run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
    """``run()``'s figures, and the CPU (ms) process ``pid`` spent per request meanwhile."""
    cpu0 = proc_cpu(pid)
    result = run()
    return result, (proc_cpu(pid) - cpu0) * 1000 / max(1, result["requests"])


@contextlib.contextmanager
def frozen(*pids: int) -> Iterator[None]:
    """Stop these processes (SIGSTOP) for the length of a turn of another one.

    In turns, the process not measured is idle, and an idle GreyFox runs its
    timers and full collections (its heap holds the cache index) on the same
    core as the one measured; frozen, it leaves the core to the turn.
    """
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def fake_upstream() -> Iterator[int]:
    """bench/upstream.py on the load's CPU, ready: its port."""
    port = free_port()
    proc = subprocess.Popen(pinned(LOAD_CPU, [sys.executable, os.path.join(HERE, "upstream.py"), str(port)]),
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield port
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def floor_relay(up_port: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """bench/floor.py on the proxy's CPU: the process and its base URL; stopped on leaving."""
    port = free_port()
    proc = subprocess.Popen(pinned(PROXY_CPU, [sys.executable, os.path.join(HERE, "floor.py"), str(port), str(up_port)]))
    try:
        wait_port(port)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(url: str, conns: int, seconds: float, lua: str) -> dict[str, float]:
    out = subprocess.run(
        pinned(LOAD_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", lua, url]),
        capture_output=True, text=True, check=True,
    ).stdout
    result = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "p50": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),
        "p99": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = int(errors.group(1)) if errors else 0
    return result


async def _stream_once(port: int, body: bytes) -> tuple[float, float, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-App-User-Id: bench\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    start = time.perf_counter()
    writer.write(request)
    data = b""
    ttfb = None
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
        if ttfb is None and b"data:" in data:
            ttfb = time.perf_counter() - start
    total = time.perf_counter() - start
    writer.close()
    return (ttfb or total) * 1000, total * 1000, data.count(b"data: {")


async def _streams(port: int, conns: int, n: int, model: str = "gpt-4o-mini") -> dict[str, float]:
    results: list[tuple[float, float, int]] = []
    counter = iter(range(10**9))

    async def worker() -> None:
        while len(results) < n:
            body = json.dumps({"model": model, "stream": True, "max_tokens": 64,
                               "messages": [{"role": "user", "content": f"stream {time.time()} {next(counter)}"}]}).encode()
            results.append(await _stream_once(port, body))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    wall = time.perf_counter() - start
    ttfbs = sorted(r[0] for r in results)
    totals = sorted(r[1] for r in results)
    return {
        "requests": len(results),
        "ttfb_p50": ttfbs[len(ttfbs) // 2],
        "total_p50": totals[len(totals) // 2],
        "chunks_per_s": sum(r[2] for r in results) / wall,
        "chunks": results[0][2],
    }


def streams(port: int, conns: int, n: int, model: str = "gpt-4o-mini") -> dict[str, float]:
    return asyncio.run(_streams(port, conns, n, model))


async def _slow_big(port: int, mib: int, pid: int, rate_mib_s: float) -> dict[str, float]:
    body = json.dumps({"model": f"big-{mib}", "stream": True, "messages": [{"role": "user", "content": f"big {time.time()}"}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**16)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    got, peak = 0, 0.0
    start = time.perf_counter()
    last_sample = 0.0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        got += len(chunk)
        now = time.perf_counter() - start
        if now - last_sample > 0.05:
            peak = max(peak, proc_rss_mb(pid))
            last_sample = now
        ahead = got / (rate_mib_s * 1024 * 1024) - now
        if ahead > 0:
            await asyncio.sleep(ahead)
    writer.close()
    return {"bytes": got, "seconds": time.perf_counter() - start, "peak_rss_mb": peak}


class GreyFox:
    """``twistd -n greyfox`` (or another command) pinned to the proxy's CPU."""

    def __init__(self, upstream_port: int, workdir: str, cmd: list[str] | None = None, limits: bool = True,
                 db: str | None = None, cpu: str = PROXY_CPU, instance: str | None = None) -> None:
        self.port = free_port()
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("GREYFOX_"):
                del env[k]
        env.update({
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "OPENAI_API_KEY": "sk-bench",
            "GREYFOX_LISTEN": f"tcp:{self.port}:interface=127.0.0.1",
            "GREYFOX_DB": db or os.path.join(workdir, f"bench-{self.port}.db"),
        })
        if instance:
            env["GREYFOX_INSTANCE"] = instance
        if limits:
            env["GREYFOX_DAILY_TOKENS"] = "1000000000000"  # the quota stage estimates every request
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        cmd = cmd or [twistd, "-n", "--pidfile=", "--logfile=" + os.path.join(workdir, f"twistd-{self.port}.log"), "greyfox"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(pinned(cpu, cmd), env=env, cwd=workdir)
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self) -> float:
        """Seconds from spawn to the first answered chat completion."""
        wait_http(self.url + "/healthz")
        post(self.url + "/v1/chat/completions", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"warm-up"}]}')
        return time.monotonic() - self.started

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@contextlib.contextmanager
def postgres_database(server: str, name: str) -> Iterator[str]:
    """A fresh database on ``server`` (a libpq URI), dropped afterwards."""
    import psycopg

    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def scale_out(up_port: int, workdir: str, unique: str, secs: float, server: str) -> tuple[dict[str, Any], list[str]]:
    """Relayed requests (c=16 per instance) through one instance on PostgreSQL,
    then through two on one database, each pinned to its own core, each
    driven by its own wrk at once (the throughputs add up), then through one
    again: the single figure is the mean of the turns around the pair."""
    from concurrent.futures import ThreadPoolExecutor

    def alone(db: str) -> dict[str, float]:
        one = GreyFox(up_port, workdir, db=db, instance="one")
        try:
            one.ready()
            wrk(one.url + "/v1/chat/completions", 16, 1, unique)  # warm up
            return wrk(one.url + "/v1/chat/completions", 16, secs, unique)
        finally:
            one.stop()

    with postgres_database(server, f"greyfox_bench_{os.getpid()}") as db:
        before = alone(db)
        pair = [GreyFox(up_port, workdir, db=db, cpu=cpu, instance=f"two-{cpu}") for cpu in (PROXY_CPU, LOAD_CPU)]
        try:
            for gf in pair:
                gf.ready()
                wrk(gf.url + "/v1/chat/completions", 16, 1, unique)
            with ThreadPoolExecutor(2) as pool:
                both = list(pool.map(lambda gf: wrk(gf.url + "/v1/chat/completions", 16, secs, unique), pair))
        finally:
            for gf in pair:
                gf.stop()
        after = alone(db)
    single = (before["rps"] + after["rps"]) / 2
    total = sum(r["rps"] for r in both)
    figures = {"one": [before, after], "two": both, "ratio": total / single}
    row = ["relay on PostgreSQL, 1 vs 2 instances, c=16 each", "", "",
           f"1: {before['rps']:.0f}, {after['rps']:.0f} req/s; 2: {total:.0f} req/s = {total / single:.2f} x",
           f"p50 1: {before['p50']:.2f}, {after['p50']:.2f} ms; 2: "
           + ", ".join(f"{r['p50']:.2f}" for r in both) + " ms", ""]
    return figures, row


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


#: The goals, as (what, how it is read, the limit); each is a ratio or an added figure in one run.
GOALS = [
    ("GreyFox CPU per relayed request, c=16", "x floor", 1.3),
    ("cache hits throughput, c=16", "x relay (at least)", 2.0),
    ("added latency p50, c=1", "ms", 1.5),
    ("added time to first event (first event alone)", "ms", 1.0),
    ("RSS through the big stream", "MB over idle", 10.0),
    ("idle RSS", "MB", 100.0),
    ("first request served after start", "s", 1.0),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds in all: checks that the benchmark works")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--postgres", default=os.environ.get("GREYFOX_BENCH_POSTGRES"),
                        help="a PostgreSQL server (libpq URI) for the scale-out row (default: $GREYFOX_BENCH_POSTGRES)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    secs = 1 if args.smoke else 6
    n_streams = 20 if args.smoke else 300
    big_mib = 5 if args.smoke else 100
    workdir = tempfile.mkdtemp(prefix="greyfox-bench-")
    unique, fixed = os.path.join(workdir, "unique.lua"), os.path.join(workdir, "fixed.lua")
    open(unique, "w").write(UNIQUE_LUA)
    open(fixed, "w").write(FIXED_LUA)
    with fake_upstream() as up_port:
        figures, rows = run_all(up_port, workdir, unique, fixed, secs, n_streams, big_mib)
        if args.postgres:
            figures["scale_out"], row = scale_out(up_port, workdir, unique, secs, args.postgres)
        else:
            row = ["relay on PostgreSQL, 1 vs 2 instances", "", "", "not run: give --postgres URI", "", ""]
        rows.append(row)
    print(table(rows))
    print()
    goals = [["goal", "limit", "this run", ""]]
    for (what, unit, limit), value in zip(GOALS, figures["goals"]):
        met = value >= limit if "at least" in unit else value <= limit
        goals.append([what, f"{limit:g} {unit}", f"{value:.2f}", "met" if met else "MISSED"])
    print(table(goals))
    print(f"\npinning: the relay measured on CPU {PROXY_CPU}, upstream and load on CPU {LOAD_CPU}; "
          f"CPU per request is the relay process's user + system time over the requests served")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def run_all(up_port: int, workdir: str, unique: str, fixed: str, secs: float, n_streams: int,
            big_mib: int) -> tuple[dict[str, Any], list[list[str]]]:
    figures: dict[str, Any] = {}
    rows = [["scenario", "direct", "floor", "GreyFox", "GreyFox added (p50, p99)", "CPU / request: floor, GreyFox"]]
    direct = f"http://127.0.0.1:{up_port}"
    plain = GreyFox(up_port, workdir, limits=False)  # the defaults, as the quick start runs it
    try:
        start_s = plain.ready()
        time.sleep(0.5)
        idle_mb = proc_rss_mb(plain.proc.pid)
    finally:
        plain.stop()
    figures.update(start_to_first_request_s=start_s, idle_rss_mb=idle_mb)
    gf = GreyFox(up_port, workdir)
    try:
        gf.ready()
        with floor_relay(up_port) as (floor, floor_url):
            wrk(floor_url + "/v1/chat/completions", 16, 1, unique)  # warm its pool
            targets = {"floor": (floor.pid, floor_url), "greyfox": (gf.proc.pid, gf.url)}

            def turn(who: str, c: int, lua: str) -> tuple[dict[str, Any], float]:
                """One turn of ``who``; the other relay is frozen meanwhile, so it takes no CPU from it."""
                pid, url = targets[who]
                other = floor.pid if who == "greyfox" else gf.proc.pid
                with frozen(other):
                    return with_cpu(pid, lambda: wrk(url + "/v1/chat/completions", c, secs, lua))

            for c in (1, 16, 64):
                d = wrk(direct + "/v1/chat/completions", c, secs, unique)
                # Floor and GreyFox in turns (floor, GreyFox, GreyFox, floor): both see the same machine phase.
                runs: dict[str, list[tuple[dict[str, Any], float]]] = {"floor": [], "greyfox": []}
                for who in ("floor", "greyfox", "greyfox", "floor"):
                    runs[who].append(turn(who, c, unique))
                f, g = runs["floor"][-1][0], runs["greyfox"][0][0]
                f_ms, g_ms = (sum(ms for _, ms in runs[w]) / 2 for w in ("floor", "greyfox"))
                figures[f"relay_c{c}"] = {"direct": d, "floor": f, "greyfox": g, "floor_cpu_ms": f_ms, "greyfox_cpu_ms": g_ms}
                rows.append([f"relay, cache miss, c={c}", f"{d['rps']:.0f} req/s", f"{f['rps']:.0f} req/s", f"{g['rps']:.0f} req/s",
                             f"+{g['p50'] - d['p50']:.2f} ms, +{g['p99'] - d['p99']:.2f} ms (floor +{f['p50'] - d['p50']:.2f})",
                             f"{f_ms:.3f} ms, {g_ms:.3f} ms = {g_ms / f_ms:.2f} x floor"])

            post(gf.url + "/v1/chat/completions", FIXED_BODY)  # the entry the hits read
            for c in (16, 64):
                h, h_ms = with_cpu(gf.proc.pid, lambda: wrk(gf.url + "/v1/chat/completions", c, secs, fixed))
                relay = figures[f"relay_c{c}"]["greyfox"]["rps"]
                figures[f"hits_c{c}"] = {"greyfox": h, "cpu_ms": h_ms, "vs_relay": h["rps"] / relay}
                rows.append([f"cache hits, c={c}", "", "", f"{h['rps']:.0f} req/s = {h['rps'] / relay:.1f} x relay",
                             f"p50 {h['p50']:.2f} ms, p99 {h['p99']:.2f} ms", f"{h_ms:.3f} ms"])

            for model, label in (("gpt-4o-mini", "stream, 40 events in one write, c=1"),
                                 ("paced", "stream, first event alone (as a model sends), c=1")):
                d = streams(up_port, 1, n_streams, model)
                with frozen(gf.proc.pid):
                    f = streams(int(floor_url.rsplit(":", 1)[1]), 1, n_streams, model)
                with frozen(floor.pid):
                    g, g_ms = with_cpu(gf.proc.pid, lambda: streams(gf.port, 1, n_streams, model))
                figures[f"stream_{model}"] = {"direct": d, "floor": f, "greyfox": g, "greyfox_cpu_ms": g_ms}
                rows.append([label, f"TTFB {d['ttfb_p50']:.2f} ms", f"TTFB {f['ttfb_p50']:.2f} ms", f"TTFB {g['ttfb_p50']:.2f} ms",
                             f"TTFB +{g['ttfb_p50'] - d['ttfb_p50']:.2f} ms (floor +{f['ttfb_p50'] - d['ttfb_p50']:.2f})",
                             f"GreyFox {g_ms:.3f} ms"])

        before = proc_rss_mb(gf.proc.pid)
        big = asyncio.run(_slow_big(gf.port, big_mib, gf.proc.pid, rate_mib_s=25))
        figures["big_stream"] = dict(big, rss_before_mb=before)
        rows.append([f"{big_mib} MiB stream, reader at 25 MiB/s", "", "", f"{big['bytes'] / 1048576:.0f} MiB in {big['seconds']:.1f} s",
                     f"peak RSS {big['peak_rss_mb']:.1f} MB (before {before:.1f} MB)", ""])
    finally:
        gf.stop()
    rows.append(["start (defaults)", "", "", f"first request served {start_s:.2f} s after start", f"idle RSS {idle_mb:.1f} MB", ""])
    c16, c1 = figures["relay_c16"], figures["relay_c1"]
    paced = figures["stream_paced"]
    figures["goals"] = [
        c16["greyfox_cpu_ms"] / c16["floor_cpu_ms"],
        figures["hits_c16"]["vs_relay"],
        c1["greyfox"]["p50"] - c1["direct"]["p50"],
        paced["greyfox"]["ttfb_p50"] - paced["direct"]["ttfb_p50"],
        max(0.0, big["peak_rss_mb"] - before),
        idle_mb,
        start_s,
    ]
    return figures, rows


if __name__ == "__main__":
    raise SystemExit(main())
