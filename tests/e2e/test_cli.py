"""The installed `xiaoai-bridge` command, run as a user would."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiomqtt
import pytest

from tests.conftest import API_KEY
from tests.e2e.test_homeassistant_tools import house
from tests.fakes.homeassistant_server import DEFAULT_TOKEN, FakeHomeAssistant
from tests.fakes.mcp_server import SCRIPT, TOKEN, McpHttpServer
from tests.fakes.mosquitto import Mosquitto, free_port
from tests.fakes.openai_server import FakeOpenAI, ScriptedCall, ToolRound
from xiaoai_bridge import __version__
from xiaoai_bridge.pipeline.pipeline import APOLOGIES

EXE = [sys.executable, "-m", "xiaoai_bridge.cli"]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "XIAOAI_BRIDGE_"))}
    env.update(
        {
            "HOME": str(tmp_path),
            "XDG_DATA_HOME": str(tmp_path / "data"),
            "XIAOAI_BRIDGE_HTTP__PORT": "0",  # a free port: never fight over 8099
        },
        **extra,
    )
    return env


async def run_cli(
    *args: str, env: dict[str, str], cwd: Path, wait_s: float = 30
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *EXE,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(wait_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def spawn_run(
    tmp_path: Path, config: Path, *, stderr: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """`xiaoai-bridge run --config <config>` as a user starts it, in a clean environment."""
    return await asyncio.create_subprocess_exec(
        *EXE,
        "run",
        "--config",
        str(config),
        env=clean_env(tmp_path),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
    )


def write_config(tmp_path: Path, broker_url: str, llm: FakeOpenAI) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'[mqtt]\nurl = "{broker_url}"\nclient_id = "cli-test"\n'
        f'[llm]\nbase_url = "{llm.base_url}"\napi_key = "{API_KEY}"\nmodel = "fake-model"\n'
        "max_retries = 0\n",
        encoding="utf-8",
    )
    path.chmod(0o600)  # it holds a key
    return path


async def test_version_and_help(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    code, out, _ = await run_cli("--version", env=env, cwd=tmp_path)
    assert (code, out.strip()) == (0, f"xiaoai-bridge {__version__}")
    for command in ("run", "ask", "check", "tools"):
        code, out, _ = await run_cli(command, "--help", env=env, cwd=tmp_path)
        assert code == 0
        assert "--config" in out


async def test_invalid_config_is_one_clear_line_and_exit_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[llm]\ntimeout_s = "soon"\n', encoding="utf-8")
    code, _, err = await run_cli(
        "check", "--config", str(bad), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 3
    assert err.startswith("error: invalid configuration")
    assert "llm.timeout_s" in err
    assert "Traceback" not in err


async def test_ask_prints_the_answer_sentence_by_sentence(
    tmp_path: Path, llm: FakeOpenAI, mosquitto: Mosquitto
) -> None:
    llm.answer = "**第一句**话。第二句话😀。"
    config = write_config(tmp_path, mosquitto.url, llm)
    code, out, _ = await run_cli(
        "ask", "小爱机器人你好", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 0
    assert out.splitlines() == ["第一句话。", "第二句话。"]
    assert llm.last_request.messages[-1]["content"] == "你好"


async def test_ask_goes_through_the_tools_too(
    tmp_path: Path, llm: FakeOpenAI, mosquitto: Mosquitto
) -> None:
    llm.script(ToolRound((ScriptedCall("call_now", "get_current_time", "{}"),)), "现在是晚上。")
    config = write_config(tmp_path, mosquitto.url, llm)
    code, out, err = await run_cli(
        "ask", "小爱机器人现在几点", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 0, err
    assert out.splitlines() == ["现在是晚上。"]
    asked, told = llm.requests
    assert "get_current_time" in {tool["function"]["name"] for tool in asked.tools}
    (result,) = told.tool_messages
    assert result["tool_call_id"] == "call_now"
    assert not str(result["content"]).startswith("error")


async def test_ask_answers_without_tools_when_home_assistant_is_away(
    tmp_path: Path, llm: FakeOpenAI, mosquitto: Mosquitto
) -> None:
    config = write_config(tmp_path, mosquitto.url, llm)
    with config.open("a", encoding="utf-8") as file:
        file.write(f'[homeassistant]\nurl = "http://127.0.0.1:{free_port()}"\ntoken = "t0ken"\n')
    code, out, err = await run_cli(
        "ask", "机器人你好", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 0, err
    assert out.splitlines() == ["你问的是：你好。", "这是第二句话。"]
    assert "homeassistant" in err  # its tools are absent, the answer is not
    assert "t0ken" not in err


async def test_ask_without_key_fails_with_the_spoken_explanation(tmp_path: Path) -> None:
    code, out, err = await run_cli("ask", "你好", env=clean_env(tmp_path), cwd=tmp_path)
    assert code == 1
    assert out.strip() == APOLOGIES["not_configured"]
    assert "not_configured" in err


async def test_check_reports_each_part(
    tmp_path: Path, llm: FakeOpenAI, mosquitto: Mosquitto
) -> None:
    config = write_config(tmp_path, mosquitto.url, llm)
    code, out, _ = await run_cli(
        "check", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 0, out
    lines = out.splitlines()
    assert {line.split()[0] for line in lines} == {"ok"}
    parts = [line.split()[1].rstrip(":") for line in lines]
    # The tool sources come between the modes and the LLM, however many are configured.
    assert [part for part in parts if part != "tools"] == ["config", "mqtt", "llm"]
    assert "tools" in parts
    await mosquitto.stop()
    llm.api_key = "another-key"  # the configured key is now rejected
    code, out, _ = await run_cli(
        "check", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 1
    assert "FAIL llm:" in out
    assert "FAIL mqtt:" in out
    assert API_KEY not in out


async def test_check_reports_each_mcp_server(
    tmp_path: Path, llm: FakeOpenAI, mosquitto: Mosquitto, mcp_http: McpHttpServer
) -> None:
    config = write_config(tmp_path, mosquitto.url, llm)
    with config.open("a", encoding="utf-8") as file:
        file.write(
            f'[[tools.mcp]]\nname = "local"\ncommand = "{sys.executable}"\n'
            f'args = ["{SCRIPT}", "stdio"]\nallow = ["echo", "add"]\n'
            f'[[tools.mcp]]\nname = "web"\nurl = "{mcp_http.url}"\ntoken = "{TOKEN}"\n'
        )
    code, out, _ = await run_cli(
        "check", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 1
    assert "ok   mcp local: 2 tools: echo, add" in out.splitlines()
    assert "FAIL mcp web: cannot connect" in out.splitlines()
    assert TOKEN not in out


async def test_run_with_no_config_starts_an_embedded_broker(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(tmp_path, XIAOAI_BRIDGE_MQTT__EMBEDDED_PORT=str(port))
    proc = await asyncio.create_subprocess_exec(
        *EXE,
        "run",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    client = aiomqtt.Client("127.0.0.1", port, identifier="newcomer")
                    async with client:
                        await client.subscribe("/xiaomi/reply", qos=1)
                        # The broker is up before the bridge has subscribed: a question sent
                        # in between is lost, so ask again until one is answered.
                        async with asyncio.timeout(2):
                            await client.publish("/xiaomi/chatgpt", "你好".encode(), qos=1)
                            async for message in client.messages:
                                assert isinstance(message.payload, bytes)
                                assert message.payload.decode() == APOLOGIES["not_configured"]
                                break
                    break
                except (aiomqtt.MqttError, TimeoutError):
                    await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
    assert proc.returncode == 0
    log = err.decode()
    assert "embedded MQTT broker listening" in log
    assert "OPENAI_API_KEY" in log


@pytest.mark.parametrize("secret_where", ["file", "env"])
async def test_run_never_logs_secrets(
    tmp_path: Path, llm: FakeOpenAI, mosquitto: Mosquitto, secret_where: str
) -> None:
    config = write_config(tmp_path, mosquitto.url, llm)
    env = clean_env(tmp_path, XIAOAI_BRIDGE_LOG_LEVEL="DEBUG")
    if secret_where == "env":
        config.write_text(config.read_text().replace(f'api_key = "{API_KEY}"\n', ""))
        env["OPENAI_API_KEY"] = API_KEY
    llm.api_key = "the-wrong-key"  # make the bridge log an auth failure mentioning the key
    proc = await asyncio.create_subprocess_exec(
        *EXE,
        "run",
        "--config",
        str(config),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20), aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe("/xiaomi/reply", qos=1)
            await client.subscribe("xiaoai-bridge/status", qos=1)
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if message.topic.matches("xiaoai-bridge/status"):
                    if message.payload == b"online":
                        await client.publish("/xiaomi/chatgpt", "你好".encode(), qos=1)
                    continue
                assert message.payload.decode() == APOLOGIES["auth"]
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
    log = err.decode()
    assert "auth" in log
    assert API_KEY not in log


async def test_a_killed_bridge_is_announced_offline_by_its_last_will(
    tmp_path: Path, llm: FakeOpenAI, mosquitto: Mosquitto
) -> None:
    proc = await spawn_run(tmp_path, write_config(tmp_path, mosquitto.url, llm))
    statuses: list[bytes] = []
    async with asyncio.timeout(20), aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe("xiaoai-bridge/status", qos=1)
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            statuses.append(message.payload)
            if message.payload == b"online":
                proc.kill()  # no goodbye: only the broker can tell the world
            elif statuses[-2:] == [b"online", b"offline"]:
                break
    await proc.wait()
    assert statuses[-2:] == [b"online", b"offline"]


async def test_run_with_no_config_uses_a_broker_already_on_the_default_port(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    env = clean_env(tmp_path, XIAOAI_BRIDGE_MQTT__EMBEDDED_PORT=str(mosquitto.port))
    proc = await asyncio.create_subprocess_exec(
        *EXE,
        "run",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20), aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe("xiaoai-bridge/status", qos=1)
            async for message in client.messages:
                if message.payload == b"online":
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
    assert proc.returncode == 0
    assert "already listens" in err.decode()


def write_tools_config(tmp_path: Path, tools: str, ha: FakeHomeAssistant | None = None) -> Path:
    """A config with `tools` as its [tools] section, and Home Assistant mode if `ha` is given."""
    path = tmp_path / "tools.toml"
    text = f"[tools]\n{tools}\n"
    if ha is not None:
        text += f'[homeassistant]\nurl = "{ha.url}"\ntoken = "{DEFAULT_TOKEN}"\n'
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


# Only the sources under test: no built-ins, no XiaoAi skills.
ONLY_CONFIGURED = "builtin = false\nxiaoai = false"


async def test_tools_lists_each_offered_tool_with_its_source_and_the_sources_state(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    house(ha)
    config = write_tools_config(tmp_path, ONLY_CONFIGURED, ha)
    env = clean_env(tmp_path)
    code, out, err = await run_cli("tools", "--config", str(config), env=env, cwd=tmp_path)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    listed = {line.split()[0]: line.split()[1] for line in lines[:2]}
    assert listed == {"ha_get_state": "homeassistant", "ha_control": "homeassistant"}
    assert lines[2:] == [
        "2 tools offered to the model",
        "",
        "ok   homeassistant: 2 entities exposed to Assist (2 tools)",
    ]
    # `check` reports the same sources, built and started by the same code.
    config.write_text(
        config.read_text(encoding="utf-8")
        + f'[llm]\nbase_url = "{llm.base_url}"\napi_key = "{API_KEY}"\nmodel = "fake-model"\n',
        encoding="utf-8",
    )
    code, out, _ = await run_cli("check", "--config", str(config), env=env, cwd=tmp_path)
    assert code == 0, out
    assert "ok   tools homeassistant: 2 entities exposed to Assist (2 tools)" in out.splitlines()


async def test_tools_says_why_a_source_offers_nothing_and_exits_1(
    tmp_path: Path, ha: FakeHomeAssistant
) -> None:
    house(ha)
    ha.admin = False  # exposure settings are admin-only in Home Assistant
    config = write_tools_config(tmp_path, ONLY_CONFIGURED, ha)
    code, out, _ = await run_cli(
        "tools", "--wait", "1", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 1
    first, blank, state = out.splitlines()
    assert (first, blank) == ("no tool is offered to the model right now", "")
    assert state.startswith("FAIL homeassistant: ")
    assert "admin" in state


async def test_tools_with_no_source_or_tools_off_says_so(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    none = write_tools_config(tmp_path, ONLY_CONFIGURED)
    code, out, _ = await run_cli("tools", "--config", str(none), env=env, cwd=tmp_path)
    assert (code, out) == (0, "no tool source is configured: the model is offered no tools\n")
    off = write_tools_config(tmp_path, "enabled = false")
    code, out, _ = await run_cli("tools", "--config", str(off), env=env, cwd=tmp_path)
    assert (code, out.strip()) == (
        0,
        "tool calling is off ([tools] enabled = false): the model is offered no tools",
    )


async def test_tools_with_a_rejected_home_assistant_token_is_one_error_line(
    tmp_path: Path, ha: FakeHomeAssistant
) -> None:
    config = write_tools_config(tmp_path, ONLY_CONFIGURED, ha)
    config.write_text(
        config.read_text(encoding="utf-8").replace(DEFAULT_TOKEN, "a-token-home-assistant-refuses"),
        encoding="utf-8",
    )
    code, out, err = await run_cli(
        "tools", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert (code, out) == (4, "")
    # The client logs it too (as `run` would); the command's own verdict is the last line.
    assert err.splitlines()[-1].startswith("error: Home Assistant at ws://")
    assert "rejected the access token" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert "a-token-home-assistant-refuses" not in err


async def test_tools_in_home_assistant_mode_by_default_offers_every_source(
    tmp_path: Path, ha: FakeHomeAssistant
) -> None:
    house(ha)
    config = write_tools_config(tmp_path, "", ha)
    code, out, _ = await run_cli(
        "tools", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 0, out
    listing, states = out.split("\n\n")
    *tools, count = listing.splitlines()
    by_source: dict[str, set[str]] = {}
    for line in tools:
        name, source, *description = line.split()
        assert description, line  # every tool says what it does
        by_source.setdefault(source, set()).add(name)
    assert by_source["homeassistant"] == {"ha_get_state", "ha_control"}
    assert by_source["xiaoai"] == {"xiaoai_execute"}
    assert "get_current_time" in by_source["builtin"]
    assert count == f"{len(tools)} tools offered to the model"
    assert [line.split()[:2] for line in states.splitlines()] == [
        ["ok", "homeassistant:"],
        ["ok", "xiaoai:"],
        ["ok", "builtin:"],
    ]


async def test_tools_asks_each_mcp_server_once_for_its_tools(
    tmp_path: Path, mcp_http: McpHttpServer
) -> None:
    config = write_tools_config(
        tmp_path,
        f"{ONLY_CONFIGURED}\n"
        f'[[tools.mcp]]\nname = "local"\ncommand = "{sys.executable}"\n'
        f'args = ["{SCRIPT}", "stdio"]\nallow = ["echo", "add"]\n'
        # Not started: nothing listens there.
        f'[[tools.mcp]]\nname = "web"\nurl = "{mcp_http.url}"\ntoken = "{TOKEN}"\n',
    )
    code, out, _ = await run_cli(
        "tools", "--wait", "5", "--config", str(config), env=clean_env(tmp_path), cwd=tmp_path
    )
    assert code == 1
    listing, states = out.split("\n\n")
    rows = [line.split(maxsplit=2) for line in listing.splitlines()[:-1]]
    assert [(name, source) for name, source, _ in rows] == [
        ("local__echo", "mcp:local"),
        ("local__add", "mcp:local"),
    ]
    assert listing.splitlines()[-1] == "2 tools offered to the model"
    local, web = states.splitlines()
    assert local == "ok   mcp:local: 2 tools (2 tools)"
    assert web.startswith("FAIL mcp:web: ")
    assert web.endswith("(0 tools)")
    assert TOKEN not in out
