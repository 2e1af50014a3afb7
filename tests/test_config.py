"""Config loading: TOML plus environment, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from xiaoai_bridge.config import (
    DEFAULT_FIRST_CLAUSE_CHARS,
    DEFAULT_QUESTION_TOPIC,
    DEFAULT_REPLY_TOPIC,
    DEFAULT_STRIP_REGEX,
    OPENAI_BASE_URL,
    load_settings,
)
from xiaoai_bridge.errors import ConfigError
from xiaoai_bridge.pipeline import chunker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "XIAOAI_BRIDGE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_match_the_seed(tmp_path: Path) -> None:
    settings = load_settings(None)
    assert settings.mqtt.question_topic == DEFAULT_QUESTION_TOPIC == "/xiaomi/chatgpt"
    assert settings.mqtt.reply_topic == DEFAULT_REPLY_TOPIC == "/xiaomi/reply"
    assert settings.trigger.strip_regex == DEFAULT_STRIP_REGEX == "(.*机器人)"
    assert settings.trigger.mode == "all"
    assert settings.mqtt.embedded
    assert settings.llm.base_url == OPENAI_BASE_URL
    assert settings.llm.api_key is None
    assert settings.data_dir == tmp_path / "xdg" / "xiaoai-bridge"


def test_example_config_loads_and_uses_defaults() -> None:
    settings = load_settings(REPO / "xiaoai-bridge.example.toml")
    assert settings.mqtt.question_topic == "/xiaomi/chatgpt"
    assert settings.memory.forget_commands == ("清空对话", "忘掉之前的对话")
    assert settings.speech.first_clause_chars == DEFAULT_FIRST_CLAUSE_CHARS
    assert DEFAULT_FIRST_CLAUSE_CHARS == chunker.DEFAULT_FIRST_CLAUSE_CHARS


def test_environment_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[llm]\nmodel = "from-file"\ntimeout_s = 7\n')
    monkeypatch.setenv("XIAOAI_BRIDGE_LLM__MODEL", "from-env")
    settings = load_settings(path)
    assert settings.llm.model == "from-env"
    assert settings.llm.timeout_s == 7


def test_openai_env_vars_fill_in_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1/")
    settings = load_settings(None)
    assert settings.llm.api_key is not None
    assert settings.llm.api_key.get_secret_value() == "sk-from-openai-env"
    assert settings.llm.base_url == "http://127.0.0.1:11434/v1"


def test_openai_key_never_overrides_a_configured_provider_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[llm]\nbase_url = "https://api.deepseek.com/v1"\napi_key = "sk-ds"\n')
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-global")
    settings = load_settings(path)
    assert settings.llm.api_key is not None
    assert settings.llm.api_key.get_secret_value() == "sk-ds"


def test_mqtt_url_is_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nurl = "mqtts://bob:p%40ss@broker.lan"\n')
    endpoint = load_settings(path).mqtt.endpoint()
    assert (endpoint.host, endpoint.port, endpoint.tls, endpoint.username) == (
        "broker.lan",
        8883,
        True,
        "bob",
    )
    assert endpoint.password is not None
    assert endpoint.password.get_secret_value() == "p@ss"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[mqtt]\nurl = "http://x"\n', "mqtt.url: must start with mqtt://"),
        ("[llm]\ntimeout_s = -1\n", "llm.timeout_s:"),
        ('[trigger]\nstrip_regex = "(unclosed"\n', "trigger.strip_regex: is not a valid regular"),
        ('[trigger]\nmode = "sometimes"\n', "trigger.mode:"),
        ('[llm]\nmodle = "x"\n', "llm.modle: unknown key"),
        ('[mqtt]\nquestion_topic = "a/#"\n', "mqtt.question_topic: must be a non-empty topic"),
        ("[speech]\nfirst_clause_chars = -1\n", "speech.first_clause_chars:"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert expected in str(caught.value)
    assert "XIAOAI_BRIDGE_" in str(caught.value)


def test_broken_toml_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[mqtt\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_a_config_file_with_secrets_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, '[llm]\napi_key = "sk-secret-value"\n')
    path.chmod(0o644)
    load_settings(path)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"{path} holds secrets and is readable by other users: chmod 600 {path}"]
    assert "sk-secret-value" not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    load_settings(path)
    write(tmp_path, '[llm]\nmodel = "x"\n').chmod(0o644)  # no secret: nothing to say
    load_settings(tmp_path / "config.toml")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("token", ["", "x", "short-token-15ch"[:15], " " * 20])
def test_a_weak_http_token_beyond_loopback_is_refused(tmp_path: Path, token: str) -> None:
    text = f'[http]\nhost = "0.0.0.0"\ntoken = "{token}"\n'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    message = str(caught.value)
    assert "http.token: too short" in message
    assert "at least 16 characters" in message
    assert "secrets.token_urlsafe(24)" in message
    assert token.strip() == "" or token not in message.replace("http.token", "")
    strong = load_settings(
        write(tmp_path, '[http]\nhost = "0.0.0.0"\ntoken = "' + "k" * 16 + '"\n')
    )
    assert strong.http.token is not None
    # On loopback a token is an extra, not the only lock: any length is the user's choice.
    assert load_settings(write(tmp_path, '[http]\ntoken = "x"\n')).http.token is not None


def test_allowed_hosts_are_names(tmp_path: Path) -> None:
    loaded = load_settings(write(tmp_path, '[http]\nallowed_hosts = ["Bridge.Home.Arpa.", "*"]\n'))
    assert loaded.http.allowed_hosts == ("bridge.home.arpa", "*")
    for bad in ("http://bridge.lan", "bridge.lan:8099", "a b"):
        with pytest.raises(ConfigError, match=r"http\.allowed_hosts.*not a host name"):
            load_settings(write(tmp_path, f'[http]\nallowed_hosts = ["{bad}"]\n'))


MCP_BOTH = '[[tools.mcp]]\nname = "x"\nurl = "http://127.0.0.1:1/mcp"\ncommand = "y"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[tools]\ntimezone = "Mars/Olympus"\n', "tools.timezone: unknown time zone"),
        ("[tools]\nmax_rounds = 0\n", "tools.max_rounds:"),
        ('[[tools.mcp]]\nname = "x"\n', "give either url or command"),
        (MCP_BOTH, "give either url or command"),
        ('[[tools.mcp]]\nname = "a b"\ncommand = "y"\n', "tools.mcp.0.name: use 1-24"),
        ('[[tools.mcp]]\nname = "x"\nurl = "ftp://h/x"\n', "url must be http(s)"),
        ('[[tools.mcp]]\nname = "x"\ncommand = "y"\ntransport = "sse"\n', "sse needs a url"),
        (
            '[[tools.mcp]]\nname = "x"\ncommand = "y"\n[[tools.mcp]]\nname = "x"\ncommand = "z"\n',
            "each [[tools.mcp]] server needs its own name",
        ),
    ],
)
def test_tool_settings_are_checked(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert expected in str(caught.value)


def test_mcp_servers_resolve_their_transport_and_secrets_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        '[[tools.mcp]]\nname = "ha"\nurl = "http://127.0.0.1:8123/api/mcp"\ntoken = "t0ken"\n'
        '[[tools.mcp]]\nname = "old"\nurl = "http://127.0.0.1:9/sse"\ntransport = "sse"\n'
        '[[tools.mcp]]\nname = "local"\ncommand = "uvx"\nargs = ["server"]\n',
    )
    path.chmod(0o644)
    settings = load_settings(path)
    assert [s.kind for s in settings.tools.mcp] == ["streamable_http", "sse", "stdio"]
    assert "holds secrets" in caplog.text
    assert "t0ken" not in repr(settings)
