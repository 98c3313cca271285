"""GreyFox with its ledger switched off, for the benchmark's ledger-cost figure only.

Never a user setting: every request is recorded in normal runs.
"""

import sys

from twisted.scripts.twistd import run

from greyfox import _store

_store.Ledger.record = lambda self, row: None  # measured: what recording costs

sys.argv = ["twistd", "-n", "--pidfile=", "--logfile=/dev/null", "greyfox"]
run()
