"""Config checks for Xiaomi mode speaking through an external TTS (`tts = "url"`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xiaoai_bridge.config import Settings, load_settings
from xiaoai_bridge.errors import ConfigError

GOOD = """
[xiaomi]
account = "13800000000"
tts = "url"
[xiaomi.tts_http]
url = "http://192.168.1.5:5000/tts?text={text}&voice={voice}"
voice = "xiaoxiao"
[http]
host = "0.0.0.0"
token = "page-token-4b8e1d07c2"
public_url = "http://192.168.1.5:8099/"
"""


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return load_settings(path)


def test_a_complete_url_tts_config_loads(tmp_path: Path) -> None:
    settings = load(tmp_path, GOOD)
    assert settings.http.public_url == "http://192.168.1.5:8099"
    assert settings.xiaomi.tts == "url"
    assert settings.xiaomi.tts_http.method == "GET"


@pytest.mark.parametrize(
    ("old", "new", "keys"),
    [
        ('public_url = "http://192.168.1.5:8099/"', "", ["http.public_url", "HTTP__PUBLIC_URL"]),
        ('host = "0.0.0.0"', 'host = "127.0.0.1"', ["http.host", "loopback"]),
        ("[http]", "[http]\nenabled = false", ["http.enabled"]),
        ('url = "http://192.168.1.5:5000/tts?text={text}&voice={voice}"', "", ["tts_http.url"]),
        ("/tts?text={text}&voice", "/tts?text={txt}&voice", ["tts_http.url", "{txt}"]),
        ("/tts?text={text}&voice={voice}", "/tts?voice={voice}", ["tts_http.url", "{text}"]),
        ("192.168.1.5:8099", "127.0.0.1:8099", ["http.public_url", "loopback"]),
        ("http://192.168.1.5:8099/", "ftp://nas/", ["http.public_url", "http(s)://"]),
    ],
)
def test_a_broken_url_tts_config_names_the_keys(
    tmp_path: Path, old: str, new: str, keys: list[str]
) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, GOOD.replace(old, new))
    for key in keys:
        assert key in str(caught.value)


def test_post_needs_no_text_placeholder_and_edge_needs_no_url(tmp_path: Path) -> None:
    post = GOOD.replace("/tts?text={text}&voice={voice}", '/tts"\nmethod = "POST')
    assert load(tmp_path, post).xiaomi.tts_http.method == "POST"
    edge = GOOD.replace(
        'url = "http://192.168.1.5:5000/tts?text={text}&voice={voice}"', 'engine = "edge"'
    )
    assert load(tmp_path, edge).xiaomi.tts_http.engine == "edge"


def test_other_tts_routes_need_no_public_url(tmp_path: Path) -> None:
    text = '[xiaomi]\naccount = "13800000000"\ntts = "mina"\n'
    assert load(tmp_path, text).http.public_url is None
