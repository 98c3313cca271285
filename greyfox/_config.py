# -*- test-case-name: tests.test_config -*-
"""Settings: command-line option > environment > TOML config file > default.

Everything here is pure: :func:`load_settings` takes the options, the
environment and the file reader as arguments, so it is tested without a
process, and a bad value raises :class:`ConfigError` naming the setting.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, Callable, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attr
import hyperlink


class ConfigError(Exception):
    """A setting is unusable; the message is one line that names it."""


MODES = ("record", "replay", "passthrough")


@attr.s(auto_attribs=True, frozen=True)
class Upstream:
    """A named OpenAI-compatible provider.  The key never appears in a repr."""

    name: str
    base_url: str
    api_key: str | None = attr.ib(default=None, repr=False)
    api_key_env: str | None = None
    #: Ask for ``stream_options.include_usage`` on streams (off for servers that reject it).
    stream_usage: bool = True
    #: The API it speaks: ``openai`` (chat completions and friends) or ``anthropic`` (Messages).
    api: str = "openai"

    @property
    def has_key(self) -> bool:
        return bool(self.api_key)


def _int(raw: Any) -> int:
    if isinstance(raw, bool) or isinstance(raw, float):
        raise ValueError("not a whole number")
    try:
        value = raw if isinstance(raw, int) else int(str(raw).strip())
    except ValueError:
        raise ValueError("not a whole number") from None
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("not a number")
    try:
        value = float(raw if isinstance(raw, (int, float)) else str(raw).strip())
    except ValueError:
        raise ValueError("not a number") from None
    if value != value or value < 0 or value == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return value


def _positive(parse: Callable[[Any], float]) -> Callable[[Any], float]:
    def check(raw: Any) -> float:
        value = parse(raw)
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    return check


def _mode(raw: Any) -> str:
    value = str(raw).strip().lower()
    if value not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}")
    return value


def _tz(raw: Any) -> str:
    value = str(raw).strip()
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("unknown time zone") from None
    return value


def _str(raw: Any) -> str:
    return str(raw)


def _endpoint(raw: Any) -> str:
    """A strports server description, checked for syntax without binding."""
    from twisted.internet import endpoints
    from twisted.internet.testing import MemoryReactor

    value = str(raw).strip()
    try:
        endpoints.serverFromString(MemoryReactor(), value)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a strports endpoint: {e}") from None
    return value


def _optional_str(raw: Any) -> str | None:
    value = str(raw)
    return value or None


@attr.s(auto_attribs=True, frozen=True)
class _Spec:
    name: str  # attribute and TOML key
    env: str
    parse: Callable[[Any], Any]
    default: Any
    help: str


# One row per setting of SPEC §1; command-line options are generated from it.
SPECS: tuple[_Spec, ...] = (
    _Spec("listen", "GREYFOX_LISTEN", _endpoint, "tcp:8080:interface=127.0.0.1", "listen endpoint (Twisted strports syntax)"),
    _Spec("db", "GREYFOX_DB", _str, "./data/greyfox.db", "SQLite database path (directory created)"),
    _Spec("mode", "GREYFOX_MODE", _mode, "record", "record | replay (cache only) | passthrough (no cache)"),
    _Spec("daily_tokens", "GREYFOX_DAILY_TOKENS", _int, 0, "per-user daily token limit, 0 = unlimited"),
    _Spec("daily_budget_usd", "GREYFOX_DAILY_BUDGET_USD", _float, 0.0, "global daily spend limit in USD, 0 = unlimited"),
    _Spec("user_rpm", "GREYFOX_USER_RPM", _int, 0, "per-user requests per minute, 0 = unlimited"),
    _Spec("user_tpm", "GREYFOX_USER_TPM", _int, 0, "per-user tokens per minute, 0 = unlimited"),
    _Spec("loop_max_repeats", "GREYFOX_LOOP_MAX_REPEATS", _int, 50, "runaway-loop breaker: repeats, 0 = off"),
    _Spec("loop_window", "GREYFOX_LOOP_WINDOW", _positive(_float), 600.0, "runaway-loop breaker: window in seconds"),
    _Spec("client_token", "GREYFOX_CLIENT_TOKEN", _optional_str, None, "bearer token clients must send"),
    _Spec("admin_token", "GREYFOX_ADMIN_TOKEN", _optional_str, None, "bearer token for /api/ and /metrics"),
    _Spec("cache_ttl", "GREYFOX_CACHE_TTL", _float, 0.0, "cache TTL in seconds, 0 = never expires"),
    _Spec("tz", "GREYFOX_TZ", _tz, "UTC", "time zone of the quota day boundary"),
    _Spec("cache_max_mb", "GREYFOX_CACHE_MAX_MB", _float, 1024.0, "cache size cap in MB (LRU eviction)"),
    _Spec("max_body_mb", "GREYFOX_MAX_BODY_MB", _positive(_float), 10.0, "request body limit in MiB"),
    _Spec("connect_timeout", "GREYFOX_CONNECT_TIMEOUT", _positive(_float), 10.0, "upstream connect timeout (s)"),
    _Spec("read_timeout", "GREYFOX_READ_TIMEOUT", _positive(_float), 600.0, "upstream response-headers timeout (s)"),
    _Spec("stream_idle_timeout", "GREYFOX_STREAM_IDLE_TIMEOUT", _positive(_float), 300.0, "upstream stream idle timeout (s)"),
    _Spec("default_max_tokens", "GREYFOX_DEFAULT_MAX_TOKENS", _int, 4096, "completion tokens assumed when a request sets no max_tokens"),
    _Spec("instance", "GREYFOX_INSTANCE", _optional_str, None, "this instance's name in the ledger (default: host name and port)"),
)

# Built-in upstreams: name -> (key env, base URL env, default base URL, API).
BUILTIN_UPSTREAMS: tuple[tuple[str, str, str, str, str], ...] = (
    ("openai", "OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1", "openai"),
    ("deepseek", "DEEPSEEK_API_KEY", "DEEPSEEK_BASE_URL", "https://api.deepseek.com/v1", "openai"),
    ("openrouter", "OPENROUTER_API_KEY", "OPENROUTER_BASE_URL", "https://openrouter.ai/api/v1", "openai"),
    # The Anthropic SDK's base URL has no /v1: the API's paths start with it.
    ("anthropic", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "https://api.anthropic.com", "anthropic"),
)
APIS = ("openai", "anthropic")


@attr.s(auto_attribs=True, frozen=True)
class Settings:
    """Every setting GreyFox runs with, validated."""

    listen: str = "tcp:8080:interface=127.0.0.1"
    db: str = "./data/greyfox.db"
    config: str | None = None
    mode: str = "record"
    daily_tokens: int = 0
    daily_budget_usd: float = 0.0
    user_rpm: int = 0
    user_tpm: int = 0
    loop_max_repeats: int = 50
    loop_window: float = 600.0
    client_token: str | None = attr.ib(default=None, repr=False)
    admin_token: str | None = attr.ib(default=None, repr=False)
    cache_ttl: float = 0.0
    tz: str = "UTC"
    cache_max_mb: float = 1024.0
    max_body_mb: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    stream_idle_timeout: float = 300.0
    default_max_tokens: int = 4096
    instance: str | None = None
    upstreams: Mapping[str, Upstream] = attr.Factory(dict)
    default_upstream: str = "openai"
    prices: Mapping[str, Mapping[str, float]] = attr.Factory(dict)
    #: Per-user client tokens (``[users.NAME] token_env``): token -> user.
    user_tokens: Mapping[str, str] = attr.ib(factory=dict, repr=False)

    @property
    def tokens_required(self) -> bool:
        """Whether every /v1 request must bear a client token (GreyFox's or a user's)."""
        return self.client_token is not None or bool(self.user_tokens)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def exposure_warning(self) -> str | None:
        """The start-up warning for a port anyone may reach with no client token."""
        if is_loopback_endpoint(self.listen) or self.tokens_required:
            return None
        return (
            f"WARNING: listening on {self.listen} beyond loopback with no GREYFOX_CLIENT_TOKEN: "
            "anyone who can reach this port can spend your upstream keys."
        )


def is_loopback_endpoint(description: str) -> bool:
    """Whether a strports description only listens on a loopback interface.

    ``unix:`` sockets are local; TCP needs an explicit loopback ``interface=``
    (Twisted's default is every interface).
    """
    kind, _, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    for part in rest.split(":"):
        key, eq, value = part.partition("=")
        if eq and key.strip() == "interface":
            value = value.strip().strip("[]")
            return value in ("localhost", "::1") or value.startswith("127.")
    return False


def _read_toml(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def load_settings(
    options: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    read_config: Callable[[str], dict[str, Any]] = _read_toml,
) -> Settings:
    """Resolve every setting: option > environment > TOML file > default.

    :param options: command-line values by setting name (``None`` = not given).
    :param environ: the process environment.
    :raises ConfigError: a setting is unusable; the message names it.
    """
    options = {k: v for k, v in (options or {}).items() if v is not None}
    environ = os.environ if environ is None else environ

    config_path = options.get("config") or environ.get("GREYFOX_CONFIG") or None
    file_values: dict[str, Any] = {}
    if config_path:
        try:
            file_values = read_config(config_path)
        except OSError as e:
            raise ConfigError(f"GREYFOX_CONFIG: cannot read {config_path!r}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"GREYFOX_CONFIG: {config_path!r} is not valid TOML: {e}") from None

    values: dict[str, Any] = {"config": config_path}
    for spec in SPECS:
        if spec.name in options:
            raw, where = options[spec.name], f"--{spec.name.replace('_', '-')}"
        elif spec.env in environ:
            raw, where = environ[spec.env], spec.env
        elif spec.name in file_values:
            raw, where = file_values[spec.name], f"{spec.name} in {config_path}"
        else:
            values[spec.name] = spec.default
            continue
        try:
            values[spec.name] = spec.parse(raw)
        except (ValueError, TypeError) as e:
            shown = "<hidden>" if spec.name.endswith("token") else repr(raw)
            raise ConfigError(f"{where}: {shown} is not valid ({e})") from None

    values["upstreams"] = _upstreams(file_values, environ, config_path)
    default_upstream = str(file_values.get("default_upstream", "openai"))
    if default_upstream not in values["upstreams"]:
        raise ConfigError(f"default_upstream in {config_path}: no upstream named {default_upstream!r}")
    values["default_upstream"] = default_upstream
    values["prices"] = _prices(file_values.get("prices", {}), config_path)
    values["user_tokens"] = _user_tokens(file_values.get("users", {}), environ, config_path)
    return Settings(**values)


def _user_tokens(table: Any, environ: Mapping[str, str], path: str | None) -> dict[str, str]:
    """``[users.NAME] token_env = "VAR"``: the token in ``$VAR`` is ``NAME``'s (tokens live in the environment only)."""
    if not isinstance(table, dict):
        raise ConfigError(f"users in {path}: must be a table of [users.NAME]")
    tokens: dict[str, str] = {}
    for name, row in table.items():
        where = f"users.{name}.token_env in {path}"
        env = row.get("token_env") if isinstance(row, dict) else None
        if not isinstance(env, str) or not env:
            raise ConfigError(f"{where}: must name the environment variable that holds the user's token")
        token = environ.get(env)
        if not token:
            raise ConfigError(f"{where}: {env} is not set")
        if token in tokens:
            raise ConfigError(f"{where}: {env} holds the same token as user {tokens[token]!r}")
        tokens[token] = str(name)
    return tokens


def _check_url(url: str, where: str) -> str:
    try:
        parsed = hyperlink.URL.from_text(url)
    except Exception:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{where}: {url!r} is not an http(s) URL")
    return parsed.to_uri().to_text().rstrip("/")  # ASCII on the wire (IDNA host, %-escaped path)


def _upstreams(file_values: Mapping[str, Any], environ: Mapping[str, str], path: str | None) -> dict[str, Upstream]:
    declared = file_values.get("upstreams", {})
    if not isinstance(declared, dict):
        raise ConfigError(f"upstreams in {path}: must be a table of [upstreams.NAME]")
    result: dict[str, Upstream] = {}
    for name, key_env, url_env, default_url, api in BUILTIN_UPSTREAMS:
        table = declared.get(name, {})
        key_env = str(table.get("api_key_env", key_env))
        if url_env in environ:
            url = _check_url(environ[url_env], url_env)
        else:
            url = _check_url(str(table.get("base_url", default_url)), f"upstreams.{name}.base_url in {path}")
        result[name] = Upstream(name, url, environ.get(key_env) or None, key_env, _flag(table, "stream_usage", name, path), api)
    for name, table in declared.items():
        if name in result:
            continue
        where = f"upstreams.{name} in {path}"
        if not isinstance(table, dict) or "base_url" not in table:
            raise ConfigError(f"{where}: needs base_url")
        if "/" in name or not name:
            raise ConfigError(f"{where}: an upstream name cannot contain '/'")
        url = _check_url(str(table["base_url"]), f"{where} base_url")
        key_env = table.get("api_key_env")
        key = environ.get(str(key_env)) if key_env else None
        api = table.get("api", "openai")
        if api not in APIS:
            raise ConfigError(f"{where}: api must be one of {', '.join(APIS)}")
        result[name] = Upstream(
            name, url, key or None, str(key_env) if key_env else None, _flag(table, "stream_usage", name, path), api
        )
    return result


def _flag(table: Mapping[str, Any], key: str, name: str, path: str | None) -> bool:
    value = table.get(key, True)
    if not isinstance(value, bool):
        raise ConfigError(f"upstreams.{name}.{key} in {path}: must be true or false")
    return value


def _prices(table: Any, path: str | None) -> dict[str, dict[str, float]]:
    if not isinstance(table, dict):
        raise ConfigError(f"prices in {path}: must be a table of [prices.\"MODEL\"]")
    result = {}
    for model, row in table.items():
        where = f"prices.{model} in {path}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: must be a table with input, output, cached_input, cache_write")
        parsed = {}
        for field in ("input", "output", "cached_input", "cache_write"):
            if field in row:
                try:
                    parsed[field] = _float(row[field])
                except (ValueError, TypeError):
                    raise ConfigError(f"{where}: {field} must be a number >= 0") from None
        if "input" not in parsed or "output" not in parsed:
            raise ConfigError(f"{where}: needs input and output (USD per 1M tokens)")
        result[model] = parsed
    return result
