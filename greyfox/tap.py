# -*- test-case-name: tests.test_daemon -*-
"""``twistd greyfox``: command-line options and the service they build."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from ._config import SPECS, ConfigError, load_settings


class Options(usage.Options):
    """Every setting of SPEC §1 as ``--name``; unset options fall back to the environment."""

    optParameters = [["config", "c", None, "TOML config file (GREYFOX_CONFIG)"]] + [
        [spec.name.replace("_", "-"), None, None, f"{spec.help} ({spec.env}; default {spec.default!r})"]
        for spec in SPECS
    ]

    def settings_options(self) -> dict[str, Any]:
        return {key.replace("-", "_"): value for key, value in self.items()}


def makeService(options: Options) -> Any:
    from .service import GreyFoxService

    try:
        settings = load_settings(options.settings_options())
        return GreyFoxService(settings)
    except ConfigError as e:
        _stop(str(e))
    except OSError as e:
        _stop(f"GREYFOX_DB: cannot open the database: {e}")
    except Exception as e:  # sqlite3 errors, a newer schema, ...
        _stop(f"GREYFOX_DB: {e}")


def _stop(message: str) -> None:
    """One line, a non-zero exit, nothing half-started."""
    sys.stderr.write(f"greyfox: {message}\n")
    raise SystemExit(1)
