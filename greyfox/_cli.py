# -*- test-case-name: tests.test_cache -*-
"""``greyfox cache export|import FILE`` (cassettes), ``greyfox ci -- CMD`` (see :mod:`greyfox._ci`) and
``greyfox db copy`` (see :mod:`greyfox._copy`).

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
from ._ci import CiOptions, run as run_ci
from ._cisummary import CI_MODES
from ._config import ConfigError, load_settings
from ._store import open_database


#: Where ``greyfox ci`` reads and records answers unless told.
DEFAULT_CASSETTE = "greyfox.cassette.jsonl"


def _budget(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of dollars >= 0")
    return value


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
    ci = commands.add_parser(
        "ci", help="run a test command against recorded answers: greyfox ci [options] -- CMD [ARGS...]",
        description="Runs CMD with OPENAI_BASE_URL and ANTHROPIC_BASE_URL on a GreyFox that answers from the "
                    "cassette, then prints what it cost and saved. Exit status: the command's own when it fails; "
                    "1 for misses in replay mode or an exceeded budget; 2 when ci itself cannot run.")
    ci.add_argument("--cassette", default=DEFAULT_CASSETTE, help=f"JSON Lines cassette (default: {DEFAULT_CASSETTE})")
    ci.add_argument("--mode", choices=CI_MODES, default="replay",
                    help="replay: never call an upstream (default); record-missing: record what the cassette "
                         "lacks; record: record every answer again")
    ci.add_argument("--budget-usd", type=_budget, help="fail the run when its recorded spend exceeds this")
    ci.add_argument("--report", help="also write the summary as Markdown to this file")
    ci.add_argument("run", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    db = commands.add_parser("db", help="move a database between SQLite and PostgreSQL").add_subparsers(
        dest="action", required=True)
    copy = db.add_parser("copy", help="copy ledger, cache and limits from SRC to DST (SQLite paths or postgresql:// URIs)",
                         description="Copies in batches with upserts: running it again gives the same target. "
                                     "Stop GreyFox on both databases first.")
    copy.add_argument("--from", dest="source", required=True, metavar="SRC")
    copy.add_argument("--to", dest="target", required=True, metavar="DST")
    copy.add_argument("--append", action="store_true", help="copy into a target that holds rows already")
    args = parser.parse_args(argv)
    if args.command == "db":
        return _copy(args.source, args.target, args.append)
    if args.command == "ci":
        command = args.run[1:] if args.run[:1] == ["--"] else args.run
        if not command:
            ci.error("give the command to run after --")
        return run_ci(CiOptions(command, args.cassette, args.mode, args.budget_usd, args.report, args.config))

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


def _copy(source: str, target: str, append: bool) -> int:
    from ._copy import CopyRefused, copy_database
    from ._engines import engine_for

    def progress(table: str, done: int, total: int) -> None:
        sys.stderr.write(f"\r{table}: {done}/{total} rows" + ("\n" if done >= total else ""))
        sys.stderr.flush()

    try:
        copied = copy_database(source, target, append, progress)
    except CopyRefused as e:
        print(f"greyfox db copy: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a database that cannot be opened or written: one line, no traceback
        reason = (str(e).strip().splitlines() or [""])[0]
        print(f"greyfox db copy: {type(e).__name__}: {reason}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{n} {table}" for table, n in copied.items())
    print(f"copied {shown} rows from {engine_for(source).shown()} to {engine_for(target).shown()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
