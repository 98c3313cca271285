"""A seeded fuzzer: hostile requests against a real ``twistd -n greyfox``.

    python -m tests.fuzz --n 100000 --seed 1

Every input is a raw HTTP/1.1 request on a fresh connection: odd methods,
paths (dot segments, percent-encoding, bytes outside ASCII), headers (Host,
Content-Type, X-App-User-Id, Authorization, cache controls, framing), and
bodies for every endpoint (JSON documents with every kind of wrong value,
then mutated: NaN, 1e999, lone surrogates, deep nesting, truncation, other
encodings, chunked framing), plus the admin API's queries and writes.
Behind GreyFox is the benchmark's fake upstream (``bench/upstream.py``).

It fails on any answer of 500, on anything GreyFox logged as an error or a
traceback, and if afterwards the daemon is not healthy, does not relay a
plain request, or has not written its ledger row.  Exit status 0 when all
is well, 1 otherwise; the inputs that failed are printed (seed and index
reproduce them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "bench")

PATHS = [
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/v1/files/abc",
    "/v1", "/v1/", "/api/usage", "/api/requests", "/api/quotas", "/api/quotas/alice", "/api/quotas/alice/breaker",
    "/api/cache", "/api/status", "/api/inflight", "/api/nothing", "/healthz", "/metrics", "/", "/index.html",
]
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "TRACE", "CONNECT", "post", "G T"]
ODD_STRINGS = ["", " ", "\ud800", "\udfff x", "é✓😀", "\x00", "a" * 5000, "<|endoftext|>", "../../etc", "%00", "\\u0000"]
ODD_NUMBERS = [0, -1, 1, 2**31, 2**64, -(2**70), 1.5, 1e308, -0.0, True, None, "5", [], {}]
MODELS = ["gpt-4o-mini", "deepseek/deepseek-chat", "openrouter/anthropic/claude", "nobody/x", "", "/", "gpt-4o-mini/"]


def odd_value(rnd: random.Random, depth: int = 0) -> Any:
    kind = rnd.randrange(6 if depth < 4 else 3)
    if kind == 0:
        return rnd.choice(ODD_STRINGS)
    if kind == 1:
        return rnd.choice(ODD_NUMBERS)
    if kind == 2:
        return rnd.choice([True, False, None])
    if kind == 3:
        return [odd_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    if kind == 4:
        return {rnd.choice(["role", "content", "type", "text", "function", "name", "x"]): odd_value(rnd, depth + 1)
                for _ in range(rnd.randrange(4))}
    return rnd.choice(MODELS)


def document(rnd: random.Random, path: str) -> Any:
    """A request body that looks like the endpoint's, with some fields wrong."""
    doc: dict[str, Any] = {"model": rnd.choice(MODELS)}
    if "chat" in path or rnd.random() < 0.2:
        doc["messages"] = [{"role": rnd.choice(["user", "system", "assistant", "tool", 7]),
                            "content": rnd.choice([f"fuzz {rnd.random()}", odd_value(rnd)])}
                           for _ in range(rnd.randrange(1, 4))]
        if rnd.random() < 0.2:
            doc["messages"].append({"role": "assistant", "tool_calls": [{"function": odd_value(rnd)}]})
    if "completions" in path and "chat" not in path:
        doc["prompt"] = rnd.choice([f"fuzz {rnd.random()}", odd_value(rnd)])
    if "embeddings" in path or "responses" in path:
        doc["input"] = rnd.choice([f"fuzz {rnd.random()}", odd_value(rnd)])
    for key in ("stream", "max_tokens", "max_completion_tokens", "n", "temperature", "stream_options", "tools", "seed"):
        if rnd.random() < 0.25:
            doc[key] = odd_value(rnd)
    if rnd.random() < 0.3:
        doc["stream"] = True
    if rnd.random() < 0.1:
        del doc["model"]
    return doc


def body_bytes(rnd: random.Random, path: str) -> bytes:
    if path.startswith("/api/quotas"):
        doc: Any = {"daily_tokens": odd_value(rnd), "rpm": odd_value(rnd), "tpm": odd_value(rnd),
                    "daily_budget_usd": odd_value(rnd)}
    else:
        doc = document(rnd, path)
    try:
        raw = json.dumps(doc).encode()  # (ASCII: lone surrogates are \u escapes)
    except (ValueError, TypeError):
        raw = b"{}"
    mutation = rnd.randrange(12)
    if mutation == 0:
        raw = raw.replace(b"0", b"NaN", 1)
    elif mutation == 1:
        raw = raw.replace(b"1", b"1e999", 1)
    elif mutation == 2:
        raw = raw[: rnd.randrange(len(raw) + 1)]
    elif mutation == 3:
        depth = rnd.choice([100, 5000, 100_000])
        raw = b'{"model":"gpt-4o-mini","messages":' + b"[" * depth + b"]" * depth + b"}"
    elif mutation == 4:
        raw = json.dumps(doc).encode("utf-16") if rnd.random() < 0.5 else b"\xef\xbb\xbf" + raw
    elif mutation == 5:
        raw = bytes(rnd.randrange(256) for _ in range(rnd.randrange(64)))
    elif mutation == 6:
        raw = b'{"model": "\xed\xa0\x80", "messages": []}'
    return raw


def head_fields(rnd: random.Random, body: bytes) -> tuple[list[bytes], bytes, bool]:
    """Header lines, the body as framed, and whether the body is all there
    (a shorter one is a client that hangs up mid-body)."""
    lines = [rnd.choice([b"Host: 127.0.0.1", b"Host: .1", b"Host: \xff\xfe", b"Host: [::1", b"Host: a..b", b"Host: x:99999"])]
    if rnd.random() < 0.9:
        lines.append(b"Content-Type: " + rnd.choice([b"application/json", b"application/json; charset=utf-8",
                                                      b"text/plain", b"application/x-www-form-urlencoded",
                                                      b"application/vnd.api+json", b"\xff"]))
    if rnd.random() < 0.5:
        lines.append(b"X-App-User-Id: " + rnd.choice([b"alice", b"bob", b"", b" pad ", b"x" * 300, b"\xc3\xa9l\xc3\xa8ve",
                                                       b"\x01ctl", b"\xff\xfe"]))
    if rnd.random() < 0.3:
        lines.append(b"Authorization: " + rnd.choice([b"Bearer sk-fuzz", b"Bearer", b"Basic abc", b"\xff"]))
    if rnd.random() < 0.2:
        lines.append(b"X-GreyFox-Cache: " + rnd.choice([b"bypass", b"refresh", b"BYPASS", b"nonsense"]))
    if rnd.random() < 0.1:
        lines.append(b"X-GreyFox-Mode: replay")
    if rnd.random() < 0.2:
        lines.append(b"Cache-Control: " + rnd.choice([b"no-cache", b"no-store", b"no-cache, no-store", b",,,"]))
    if rnd.random() < 0.1:
        lines.append(b"Expect: 100-continue")
    whole = True
    framing = rnd.randrange(10)
    if framing == 0 and body:
        lines.append(b"Transfer-Encoding: chunked")
        cut = rnd.randrange(len(body) + 1)
        body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n%s\r\n" % (
            cut, body[:cut], len(body) - cut, body[cut:], rnd.choice([b"", b"X-App-User-Id: mallory\r\n"]))
        body = body.replace(b"0\r\n\r\n\r\n", b"0\r\n\r\n") if body.endswith(b"0\r\n\r\n\r\n") else body
    elif framing == 1:
        extra = rnd.choice([-5, 5, 10**10])
        lines.append(b"Content-Length: %d" % max(0, len(body) + extra))
        whole = extra < 0
    elif framing == 2:
        lines.append(b"Content-Length: -1")
    else:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return lines, body, whole


def path_of(rnd: random.Random) -> bytes:
    path = rnd.choice(PATHS).encode()
    mutation = rnd.randrange(10)
    if mutation == 0:
        path = path.replace(b"/", rnd.choice([b"/../", b"//", b"/./", b"/%2e%2e/", b"\\"]), 1)
    elif mutation == 1:
        path += rnd.choice([b"%ff", b"%2F..", b"/\xc3\xa9", b"%00", b"/%"])
    elif mutation == 2:
        path += b"?" + rnd.choice([b"limit=abc", b"limit=0&before=-1", b"group=colour", b"from=2026-13-45",
                                   b"from=2026-01-02&to=2026-01-01", b"user=%ff", b"status=999", b"older_than_days=NaN",
                                   b"model=" + b"x" * 3000])
    return path


def request(rnd: random.Random) -> tuple[bytes, bool]:
    """A raw request, and whether the client stays to read the answer."""
    method = rnd.choice(METHODS).encode()
    path = path_of(rnd)
    body = body_bytes(rnd, path.decode("latin-1")) if method in (b"POST", b"PUT", b"post") or rnd.random() < 0.05 else b""
    lines, framed, whole = head_fields(rnd, body)
    return method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(lines) + b"\r\n\r\n" + framed, whole


def send(port: int, data: bytes, stay: bool = True, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; what came back.  A client that does
    not stay hangs up once it has sent (the server may still answer first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(data)
            if not stay:
                conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # (GreyFox may answer and close before it has read everything)
        chunks = []
        while True:
            try:
                chunk = conn.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int | None:
    for part in answer.split(b"HTTP/1.1 ")[1:]:
        code = part[:3]
        if code.isdigit() and code != b"100":
            return int(code)
    return None


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def daemons(workdir: str) -> Iterator[tuple[int, str]]:
    """The fake upstream and ``twistd -n greyfox`` in front of it: GreyFox's port and log path."""
    up_port, port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, os.path.join(BENCH, "upstream.py"), str(up_port)], stdout=subprocess.PIPE)
    log = os.path.join(workdir, "twistd.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREYFOX_")}
    env.update(OPENAI_BASE_URL=f"http://127.0.0.1:{up_port}/v1", DEEPSEEK_BASE_URL=f"http://127.0.0.1:{up_port}/v1",
               OPENROUTER_BASE_URL=f"http://127.0.0.1:{up_port}/v1", OPENAI_API_KEY="sk-fuzz-key",
               GREYFOX_LISTEN=f"tcp:{port}:interface=127.0.0.1", GREYFOX_DB=os.path.join(workdir, "fuzz.db"),
               GREYFOX_DAILY_TOKENS="100000000", GREYFOX_LOOP_MAX_REPEATS="0", GREYFOX_READ_TIMEOUT="5")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proxy = subprocess.Popen([twistd, "-n", "--pidfile=", f"--logfile={log}", "greyfox"], env=env, cwd=workdir)
    try:
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == b"ready"
        wait_port(port)
        yield port, log
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proxy.kill()
        upstream.terminate()
        upstream.wait()


def run(n: int, seed: int) -> list[str]:
    """Send ``n`` inputs; the problems found (empty when none)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="greyfox-fuzz-") as workdir:
        for port, log in daemons(workdir):
            rnd = random.Random(seed)
            statuses: dict[int | None, int] = {}
            for i in range(n):
                data, stay = request(rnd)
                status = status_of(send(port, data, stay))
                statuses[status] = statuses.get(status, 0) + 1
                if status is not None and status >= 500 and status not in (502, 503, 504):
                    problems.append(f"input {i} (seed {seed}): {status} for {data[:300]!r}")
                elif status is None and stay:
                    problems.append(f"input {i} (seed {seed}): no answer to {data[:300]!r}")
            plain = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"after {seed}"}]}).encode()
            answer = send(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(plain), plain))
            if status_of(answer) != 200:
                problems.append(f"a plain request after the fuzzing got {answer[:200]!r}")
            rows = send(port, b"GET /api/requests?limit=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if b'"model": "gpt-4o-mini"' not in rows or b'"status": 200' not in rows:
                problems.append(f"the ledger did not record the plain request: {rows[-300:]!r}")
            health = send(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if status_of(health) != 200:
                problems.append(f"not healthy after the fuzzing: {health[-200:]!r}")
            print(f"fuzz: {n} inputs, seed {seed}; statuses {dict(sorted(statuses.items(), key=str))}")
        with open(log, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for marker in ("Traceback", "Unhandled", "#critical]", "#error]"):
            if marker in text:
                at = text.index(marker)
                problems.append(f"the daemon's log has {marker!r}: {text[max(0, at - 300): at + 700]}")
                break
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="inputs to send")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    problems = run(args.n, args.seed)
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
