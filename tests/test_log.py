"""Secrets are masked in every log record, from the config model and learned at run time."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from xiaoai_bridge.config import Settings
from xiaoai_bridge.log import register_secret, register_secrets_of, secret_values

LLM_KEY = "sk-llm-key-5f1e9c0a"
HA_TOKEN = "eyJhbGciOiJIUzI1NiJ9.ha-token-77"
MQTT_PASSWORD = "mqtt p@ss/word:9"  # needs quoting inside the URL
HTTP_TOKEN = "http-token-0c3b8d2e"
XIAOMI_PASSWORD = "correct horse battery staple"
PASS_TOKEN = "V1:pass-token/ab+cd=="
SECRETS = (LLM_KEY, HA_TOKEN, MQTT_PASSWORD, HTTP_TOKEN, XIAOMI_PASSWORD, PASS_TOKEN)


def every_secret_settings(tmp_path: Path) -> Settings:
    quoted = MQTT_PASSWORD.replace("@", "%40").replace("/", "%2F").replace(":", "%3A")
    return Settings.model_validate(
        {
            "data_dir": tmp_path,
            "mqtt": {"url": f"mqtt://bridge:{quoted}@127.0.0.1:1883"},
            "llm": {"api_key": LLM_KEY},
            "homeassistant": {
                "url": "http://127.0.0.1:8123",
                "token": HA_TOKEN,
                "speakers": {"sensor.xiaoai_conversation": "media_player.xiaoai"},
            },
            "http": {"token": HTTP_TOKEN},
            "xiaomi": {
                "account": "12345678",
                "password": XIAOMI_PASSWORD,
                "pass_token": PASS_TOKEN,
                "user_id": "12345678",
            },
        }
    )


@pytest.fixture
def library_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A library's logger with a handler of its own, not propagating to ours."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tests.a_library")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def fail(text: str) -> None:
    raise RuntimeError(text)


def log_everywhere(secret: str, library: logging.Logger) -> None:
    ours = logging.getLogger("xiaoai_bridge.tests")
    for logger in (ours, library):
        logger.debug("with args: %s", secret)
        logger.debug("inline: " + secret)  # noqa: G003  # as careless code would
        logger.info("in a dict: %r", {"Authorization": f"Bearer {secret}"})
        try:
            fail(f"request failed: {secret}")
        except RuntimeError:
            logger.exception("failed")
        logger.warning("in a URL: %s", f"http://x/?token={secret}")


def assert_masked(
    secrets: tuple[str, ...], caplog: pytest.LogCaptureFixture, library_out: str
) -> None:
    records = caplog.records
    assert records
    texts = [caplog.text, library_out]
    texts += [r.getMessage() for r in records] + [r.exc_text or "" for r in records]
    for secret in secrets:
        for text in texts:
            assert secret not in text
    assert "***" in library_out


def test_every_secret_of_the_settings_is_masked_at_every_level_and_handler(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    library_log: tuple[logging.Logger, io.StringIO],
) -> None:
    library, out = library_log
    register_secrets_of(every_secret_settings(tmp_path))
    caplog.set_level(logging.DEBUG)
    for secret in SECRETS:
        log_everywhere(secret, library)
    assert_masked(SECRETS, caplog, out.getvalue())


def test_a_secret_learned_at_run_time_is_masked_from_then_on(
    caplog: pytest.LogCaptureFixture, library_log: tuple[logging.Logger, io.StringIO]
) -> None:
    library, out = library_log
    token = "serviceToken-learned-3a9f/+="
    register_secret(token)
    caplog.set_level(logging.DEBUG)
    log_everywhere(token, library)
    log_everywhere(token.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D"), library)
    assert_masked((token, "serviceToken-learned-3a9f%2F"), caplog, out.getvalue())


def test_the_walk_finds_secrets_in_nested_models_lists_and_dicts() -> None:
    class Inner(BaseModel):
        token: SecretStr
        name: str = "not a secret"

    class Outer(BaseModel):
        inner: Inner
        many: list[Inner]
        by_name: dict[str, Inner]
        broker: str = "mqtt://u:url-password@127.0.0.1"

    model = Outer(
        inner=Inner(token=SecretStr("one")),
        many=[Inner(token=SecretStr("two"))],
        by_name={"x": Inner(token=SecretStr("three"))},
    )
    assert set(secret_values(model)) == {"one", "two", "three", "url-password"}


def test_the_walk_finds_every_secret_field_of_the_settings(tmp_path: Path) -> None:
    found = set(secret_values(every_secret_settings(tmp_path)))
    assert found >= set(SECRETS)
