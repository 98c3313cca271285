# -*- test-case-name: tests.test_ci -*-
"""What a ``greyfox ci`` run did, its exit status, and its cassette.  Pure functions.

The runner (:mod:`greyfox._ci`) collects the ledger rows and replay misses
of the run; everything it prints, writes and exits with is decided here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import attr

if TYPE_CHECKING:
    from ._proxy import ReplayMiss
    from ._store import LedgerRow

#: The modes of ``greyfox ci --mode``.
CI_MODES = ("replay", "record-missing", "record")

#: Differences listed per miss (the first is always shown).
LISTED_DIFFERENCES = 8


@attr.s(auto_attribs=True, frozen=True)
class Summary:
    """Totals of one run."""

    mode: str
    cassette: str
    requests: int = 0
    hits: int = 0
    #: Replay mode: requests the cassette could not answer; else requests sent upstream.
    misses: int = 0
    tokens_spent: int = 0
    tokens_saved: int = 0
    spent_usd: float = 0.0
    saved_usd: float = 0.0
    #: Answers bought whose price is unknown (their dollars are not in ``spent_usd``).
    unpriced: int = 0
    budget_usd: float | None = None
    #: Entries the cassette gained (record modes).
    recorded: int = 0

    @property
    def over_budget(self) -> bool:
        return self.budget_usd is not None and self.spent_usd > self.budget_usd


def summarize(mode: str, cassette: str, rows: Iterable[LedgerRow], replay_misses: int,
              budget_usd: float | None = None, recorded: int = 0) -> Summary:
    """Totals over the run's ledger rows (:class:`~greyfox._store.LedgerRow`)."""
    requests = hits = bought = tokens_spent = tokens_saved = unpriced = 0
    spent = saved = 0.0
    for row in rows:
        requests += 1
        if row.cache == "HIT":
            hits += 1
            tokens_saved += row.saved_tokens
            saved += row.saved_usd
            continue
        if row.cache in ("MISS", "REFRESH"):
            bought += 1
        tokens_spent += row.total_tokens
        if row.cost_usd is None:
            unpriced += 1
        else:
            spent += row.cost_usd
    misses = replay_misses if mode == "replay" else bought
    return Summary(mode, cassette, requests, hits, misses, tokens_spent, tokens_saved, spent, saved, unpriced,
                   budget_usd, recorded)


def exit_status(command_status: int, summary: Summary) -> int:
    """The command's own status when it failed; else 1 for replay misses or an exceeded budget; else 0."""
    if command_status != 0:
        return command_status
    if summary.mode == "replay" and summary.misses:
        return 1
    return 1 if summary.over_budget else 0


def merge_cassette(old: Mapping[str, str], fetched: Mapping[str, str], mode: str) -> list[str]:
    """The cassette's lines after a run, sorted by key.

    ``record-missing`` keeps every line it had and adds the new keys;
    ``record`` replaces the lines it fetched again and keeps those the run did not use.
    """
    lines = dict(old)
    for key, line in fetched.items():
        if mode == "record" or key not in lines:
            lines[key] = line
    return [lines[key] for key in sorted(lines)]


def cassette_keys(lines: Iterable[str]) -> dict[str, str]:
    """A cassette's lines by key (lines already checked by the import)."""
    found = {}
    for line in lines:
        if line.strip():
            found[json.loads(line)["key"]] = line.rstrip("\n")
    return found


def miss_lines(misses: Sequence[ReplayMiss]) -> list[str]:
    """One line per distinct miss, naming the first differing path; further differences indented."""
    out: list[str] = []
    seen: set[tuple[str | None, str, str | None]] = set()
    for miss in misses:
        ident = (miss.upstream, miss.path, miss.key)
        if ident in seen:
            continue
        seen.add(ident)
        where = f"/v1{miss.path}" + (f" ({miss.model})" if miss.model else "")
        nearest = miss.nearest
        if miss.key is None:
            out.append(f"miss: {where}: never cached (only the JSON endpoints are recorded)")
        elif nearest is None:
            out.append(f"miss: {where}: nothing recorded for this upstream and path")
        elif not nearest.differences:
            out.append(f"miss: {where}: same body as {nearest.key[:12]}, recorded for another credential")
        else:
            first, *rest = nearest.differences
            out.append(f"miss: {where}: {first.line()} (nearest recorded: {nearest.key[:12]})")
            out += [f"    {d.line()}" for d in rest[: LISTED_DIFFERENCES - 1]]
            if len(rest) >= LISTED_DIFFERENCES:
                out.append(f"    … and {len(rest) - LISTED_DIFFERENCES + 1} more")
    return out


def usd(amount: float) -> str:
    """Dollars to the cent, or to a millionth of one below a cent (a CI run often spends less)."""
    return f"${amount:.4f}" if amount == 0 or amount >= 0.01 else f"${amount:.6f}"


def text(summary: Summary, misses: Sequence[ReplayMiss]) -> str:
    """What the terminal shows at the end."""
    s = summary
    head = (f"greyfox ci ({s.mode}, {s.cassette}): {s.requests} requests, {s.hits} hits, {s.misses} "
            f"{'misses' if s.mode == 'replay' else 'sent upstream'}; tokens {s.tokens_spent} spent, "
            f"{s.tokens_saved} saved; {usd(s.spent_usd)} spent, {usd(s.saved_usd)} saved")
    lines = [head]
    if s.unpriced:
        lines.append(f"{s.unpriced} answers have no known price: their dollars are not counted")
    if s.recorded:
        lines.append(f"{s.recorded} new entries written to {s.cassette}")
    if s.over_budget:
        lines.append(f"over budget: {usd(s.spent_usd)} spent, --budget-usd {s.budget_usd:g}")
    lines += miss_lines(misses)
    if s.mode == "replay" and s.misses:
        lines.append(f"record the misses with: greyfox ci --cassette {s.cassette} --mode record-missing -- ...")
    return "\n".join(lines) + "\n"


def markdown(summary: Summary, misses: Sequence[ReplayMiss]) -> str:
    """The same, for ``--report`` and ``$GITHUB_STEP_SUMMARY``."""
    s = summary
    missed = "misses" if s.mode == "replay" else "sent upstream"
    out = [
        f"### GreyFox CI: {s.mode}, `{s.cassette}`",
        "",
        f"| requests | hits | {missed} | tokens spent | tokens saved | spent | saved |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s.requests} | {s.hits} | {s.misses} | {s.tokens_spent} | {s.tokens_saved} | {usd(s.spent_usd)} "
        f"| {usd(s.saved_usd)} |",
        "",
    ]
    if s.unpriced:
        out += [f"{s.unpriced} answers have no known price: their dollars are not counted.", ""]
    if s.recorded:
        out += [f"{s.recorded} new entries written to `{s.cassette}`.", ""]
    if s.over_budget:
        out += [f"**Over budget**: {usd(s.spent_usd)} spent, the budget is ${s.budget_usd:g}.", ""]
    listed = miss_lines(misses)
    if listed:
        out += ["**Requests not in the cassette** (record them with `greyfox ci --mode record-missing`):", "",
                "```text", *listed, "```", ""]
    return "\n".join(out)
