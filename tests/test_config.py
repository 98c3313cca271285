"""Settings precedence and validation."""

import pytest

from greyfox._config import ConfigError, is_loopback_endpoint, load_settings


def files(content):
    return lambda path: content


def test_defaults():
    s = load_settings({}, {})
    assert s.listen == "tcp:8080:interface=127.0.0.1"
    assert s.db == "./data/greyfox.db"
    assert s.mode == "record"
    assert (s.connect_timeout, s.read_timeout, s.stream_idle_timeout) == (10, 600, 300)
    assert s.max_body_bytes == 10 * 1024 * 1024
    assert set(s.upstreams) == {"openai", "deepseek", "openrouter", "anthropic"}
    assert s.upstreams["openrouter"].base_url == "https://openrouter.ai/api/v1"
    assert (s.upstreams["anthropic"].base_url, s.upstreams["anthropic"].api) == ("https://api.anthropic.com", "anthropic")
    assert s.default_upstream == "openai"


def test_option_beats_env_beats_file_beats_default():
    read = files({"daily_tokens": 10, "user_rpm": 7, "mode": "replay"})
    s = load_settings({"daily_tokens": "30", "config": "x.toml"}, {"GREYFOX_DAILY_TOKENS": "20", "GREYFOX_USER_RPM": "8"}, read)
    assert (s.daily_tokens, s.user_rpm, s.mode, s.user_tpm) == (30, 8, "replay", 0)


def test_config_file_declares_upstreams_prices_and_default():
    read = files(
        {
            "default_upstream": "local",
            "upstreams": {"local": {"base_url": "http://127.0.0.1:11434/v1", "api_key_env": "LOCAL_KEY"}},
            "prices": {"my-model": {"input": 1, "output": 2}},
        }
    )
    s = load_settings({}, {"GREYFOX_CONFIG": "g.toml", "LOCAL_KEY": "sk-local-secret"}, read)
    assert s.default_upstream == "local"
    assert s.upstreams["local"].api_key == "sk-local-secret"
    assert "sk-local-secret" not in repr(s)
    assert s.prices["my-model"] == {"input": 1.0, "output": 2.0}


@pytest.mark.parametrize(
    "env, named",
    [
        ({"GREYFOX_DAILY_TOKENS": "lots"}, "GREYFOX_DAILY_TOKENS"),
        ({"GREYFOX_MODE": "record-all"}, "GREYFOX_MODE"),
        ({"GREYFOX_TZ": "Mars/Olympus"}, "GREYFOX_TZ"),
        ({"GREYFOX_READ_TIMEOUT": "0"}, "GREYFOX_READ_TIMEOUT"),
        ({"GREYFOX_DAILY_BUDGET_USD": "-1"}, "GREYFOX_DAILY_BUDGET_USD"),
        ({"OPENAI_BASE_URL": "ftp://x"}, "OPENAI_BASE_URL"),
    ],
)
def test_bad_setting_names_itself_in_one_line(env, named):
    with pytest.raises(ConfigError) as e:
        load_settings({}, env)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_unreadable_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="GREYFOX_CONFIG"):
        load_settings({"config": str(tmp_path / "missing.toml")}, {})
    bad = tmp_path / "bad.toml"
    bad.write_text("mode = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"config": str(bad)}, {})
    with pytest.raises(ConfigError, match="default_upstream"):
        load_settings({}, {"GREYFOX_CONFIG": "x"}, files({"default_upstream": "nope"}))


def test_loopback_detection():
    assert is_loopback_endpoint("tcp:8080:interface=127.0.0.1")
    assert is_loopback_endpoint("unix:/tmp/gf.sock")
    assert not is_loopback_endpoint("tcp:8080")
    assert not is_loopback_endpoint("tcp:8080:interface=0.0.0.0")


def test_exposed_port_without_client_token_warns():
    assert load_settings({"listen": "tcp:8080:interface=0.0.0.0"}, {}).exposure_warning().startswith("WARNING")
    assert load_settings({"listen": "tcp:8080"}, {}).exposure_warning() is not None
    assert load_settings({"listen": "tcp:8080"}, {"GREYFOX_CLIENT_TOKEN": "t"}).exposure_warning() is None
    assert load_settings({}, {}).exposure_warning() is None


def test_per_user_tokens_come_from_the_environment_the_config_names():
    users = {"users": {"alice": {"token_env": "ALICE_TOKEN"}, "bob": {"token_env": "BOB_TOKEN"}}}
    settings = load_settings({"config": "x.toml"}, {"ALICE_TOKEN": "tok-a", "BOB_TOKEN": "tok-b"}, lambda path: users)
    assert settings.user_tokens == {"tok-a": "alice", "tok-b": "bob"} and settings.tokens_required
    assert "tok-a" not in repr(settings)
    with pytest.raises(ConfigError, match="users.bob.token_env in x.toml: BOB_TOKEN is not set"):
        load_settings({"config": "x.toml"}, {"ALICE_TOKEN": "tok-a"}, lambda path: users)
    with pytest.raises(ConfigError, match="same token as user 'alice'"):
        load_settings({"config": "x.toml"}, {"ALICE_TOKEN": "tok-a", "BOB_TOKEN": "tok-a"}, lambda path: users)
    with pytest.raises(ConfigError, match="users.carol.token_env"):
        load_settings({"config": "x.toml"}, {}, lambda path: {"users": {"carol": {"token": "inline"}}})
