# -*- test-case-name: tests.test_cache -*-
"""``greyfox cache export FILE`` / ``greyfox cache import FILE``: cassettes for CI.

A team records answers locally, exports them as JSON Lines (no credentials),
commits the file, and CI imports it and runs with ``GREYFOX_MODE=replay``.
Run import while the proxy is stopped: a running proxy reads its cache index
at start.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ._cache import CassetteError, export_lines, import_lines
from ._config import ConfigError, load_settings
from ._store import open_database


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="greyfox", description="GreyFox tools (start the proxy with: twistd -n greyfox)")
    parser.add_argument("--db", help="database path (default: GREYFOX_DB, the config file, or ./data/greyfox.db)")
    parser.add_argument("--config", help="TOML config file (GREYFOX_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="move recorded answers between machines").add_subparsers(dest="action", required=True)
    exp = cache.add_parser("export", help="write cached answers to FILE as JSON Lines ('-' = stdout)")
    exp.add_argument("file")
    exp.add_argument("--all", action="store_true",
                     help="also export answers bought with a client's own credential (written as shared entries)")
    imp = cache.add_parser("import", help="read a cassette into the cache (all lines or none)")
    imp.add_argument("file")
    args = parser.parse_args(argv)

    try:
        settings = load_settings({"db": args.db, "config": args.config})
    except ConfigError as e:
        print(f"greyfox: {e}", file=sys.stderr)
        return 2
    if args.action == "import" and not os.path.exists(args.file):
        print(f"greyfox: {args.file}: no such file", file=sys.stderr)
        return 2
    conn = open_database(settings.db)
    try:
        if args.action == "export":
            out = sys.stdout if args.file == "-" else open(args.file, "w", encoding="utf-8")
            n = 0
            try:
                for line in export_lines(conn, include_private=args.all):
                    out.write(line + "\n")
                    n += 1
            finally:
                if out is not sys.stdout:
                    out.close()
            print(f"exported {n} entries to {args.file}", file=sys.stderr)
        else:
            with open(args.file, encoding="utf-8") as f:
                try:
                    n = import_lines(conn, f)
                except CassetteError as e:
                    print(f"greyfox: {args.file}: {e}; nothing imported", file=sys.stderr)
                    return 1
            print(f"imported {n} entries from {args.file}", file=sys.stderr)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
