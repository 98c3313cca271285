"""Instructions a request of the real daemon (or the floor), counted by valgrind.

``bench/inprocess.py`` counts GreyFox's own Python on in-memory transports;
this counts the whole process as users run it (``twistd -n greyfox``, ledger,
cache and quota stages on, the DB thread included) with its reactor, sockets
and timers, which the harness cannot see: a change there (sending at once,
fewer timers) shows up here and nowhere steadier.  The process runs under
``valgrind --tool=cachegrind --cache-sim=no`` twice, serving ``N1`` and then
``N2`` relayed requests one at a time; the difference, divided by
``N2 - N1``, leaves out start-up and shutdown::

    python bench/daemon_count.py            # GreyFox, one keep-alive connection
    python bench/daemon_count.py --fresh    # a new connection for every request
    python bench/daemon_count.py --floor    # bench/floor.py, the same way

Needs valgrind (Debian's package).  Under valgrind the process runs some 50
times slower, so timers and batches fall a little differently from run to
run: expect about ±3 % between runs, far less than a timed run moves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Iterator
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import GreyFox, fake_upstream, floor_relay, post, wait_http  # noqa: E402


def _send(sock: socket.socket, n: int) -> None:
    body = b'{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"count %d %d"}]}' % (os.getpid(), n)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-App-User-Id: bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            raise RuntimeError("connection closed before the answer was complete")
        got += piece
        end = got.find(b"\r\n\r\n")
        if end >= 0:
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", got[:end])
            if length and len(got) >= end + 4 + int(length.group(1)):
                if b" 200 " not in got.split(b"\r\n", 1)[0]:
                    raise RuntimeError(got[:300].decode("latin-1"))
                return


@contextlib.contextmanager
def _counted(valgrind: list[str], floor: bool, up_port: int, workdir: str) -> Iterator[int]:
    """GreyFox (or the floor) under ``valgrind``, ready: its port; stopped on
    leaving, so that valgrind writes its counts."""
    if floor:
        with floor_relay(up_port, prefix=valgrind, timeout=120) as (_, url):
            yield urlsplit(url).port  # type: ignore[misc]
        return
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    gf = GreyFox(up_port, workdir, [*valgrind, twistd, "-n", "--pidfile=", "--logfile=" + os.path.join(workdir, "twistd.log"), "greyfox"])
    try:
        wait_http(gf.url + "/healthz", timeout=120)
        yield gf.port
    finally:
        gf.proc.terminate()
        gf.proc.wait(timeout=120)  # (valgrind takes its time to exit)


def count(n: int, floor: bool, fresh: bool) -> int:
    """Total instructions of one process that served ``n`` requests (plus a warm-up)."""
    workdir = tempfile.mkdtemp(prefix="greyfox-count-")
    out = os.path.join(workdir, "cachegrind.out")
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"]
    with fake_upstream() as up_port, _counted(valgrind, floor, up_port, workdir) as port:
        for i in range(3):  # warm: pooled upstream connection, tokenizer, first code paths
            post(f"http://127.0.0.1:{port}/v1/chat/completions", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"warm %d"}]}' % i)
        sock = socket.create_connection(("127.0.0.1", port))
        for i in range(n):
            if fresh and i:
                sock.close()
                sock = socket.create_connection(("127.0.0.1", port))
            _send(sock, i)
        sock.close()
        time.sleep(0.5)  # the last batches written
    with open(out) as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError("no summary in " + out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floor", action="store_true", help="count bench/floor.py instead of GreyFox")
    parser.add_argument("--fresh", action="store_true", help="a new connection for every request")
    parser.add_argument("--n1", type=int, default=100)
    parser.add_argument("--n2", type=int, default=600)
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        print("daemon_count: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    first = count(args.n1, args.floor, args.fresh)
    second = count(args.n2, args.floor, args.fresh)
    who = "floor" if args.floor else "GreyFox"
    how = "a new connection each" if args.fresh else "one keep-alive connection"
    print(f"{who}: {(second - first) / (args.n2 - args.n1) / 1000:.1f}k instructions a relayed request ({how})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
