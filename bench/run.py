"""GreyFox benchmark: the same load direct to a fake upstream and through GreyFox.

One invocation runs every scenario against both targets on this machine and
prints a table of ratios.  Pinning (2 cores): GreyFox alone on CPU 0; the
fake upstream and the load drivers on CPU 1.  GreyFox runs as users run it:
``twistd -n greyfox`` with its ledger and quota stages on (a daily token limit
set, the loop breaker at its default).

    python bench/run.py            # full run (about four minutes)
    python bench/run.py --smoke    # seconds: proves the benchmark still works

Load drivers: ``wrk`` (Debian's package; C, so it costs the shared core far
less than a Python client) with a Lua script that makes every request body
unique, for the request/response scenarios; a small asyncio client for the
streaming ones, which need time-to-first-byte and per-chunk counts.
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
#: Model time of the fake upstream in the "model-like" scenario (bench/upstream.py ``think-N``).
THINK_MS = 20
THINK_LUA = UNIQUE_LUA.replace('"gpt-4o-mini"', f'"think-{THINK_MS}"')
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
def floor_relay(
    up_port: int, work_us: float | str = 0.0, prefix: list[str] | None = None, timeout: float = 20
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """bench/floor.py on the proxy's CPU (under ``prefix``, e.g. valgrind), with ``work_us``
    of fixed work a request or ``"core"``: the process and its chat completions URL;
    stopped, and waited for, on leaving."""
    port = free_port()
    work = work_us if isinstance(work_us, str) else f"{work_us:.0f}"
    cmd = [*(prefix or []), sys.executable, os.path.join(HERE, "floor.py"), str(port), str(up_port), work]
    proc = subprocess.Popen(pinned(PROXY_CPU, cmd))
    try:
        wait_port(port, timeout)
        yield proc, f"http://127.0.0.1:{port}/v1/chat/completions"
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

    def __init__(self, upstream_port: int, workdir: str, cmd: list[str] | None = None, limits: bool = True) -> None:
        self.port = free_port()
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("GREYFOX_"):
                del env[k]
        env.update({
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "OPENAI_API_KEY": "sk-bench",
            "GREYFOX_LISTEN": f"tcp:{self.port}:interface=127.0.0.1",
            "GREYFOX_DB": os.path.join(workdir, f"bench-{self.port}.db"),
        })
        if limits:
            env["GREYFOX_DAILY_TOKENS"] = "1000000000000"  # the quota stage estimates every request
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        cmd = cmd or [twistd, "-n", "--pidfile=", "--logfile=" + os.path.join(workdir, f"twistd-{self.port}.log"), "greyfox"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(pinned(PROXY_CPU, cmd), env=env, cwd=workdir)
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


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds in all: checks that the benchmark works")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    secs = 1 if args.smoke else 8
    n_streams = 20 if args.smoke else 300
    big_mib = 5 if args.smoke else 100
    workdir = tempfile.mkdtemp(prefix="greyfox-bench-")
    unique, fixed = os.path.join(workdir, "unique.lua"), os.path.join(workdir, "fixed.lua")
    open(unique, "w").write(UNIQUE_LUA)
    open(fixed, "w").write(FIXED_LUA)
    with fake_upstream() as up_port:
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        figures, rows = run_all(up_port, workdir, unique, fixed, direct, secs, n_streams, big_mib)
    print(table(rows))
    print(f"\ndefaults: start to first served request {figures['default_start_to_first_request_s'] * 1000:.0f} ms, "
          f"idle RSS {figures['default_idle_rss_mb']:.1f} MB")
    print(f"with a daily token limit (tokenizers loaded at start): start to first served request "
          f"{figures['start_to_first_request_s'] * 1000:.0f} ms, idle RSS {figures['idle_rss_mb']:.1f} MB, "
          f"RSS after the run {figures['rss_after_mb']:.1f} MB")
    print(f"pinning: GreyFox on CPU {PROXY_CPU}; upstream and load on CPU {LOAD_CPU}; one run, ratios matter more than absolutes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def run_all(up_port: int, workdir: str, unique: str, fixed: str, direct: str, secs: float, n_streams: int,
            big_mib: int) -> tuple[dict[str, Any], list[list[str]]]:
    figures: dict[str, Any] = {}
    rows = [["scenario", "direct", "through GreyFox", "ratio", "added latency", "GreyFox CPU / request"]]
    plain = GreyFox(up_port, workdir, limits=False)  # defaults: no limits, tokenizers loaded only if needed
    try:
        figures["default_start_to_first_request_s"] = plain.ready()
        time.sleep(0.5)
        figures["default_idle_rss_mb"] = proc_rss_mb(plain.proc.pid)
    finally:
        plain.stop()
    gf = GreyFox(up_port, workdir)
    try:
        figures["start_to_first_request_s"] = gf.ready()
        time.sleep(0.5)
        figures["idle_rss_mb"] = proc_rss_mb(gf.proc.pid)
        proxied = gf.url + "/v1/chat/completions"

        for c in (1, 16, 64):
            d = wrk(direct, c, secs, unique)
            p, cpu_ms = with_cpu(gf.proc.pid, lambda: wrk(proxied, c, secs, unique))
            figures[f"relay_c{c}"] = {"direct": d, "proxy": p, "cpu_ms_per_request": cpu_ms}
            rows.append([f"relay, cache miss, c={c}", f"{d['rps']:.0f} req/s", f"{p['rps']:.0f} req/s",
                         f"{p['rps'] / d['rps']:.2f}", f"p50 +{p['p50'] - d['p50']:.2f} ms, p99 +{p['p99'] - d['p99']:.2f} ms",
                         f"{cpu_ms:.3f} ms"])

        # Added latency as clients see it with a model that takes its time: the
        # same 16 clients, an upstream answering in THINK_MS, the proxy far
        # from saturated (at c=16 above, each request waits behind 15 others).
        think = os.path.join(workdir, "think.lua")
        with open(think, "w") as f_:
            f_.write(THINK_LUA)
        d = wrk(direct, 16, secs, think)
        p, cpu_ms = with_cpu(gf.proc.pid, lambda: wrk(proxied, 16, secs, think))
        figures["relay_think_c16"] = {"direct": d, "proxy": p, "cpu_ms_per_request": cpu_ms}
        rows.append([f"relay, c=16, upstream answering in {THINK_MS} ms", f"{d['rps']:.0f} req/s", f"{p['rps']:.0f} req/s",
                     f"{p['rps'] / d['rps']:.2f}", f"p50 +{p['p50'] - d['p50']:.2f} ms, p99 +{p['p99'] - d['p99']:.2f} ms",
                     f"{cpu_ms:.3f} ms"])
        td = d  # the direct figures of this load, for the turns below

        # The floor: the same relay with no GreyFox code (bench/floor.py), measured
        # in turns with GreyFox (floor, GreyFox, GreyFox, floor), so that both see
        # the same machine phase: this machine's speed drifts by a third within
        # minutes, and the ratio of the two is the steadiest figure there is.
        with floor_relay(up_port) as (floor, floor_url):
            wrk(floor_url, 16, 1, unique)  # warm its pool
            turns: dict[str, list[tuple[dict[str, Any], float]]] = {"floor": [], "greyfox": []}
            for who in ("floor", "greyfox", "greyfox", "floor"):
                pid, url = (floor.pid, floor_url) if who == "floor" else (gf.proc.pid, proxied)
                with frozen(gf.proc.pid if who == "floor" else floor.pid):
                    turns[who].append(with_cpu(pid, lambda: wrk(url, 16, secs, unique)))
        # The model-like tail, against what this machine does to any relay: the
        # same load through the floor made to compute fixed work a request as
        # plain Python (0 to 300 us; under this load 300 us cost about what
        # GreyFox spends a request in the row above), and GreyFox again after
        # these turns (one turn's p99 swings by a factor of three).  The floor's
        # p99 rises with its CPU a request, steeply past about 0.3 ms: this
        # machine's speed drops for tens of ms at a time, and only less CPU a
        # request shortens what a request waits through then.
        def floor_working(work_us: float) -> tuple[float, dict[str, Any], float]:
            with floor_relay(up_port, work_us) as (worker, worker_url):
                wrk(worker_url, 16, 1, think)  # warm its pool
                with frozen(gf.proc.pid):
                    return (work_us, *with_cpu(worker.pid, lambda: wrk(worker_url, 16, secs, think)))

        points = [floor_working(w) for w in (0.0, 100.0, 200.0, 300.0)]
        # The floor doing the core computations of a metered, cached relay with
        # GreyFox's pure functions (JSON, cache key, token estimate, usage, price,
        # ledger row) and nothing around them, saturated and at the same load.
        with floor_relay(up_port, "core", timeout=60) as (lean, lean_url):
            wrk(lean_url, 16, 1, unique)  # warm its pool
            with frozen(gf.proc.pid):
                lean_sat, lean_sat_ms = with_cpu(lean.pid, lambda: wrk(lean_url, 16, secs, unique))
                lean_think, lean_think_ms = with_cpu(lean.pid, lambda: wrk(lean_url, 16, secs, think))
        again, again_ms = with_cpu(gf.proc.pid, lambda: wrk(proxied, 16, secs, think))
        figures["relay_think_c16"]["again"] = {"proxy": again, "cpu_ms_per_request": again_ms}
        figures["relay_think_c16_control"] = [{"work_us": w, "floor": r, "cpu_ms_per_request": ms} for w, r, ms in points]
        rows.append(["  the same, a second turn (after the floor's below)", "", f"{again['rps']:.0f} req/s", "",
                     f"p50 +{again['p50'] - td['p50']:.2f} ms, p99 +{again['p99'] - td['p99']:.2f} ms", f"{again_ms:.3f} ms"])
        rows.append(["  same load, floor + " + "/".join(f"{w:.0f}" for w, _, _ in points) + " us of work a request", "",
                     "/".join(f"{r['rps']:.0f}" for _, r, _ in points) + " req/s", "",
                     "p99 " + "/".join(f"+{r['p99'] - td['p99']:.1f}" for _, r, _ in points) + " ms",
                     "/".join(f"{ms:.3f}" for _, _, ms in points) + " ms"])
        figures["core"] = {"c16": lean_sat, "c16_cpu_ms": lean_sat_ms, "think": lean_think, "think_cpu_ms": lean_think_ms}
        rows.append(["  same load, floor + GreyFox's core computations", "", f"{lean_think['rps']:.0f} req/s", "",
                     f"p50 +{lean_think['p50'] - td['p50']:.2f} ms, p99 +{lean_think['p99'] - td['p99']:.2f} ms",
                     f"{lean_think_ms:.3f} ms"])
        floor_ms = sum(ms for _, ms in turns["floor"]) / 2
        gf_ms = sum(ms for _, ms in turns["greyfox"]) / 2
        f = turns["floor"][-1][0]
        figures["floor_c16"] = {"proxy": f, "cpu_ms_per_request": floor_ms, "greyfox_in_turns_ms": gf_ms,
                                "turns": {k: [ms for _, ms in v] for k, v in turns.items()}}
        rows.append(["floor: relay with no GreyFox code, c=16", "", f"{f['rps']:.0f} req/s", "",
                     f"in turns: GreyFox {gf_ms:.3f} ms = {gf_ms / floor_ms:.1f} x floor, "
                     f"its own work {gf_ms - floor_ms:.3f} ms", f"{floor_ms:.3f} ms"])
        rows.append(["floor + GreyFox's core computations, c=16", "", f"{lean_sat['rps']:.0f} req/s", "",
                     f"{lean_sat_ms / floor_ms:.1f} x floor; GreyFox {gf_ms - lean_sat_ms:.3f} ms more",
                     f"{lean_sat_ms:.3f} ms"])

        post(proxied, FIXED_BODY)  # warm the cache entry
        for c in (16, 64):
            d = wrk(direct, c, secs, fixed)
            p, cpu_ms = with_cpu(gf.proc.pid, lambda: wrk(proxied, c, secs, fixed))
            relay = figures[f"relay_c{c}"]["proxy"]["rps"]
            figures[f"hits_c{c}"] = {"direct": d, "proxy": p, "cpu_ms_per_request": cpu_ms, "vs_relay": p["rps"] / relay}
            rows.append([f"cache hits, c={c}", f"{d['rps']:.0f} req/s (upstream)", f"{p['rps']:.0f} req/s",
                         f"{p['rps'] / relay:.1f}x relay", f"p50 {p['p50']:.2f} ms, p99 {p['p99']:.2f} ms", f"{cpu_ms:.3f} ms"])

        for c in (1, 16):
            d = streams(up_port, c, n_streams)
            p, cpu_ms = with_cpu(gf.proc.pid, lambda: streams(gf.port, c, n_streams))
            figures[f"stream_c{c}"] = {"direct": d, "proxy": p, "cpu_ms_per_request": cpu_ms}
            rows.append([f"stream ({d['chunks']} chunks), c={c}",
                         f"TTFB {d['ttfb_p50']:.2f} ms, total {d['total_p50']:.2f} ms, {d['chunks_per_s']:.0f} chunks/s",
                         f"TTFB {p['ttfb_p50']:.2f} ms, total {p['total_p50']:.2f} ms, {p['chunks_per_s']:.0f} chunks/s",
                         f"{p['chunks_per_s'] / d['chunks_per_s']:.2f}", f"TTFB +{p['ttfb_p50'] - d['ttfb_p50']:.2f} ms",
                         f"{cpu_ms:.3f} ms"])

        # As a model streams: the first event alone, the rest 5 ms later.
        d = streams(up_port, 1, n_streams, "paced")
        p, cpu_ms = with_cpu(gf.proc.pid, lambda: streams(gf.port, 1, n_streams, "paced"))
        figures["stream_paced_c1"] = {"direct": d, "proxy": p, "cpu_ms_per_request": cpu_ms}
        rows.append(["stream, first event alone (as a model sends), c=1",
                     f"TTFB {d['ttfb_p50']:.2f} ms, total {d['total_p50']:.2f} ms",
                     f"TTFB {p['ttfb_p50']:.2f} ms, total {p['total_p50']:.2f} ms",
                     "", f"TTFB +{p['ttfb_p50'] - d['ttfb_p50']:.2f} ms", f"{cpu_ms:.3f} ms"])

        before = proc_rss_mb(gf.proc.pid)
        big = asyncio.run(_slow_big(gf.port, big_mib, gf.proc.pid, rate_mib_s=25))
        figures["big_stream"] = dict(big, rss_before_mb=before)
        rows.append([f"{big_mib} MiB stream, reader at 25 MiB/s", "", f"{big['bytes'] / 1048576:.0f} MiB in {big['seconds']:.1f} s",
                     "", f"peak RSS {big['peak_rss_mb']:.1f} MB (before {before:.1f} MB)", ""])
        figures["rss_after_mb"] = proc_rss_mb(gf.proc.pid)
    finally:
        gf.stop()

    # The ledger's cost: the same relay with recording switched off (benchmark only).
    # Both processes run side by side and are measured in turns (off, on, on, off, twice),
    # so that the machine's drift, often ±20 % within a minute here, falls on both alike;
    # the one not measured is frozen meanwhile (see frozen()).
    nl = GreyFox(up_port, workdir, [sys.executable, os.path.join(HERE, "noledger.py")])
    on = GreyFox(up_port, workdir)
    try:
        nl.ready()
        on.ready()
        for target in (nl, on):  # warm both pools and caches alike
            wrk(target.url + "/v1/chat/completions", 16, 1, unique)
        turns: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        for _ in range(2):
            for name, target in (("off", nl), ("on", on), ("on", on), ("off", nl)):
                with frozen((on if target is nl else nl).proc.pid):
                    r, cpu_ms = with_cpu(target.proc.pid, lambda: wrk(target.url + "/v1/chat/completions", 16, max(1, secs // 2), unique))
                turns[name].append((r["rps"], cpu_ms))
        off_rps, on_rps = (sum(t[0] for t in turns[k]) / len(turns[k]) for k in ("off", "on"))
        off_cpu, on_cpu = (sum(t[1] for t in turns[k]) / len(turns[k]) for k in ("off", "on"))
        figures["ledger_cost"] = {"ledger_off_rps": off_rps, "ledger_on_rps": on_rps,
                                  "ledger_off_cpu_ms": off_cpu, "ledger_on_cpu_ms": on_cpu}
        rows.append(["relay c=16, ledger off vs on (in turns)", f"{off_rps:.0f} req/s (off)", f"{on_rps:.0f} req/s (on)",
                     f"{on_rps / off_rps:.2f}", "", f"{off_cpu:.3f} ms off, {on_cpu:.3f} ms on"])
    finally:
        nl.stop()
        on.stop()
    return figures, rows


if __name__ == "__main__":
    raise SystemExit(main())
