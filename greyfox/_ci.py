# -*- test-case-name: tests.test_ci -*-
"""``greyfox ci -- CMD``: run a test command against a GreyFox that answers from a cassette.

The GreyFox service ``twistd`` runs is started in this process on a free
loopback port with a throwaway database, the cassette loaded into it; the
command is spawned by the reactor with its SDKs pointed at it, its output
passing straight through (it inherits the terminal's file descriptors).
When it exits, the service stops (its ledger rows all settled), the summary
is printed, and the cassette is written back in the record modes.

Signals: the command shares this process group, so a terminal's Ctrl-C
reaches it directly; GreyFox ignores SIGINT and keeps answering while the
command winds down.  SIGTERM and SIGHUP, which a process manager sends to
this process alone, are passed on to the command.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Sequence

import attr
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from . import _cisummary
from ._cache import CassetteError, export_lines, import_lines
from ._config import ConfigError, load_settings
from ._store import open_database

#: Signals passed on to the command (SIGINT reaches it from the terminal; see the module docstring).
FORWARDED = (signal.SIGTERM, signal.SIGHUP)


class CannotRun(Exception):
    """``ci`` itself cannot run (exit status 2); the message is one line."""


@attr.s(auto_attribs=True, frozen=True)
class CiOptions:
    command: Sequence[str]
    cassette: str
    mode: str = "replay"
    budget_usd: float | None = None
    report: str | None = None
    config: str | None = None


def child_environment(environ: dict[str, str], port: int) -> dict[str, str]:
    """The command's environment: the SDKs' base URLs on GreyFox, dummy keys where none is set (so SDKs start)."""
    env = dict(environ)
    env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    env["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{port}"
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        if not env.get(name):
            env[name] = "greyfox-ci-dummy-key"
    return env


class _Command(ProcessProtocol):
    """The spawned command: ``ended`` fires with its exit status (128 + N when killed by signal N)."""

    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            status = 0
        else:
            value = reason.value
            status = value.exitCode if value.exitCode is not None else 128 + (value.signal or 0)
        self.ended.callback(status)


def run(options: CiOptions, environ: dict[str, str] | None = None) -> int:
    """The whole run; returns the exit status (SPEC §9)."""
    environ = dict(os.environ if environ is None else environ)
    try:
        with tempfile.TemporaryDirectory(prefix="greyfox-ci-") as scratch:
            return _run(options, environ, scratch)
    except CannotRun as e:
        sys.stderr.write(f"greyfox ci: {e}\n")
        return 2


def _run(options: CiOptions, environ: dict[str, str], scratch: str) -> int:
    from twisted.internet import reactor

    from .service import GreyFoxService

    old = _read_cassette(options)
    db = os.path.join(scratch, "greyfox.db")
    conn = open_database(db)
    try:
        if options.mode != "record":  # ("record" fetches every answer again)
            import_lines(conn, old.values())
    finally:
        conn.close()
    executable = shutil.which(options.command[0], path=environ.get("PATH"))
    if executable is None:
        sys.stderr.write(f"greyfox ci: {options.command[0]}: command not found\n")
        return 127

    try:
        settings = load_settings({
            "db": db, "listen": "tcp:0:interface=127.0.0.1", "config": options.config,
            "mode": "replay" if options.mode == "replay" else "record",
        }, environ)
    except ConfigError as e:
        raise CannotRun(str(e)) from None
    # The command cannot know GreyFox's client tokens: this proxy listens on loopback for it alone.
    settings = attr.evolve(settings, client_token=None, user_tokens={})

    rows: list[Any] = []
    misses: list[Any] = []
    try:
        service = GreyFoxService(settings, reactor, on_row=rows.append, on_replay_miss=misses.append)
    except Exception as e:
        raise CannotRun(f"the proxy cannot start: {e}") from None
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    outcome: dict[str, Any] = {}

    async def serve_the_command() -> None:
        try:
            service.startService()
        except BaseException as e:  # (SystemExit from a failed listen, too)
            outcome["error"] = f"the proxy cannot start: {e}"
            return
        try:
            command = _Command()
            env = child_environment(environ, service.port.getHost().port)
            process = reactor.spawnProcess(command, executable, list(options.command), env=env,
                                           childFDs={0: 0, 1: 1, 2: 2})
            for sig in FORWARDED:
                signal.signal(sig, lambda n, frame: reactor.callFromThread(_forward, process, n))
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            outcome["status"] = await command.ended
        finally:
            await service.stopService()

    def finished(result: Any) -> None:
        if isinstance(result, Failure):
            outcome.setdefault("error", result.getErrorMessage())
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(serve_the_command()).addBoth(finished))
    reactor.run()
    if "status" not in outcome:
        raise CannotRun(outcome.get("error", "the proxy stopped before the command ran"))

    recorded = 0
    if options.mode != "replay":
        try:
            recorded = _write_cassette(options, old, db)
        except OSError as e:
            raise CannotRun(f"{options.cassette}: cannot write the cassette: {e}") from None
    summary = _cisummary.summarize(options.mode, options.cassette, rows, len(misses), options.budget_usd, recorded)
    sys.stderr.write(_cisummary.text(summary, misses))
    report = _cisummary.markdown(summary, misses)
    for path, how, text in ((options.report, "w", report), (environ.get("GITHUB_STEP_SUMMARY"), "a", report + "\n")):
        if path:
            try:
                with open(path, how, encoding="utf-8") as f:
                    f.write(text)
            except OSError as e:
                raise CannotRun(f"{path}: cannot write the summary: {e}") from None
    return _cisummary.exit_status(outcome["status"], summary)


def _forward(process: Any, signum: int) -> None:
    try:
        process.signalProcess(signum)
    except Exception:  # (it has just exited)
        pass


def _read_cassette(options: CiOptions) -> dict[str, str]:
    """The cassette's lines by key, every line checked; a missing file is empty in the record modes."""
    path = options.cassette
    if not os.path.exists(path):
        if options.mode == "replay":
            raise CannotRun(f"{path}: no such cassette (record one with --mode record-missing)")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CannotRun(f"{path}: cannot read the cassette: {e}") from None
    check = open_database(":memory:")
    try:
        import_lines(check, lines)
    except CassetteError as e:
        raise CannotRun(f"{path}: {e}") from None
    finally:
        check.close()
    return _cisummary.cassette_keys(lines)


def _write_cassette(options: CiOptions, old: dict[str, str], db: str) -> int:
    """Write the cassette back (atomically); the number of keys it gained."""
    conn = open_database(db)
    try:
        fetched = _cisummary.cassette_keys(export_lines(conn, include_private=True))
    finally:
        conn.close()
    lines = _cisummary.merge_cassette(old, fetched, options.mode)
    directory = os.path.dirname(os.path.abspath(options.cassette))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".cassette-", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(temporary, options.cassette)
    return len(set(fetched) - set(old))
