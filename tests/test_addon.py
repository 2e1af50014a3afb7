"""The Home Assistant add-on and the container image produce configs the service accepts."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from aiohttp import web
from pydantic import BaseModel

from xiaoai_bridge.config import DEFAULT_HTTP_PORT, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "addon" / "xiaoai-bridge"
SUPERVISOR_TOKEN = "supervisor-token-0123456789"
# GET http://supervisor/services/mqtt with the Mosquitto add-on installed.
MQTT_SERVICE = {
    "addon": "core_mosquitto",
    "host": "core-mosquitto",
    "port": 1883,
    "ssl": False,
    "protocol": "3.1.1",
    "username": "addons",
    "password": "p@ss:w/rd",
}


def _load_entry_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("xiaoai_bridge_addon_run", ADDON / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load_entry_script()


def addon_config() -> dict[str, Any]:
    data = yaml.safe_load((ADDON / "config.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def write_options(tmp_path: Path, options: Mapping[str, Any]) -> Path:
    """options.json as the Supervisor writes it: the defaults merged with the user's values."""
    path = tmp_path / "options.json"
    merged = addon_config()["options"] | dict(options)
    path.write_text(json.dumps(merged, ensure_ascii=False), encoding="utf-8")
    return path


def prepare(tmp_path: Path, options: Mapping[str, Any], **environ: str) -> Settings:
    config_path = tmp_path / "data" / "xiaoai-bridge.toml"
    written = run.prepare(write_options(tmp_path, options), config_path, environ)
    assert written == config_path
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    return load_settings(config_path)


def test_full_options_and_supervisor_broker_make_a_valid_config(tmp_path: Path) -> None:
    prompt = '你是"小爱"的大脑。\n回答要短\\口语化。\t😀'
    options = addon_config()["options"] | {
        "llm_base_url": "https://api.deepseek.com/v1",
        "llm_api_key": "sk-addon-0123456789",
        "llm_model": "deepseek-chat",
        "llm_system_prompt": prompt,
        "trigger_keywords": ["小助手", "请问"],
        "speakers": [
            {"sensor": "sensor.xiaomi_lx06_dea6_conversation"},
            {
                "sensor": "sensor.xiaomi_l05c_1234_conversation",
                "media_player": "media_player.xiaomi_l05c_1234_play_control",
            },
        ],
        "acknowledgement": "让我想想",
        "memory_max_turns": 4,
        "mqtt_mode": True,
        "question_topic": "xiaoai/heard",
        "http_token": "page-token-abcdef",
        "log_level": "debug",
    }
    config = run.build_config(options, mqtt_service=MQTT_SERVICE, supervisor_token=SUPERVISOR_TOKEN)
    path = tmp_path / "xiaoai-bridge.toml"
    run.write_private(path, run.to_toml(config))
    settings = load_settings(path)

    assert settings.data_dir == Path("/data")
    assert settings.log_level == "DEBUG"
    assert settings.llm.base_url == "https://api.deepseek.com/v1"
    assert settings.llm.model == "deepseek-chat"
    assert settings.llm.api_key is not None
    assert settings.llm.api_key.get_secret_value() == "sk-addon-0123456789"
    assert settings.llm.system_prompt == prompt
    assert settings.memory.max_turns == 4
    ha = settings.homeassistant
    assert ha.url == "http://supervisor/core"
    assert ha.token is not None
    assert ha.token.get_secret_value() == SUPERVISOR_TOKEN
    assert ha.speakers == {
        "sensor.xiaomi_lx06_dea6_conversation": "",
        "sensor.xiaomi_l05c_1234_conversation": "media_player.xiaomi_l05c_1234_play_control",
    }
    assert ha.acknowledgement == "让我想想"
    assert ha.trigger.mode == "keyword"
    assert ha.trigger.keywords == ("小助手", "请问")
    assert re.sub(ha.trigger.strip_regex, "", "小爱同学小助手请问今天天气") == "今天天气"
    assert settings.mqtt_enabled
    assert settings.mqtt.question_topic == "xiaoai/heard"
    endpoint = settings.mqtt.endpoint()
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("core-mosquitto", 1883, False)
    assert endpoint.username == "addons"
    assert endpoint.password is not None
    assert endpoint.password.get_secret_value() == "p@ss:w/rd"
    assert settings.http.host == "0.0.0.0"  # noqa: S104
    assert settings.http.token is not None
    assert settings.http.token.get_secret_value() == "page-token-abcdef"
    # Opened as http://homeassistant.local:8099/ or by IP: the token guards it, not the name.
    assert settings.http.allowed_hosts == ("*",)


def test_tool_options_become_the_tools_section(tmp_path: Path) -> None:
    options = {
        "tools_timezone": "Asia/Shanghai",
        "tools_mcp": [
            {"name": "ha", "url": "http://supervisor/core/api/mcp", "token": "mcp-t0ken"},
            {"name": "search", "url": "http://192.168.1.5:8000/mcp"},
        ],
    }
    settings = prepare(tmp_path, options, SUPERVISOR_TOKEN=SUPERVISOR_TOKEN)
    tools = settings.tools
    assert (tools.enabled, tools.timezone) == (True, "Asia/Shanghai")
    assert [(s.name, s.url, s.kind) for s in tools.mcp] == [
        ("ha", "http://supervisor/core/api/mcp", "streamable_http"),
        ("search", "http://192.168.1.5:8000/mcp", "streamable_http"),
    ]
    assert tools.mcp[0].token is not None
    assert tools.mcp[0].token.get_secret_value() == "mcp-t0ken"
    assert tools.mcp[1].token is None
    off = prepare(tmp_path, {"tools_enabled": False}, SUPERVISOR_TOKEN=SUPERVISOR_TOKEN)
    assert (off.tools.enabled, off.tools.mcp) == (False, ())


def test_default_options_make_home_assistant_mode_on_loopback_http(tmp_path: Path) -> None:
    settings = prepare(tmp_path, {}, SUPERVISOR_TOKEN=SUPERVISOR_TOKEN)
    assert settings.homeassistant.enabled
    assert settings.homeassistant.speakers is None  # discover every conversation sensor
    assert not settings.mqtt_enabled
    assert settings.llm.api_key is None  # "" means unset, not an empty key
    assert settings.http.host == "127.0.0.1"
    assert settings.http.token is None
    assert settings.homeassistant.speak_service == "xiaomi_miot.intelligent_speaker"


def test_config_file_is_private_even_when_it_existed_wider(tmp_path: Path) -> None:
    config_path = tmp_path / "data" / "xiaoai-bridge.toml"
    config_path.parent.mkdir()
    config_path.write_text("# old\n")
    config_path.chmod(0o644)
    run.prepare(
        write_options(tmp_path, {"llm_api_key": "sk-secret-key"}),
        config_path,
        {"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN},
    )
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert "sk-secret-key" in config_path.read_text()


def test_mqtt_mode_with_an_explicit_broker_needs_no_supervisor(tmp_path: Path) -> None:
    settings = prepare(
        tmp_path,
        {
            "homeassistant_mode": False,
            "mqtt_mode": True,
            "mqtt_url": "mqtts://user@broker.lan:8883",
        },
    )
    assert not settings.homeassistant.enabled
    endpoint = settings.mqtt.endpoint()
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("broker.lan", 8883, True)
    assert (settings.mqtt.question_topic, settings.mqtt.reply_topic) == (
        "/xiaomi/chatgpt",
        "/xiaomi/reply",
    )


@pytest.mark.parametrize(
    ("options", "environ", "message"),
    [
        ({}, {}, "homeassistant_api"),
        ({"homeassistant_mode": False, "mqtt_mode": True}, {}, "Mosquitto"),
        ({"homeassistant_mode": False}, {}, "nothing is heard"),
    ],
)
def test_options_that_cannot_work_say_what_to_change(
    tmp_path: Path, options: dict[str, Any], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(run.AddonError, match=message):
        run.prepare(write_options(tmp_path, options), tmp_path / "out.toml", environ)
    assert not (tmp_path / "out.toml").exists()


def test_missing_options_file_is_explained(tmp_path: Path) -> None:
    with pytest.raises(run.AddonError, match="add-on"):
        run.prepare(tmp_path / "nope.json", tmp_path / "out.toml", {})


def _model_field(model: type[BaseModel], dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for name in parents:
        field = model.model_fields.get(name)
        if field is None or not isinstance(field.annotation, type):
            return False
        if not issubclass(field.annotation, BaseModel):
            return False
        model = field.annotation
    return last in model.model_fields


def test_every_option_has_a_schema_entry_and_a_real_config_key() -> None:
    config = addon_config()
    options, schema = config["options"], config["schema"]
    assert set(options) <= set(schema)
    required = {k for k, v in schema.items() if not (isinstance(v, str) and v.endswith("?"))}
    assert required <= set(options), "a required option needs a default"
    assert set(schema) == set(run.OPTION_KEYS)
    for option, key in run.OPTION_KEYS.items():
        assert _model_field(Settings, key), f"{option} -> {key} is not a config key"


def test_addon_metadata_matches_the_project() -> None:
    config = addon_config()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert config["version"] == project["version"]
    assert re.fullmatch(r"[a-z0-9_]+", config["slug"])
    assert set(config["arch"]) <= {"aarch64", "amd64", "armv7", "armhf", "i386"}
    assert "mqtt:want" in config["services"]
    assert config["homeassistant_api"] is True
    assert f"{DEFAULT_HTTP_PORT}/tcp" in config["ports"]
    # The Supervisor builds the folder: build.yaml names a base for each architecture offered,
    # and the Dockerfile installs the wheel of the version the Supervisor passes.
    build = yaml.safe_load((ADDON / "build.yaml").read_text())
    assert set(build["build_from"]) == set(config["arch"])
    dockerfile = (ADDON / "Dockerfile").read_text()
    assert "xiaoai_bridge-${BUILD_VERSION}-py3-none-any.whl" in dockerfile
    assert "FROM ${BUILD_FROM}" in dockerfile
    repository = yaml.safe_load((ROOT / "repository.yaml").read_text())
    assert repository["name"]
    assert repository["maintainer"]


def test_addon_folder_carries_the_wheel_of_its_version() -> None:
    """The Supervisor builds the folder alone: the release's wheel must be in it."""
    version = addon_config()["version"]
    wheels = sorted(p.name for p in ADDON.glob("*.whl"))
    assert wheels == [f"xiaoai_bridge-{version}-py3-none-any.whl"]
    with zipfile.ZipFile(ADDON / wheels[0]) as wheel:
        metadata = wheel.read(f"xiaoai_bridge-{version}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"xiaoai_bridge-{version}.dist-info/entry_points.txt").decode()
    assert f"\nVersion: {version}\n" in metadata
    assert "xiaoai-bridge = xiaoai_bridge.cli:main" in entry_points


@pytest.fixture
async def supervisor() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback stand-in for the Supervisor's /services/mqtt; yields (url, auth headers)."""
    seen: list[str] = []
    provided = {"yes": True}

    async def services_mqtt(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if not provided["yes"]:
            return web.json_response(
                {"result": "error", "message": "No mqtt service available"}, status=400
            )
        return web.json_response({"result": "ok", "data": MQTT_SERVICE})

    async def toggle(request: web.Request) -> web.Response:
        provided["yes"] = False
        return web.Response()

    app = web.Application()
    app.router.add_get("/services/mqtt", services_mqtt)
    app.router.add_post("/test/unprovide", toggle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_broker_comes_from_the_supervisor_service_api(
    tmp_path: Path, supervisor: tuple[str, list[str]]
) -> None:
    url, seen = supervisor
    options_path = write_options(tmp_path, {"mqtt_mode": True})
    config_path = tmp_path / "xiaoai-bridge.toml"
    environ = {"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN, "SUPERVISOR_URL": url}
    await asyncio.to_thread(run.prepare, options_path, config_path, environ)
    assert seen == [f"Bearer {SUPERVISOR_TOKEN}"]
    endpoint = load_settings(config_path).mqtt.endpoint()
    assert (endpoint.host, endpoint.username) == ("core-mosquitto", "addons")

    await asyncio.to_thread(_post, f"{url}/test/unprovide")
    assert await asyncio.to_thread(run.fetch_mqtt_service, SUPERVISOR_TOKEN, url) is None


def _post(url: str) -> None:
    request = urllib.request.Request(url, method="POST")  # noqa: S310 - loopback test server
    with urllib.request.urlopen(request, timeout=5):  # noqa: S310
        pass


# -- the container image ------------------------------------------------------------------------


def _dockerfile_instruction(name: str) -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    assert found, name
    return found[-1].removeprefix(f"{name} ")


def _image_command(environ: dict[str, str]) -> dict[str, str]:
    """Run the image's CMD with `env` in place of the bridge; the environment it would get."""
    command = json.loads(_dockerfile_instruction("CMD"))
    assert command[:2] == ["sh", "-c"]
    assert command[2].endswith("exec xiaoai-bridge run")
    script = command[2].removesuffix("xiaoai-bridge run") + "env"
    sh = shutil.which("sh")
    assert sh is not None
    result = subprocess.run(  # noqa: S603 - our own script, no shell injection
        [sh, "-c", script], env=environ, capture_output=True, text=True, check=True
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_image_runs_from_environment_alone_when_no_config_file_is_mounted(tmp_path: Path) -> None:
    missing = str(tmp_path / "config" / "xiaoai-bridge.toml")
    environ = _image_command({"PATH": os.environ["PATH"], "XIAOAI_BRIDGE_CONFIG": missing})
    assert "XIAOAI_BRIDGE_CONFIG" not in environ
    present = tmp_path / "present.toml"
    present.write_text("")
    environ = _image_command({"PATH": os.environ["PATH"], "XIAOAI_BRIDGE_CONFIG": str(present)})
    assert environ["XIAOAI_BRIDGE_CONFIG"] == str(present)


def test_image_listens_beyond_loopback_only_with_a_token() -> None:
    base = {"PATH": os.environ["PATH"]}
    assert "XIAOAI_BRIDGE_HTTP__HOST" not in _image_command(base)
    with_token = _image_command(base | {"XIAOAI_BRIDGE_HTTP__TOKEN": "t0ken"})
    assert with_token["XIAOAI_BRIDGE_HTTP__HOST"] == "0.0.0.0"  # noqa: S104
    chosen = base | {"XIAOAI_BRIDGE_HTTP__TOKEN": "t0ken", "XIAOAI_BRIDGE_HTTP__HOST": "::"}
    assert _image_command(chosen)["XIAOAI_BRIDGE_HTTP__HOST"] == "::"


def test_image_layout_matches_the_service_defaults() -> None:
    env = _dockerfile_instruction("ENV")
    assert "XIAOAI_BRIDGE_DATA_DIR=/data" in env
    assert "XIAOAI_BRIDGE_CONFIG=/config/xiaoai-bridge.toml" in env
    assert json.loads(_dockerfile_instruction("VOLUME")) == ["/config", "/data"]
    assert _dockerfile_instruction("USER") not in ("root", "0")
    healthcheck = _dockerfile_instruction("HEALTHCHECK")
    assert f"'{DEFAULT_HTTP_PORT}'" in healthcheck
    assert "/healthz" in healthcheck
    assert _dockerfile_instruction("EXPOSE") == str(DEFAULT_HTTP_PORT)


@pytest.fixture
async def healthz() -> AsyncIterator[tuple[int, dict[str, int]]]:
    """A loopback /healthz whose status the test sets; yields (port, {"status": ...})."""
    answer = {"status": 200}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=answer["status"])

    app = web.Application()
    app.router.add_get("/healthz", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], answer
    finally:
        await runner.cleanup()


async def test_image_healthcheck_follows_healthz(healthz: tuple[int, dict[str, int]]) -> None:
    port, answer = healthz
    words = _dockerfile_instruction("HEALTHCHECK").split()
    command = json.loads(" ".join(words[words.index("CMD") + 1 :]))
    assert command[:2] == ["python", "-c"]
    environ = {"PATH": os.environ["PATH"], "XIAOAI_BRIDGE_HTTP__PORT": str(port)}

    async def check() -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            command[2],
            env=environ,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()

    assert await check() == 0
    answer["status"] = 503  # a required adapter is down
    assert await check() != 0
    # The add-on's image has the same check (its port is 8099 unless the environment says).
    assert _addon_healthcheck() == command


def _addon_healthcheck() -> list[str]:
    text = (ADDON / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    parsed = json.loads(line.split(" CMD ", 1)[1])
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]
