"""An MCP server's tools end to end: the model calls them, and the server dying mid-call."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import psutil

from tests.conftest import WAIT_S, Probe, make_settings
from tests.e2e.test_cli import spawn_run, write_config
from tests.fakes.mcp_server import SCRIPT, build_server
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI, ScriptedCall, ToolRound
from xiaoai_bridge.app import Service, open_service, serve
from xiaoai_bridge.config import McpServerSettings, ToolsSettings
from xiaoai_bridge.tools.mcp import McpToolSource


def call(name: str, arguments: dict[str, object], call_id: str) -> ToolRound:
    """The model asks for one call, its arguments split across deltas."""
    text = json.dumps(arguments, ensure_ascii=False)
    return ToolRound((ScriptedCall(call_id, name, text, pieces=2),))


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():  # noqa: ASYNC110 - a source connecting in the service's task
            await asyncio.sleep(0.01)


FAKE = McpServerSettings(name="fake", command=sys.executable, args=(str(SCRIPT), "stdio"))


@asynccontextmanager
async def serving(
    tmp_path: Path,
    mosquitto: Mosquitto,
    llm: FakeOpenAI,
    probe: Probe,
    *servers: McpServerSettings,
) -> AsyncIterator[Service]:
    # No filler: under load a slow round would otherwise add a reply of its own.
    tools = ToolsSettings(filler="", mcp=servers or (FAKE,))
    stop = asyncio.Event()
    async with open_service(make_settings(tmp_path, mosquitto, llm, tools=tools)) as service:
        task = asyncio.create_task(serve(service, stop))
        try:
            await probe.wait_status("online")
            yield service
        finally:
            stop.set()
            async with asyncio.timeout(WAIT_S):
                await task


def up(service: Service) -> bool:
    return service.tools.health()["mcp:fake"].ok


def reconnects(service: Service) -> int:
    (source,) = (s for s in service.tools.sources if isinstance(s, McpToolSource))
    return source.policy.reconnects


async def test_the_model_calls_an_mcp_tool_and_hears_of_its_server_dying(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    llm.script(
        call("fake__echo", {"text": "来自工具"}, "call_echo"),
        "工具说来自工具。",
        call("fake__die", {}, "call_die"),
        "抱歉，那个工具坏了。",
    )
    async with serving(tmp_path, mosquitto, llm, probe) as service:
        await until(lambda: up(service))
        await probe.ask("用工具回声一下")
        assert await probe.reply_text() == "工具说来自工具。"
        await probe.ask("再用一个工具")
        assert await probe.reply_text() == "抱歉，那个工具坏了。"
        # The server is started again by the source, and its tools are back.
        await until(lambda: reconnects(service) == 1 and up(service))
    asked, told, _, heard = llm.requests
    assert {"fake__echo", "fake__die", "fake__add"} <= {t["function"]["name"] for t in asked.tools}
    assert told.tool_messages == [
        {"role": "tool", "tool_call_id": "call_echo", "content": "来自工具"}
    ]
    (result,) = heard.tool_messages
    assert result["tool_call_id"] == "call_die"
    assert "went away" in str(result["content"])


async def test_healthz_tells_each_mcp_server_up_or_down_and_stays_healthy(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    gone = McpServerSettings(name="gone", command=str(tmp_path / "no-such-server"))
    async with (
        serving(tmp_path, mosquitto, llm, probe, FAKE, gone) as service,
        aiohttp.ClientSession() as client,
    ):
        await until(lambda: up(service) and "retrying" in service.tools.health()["mcp:gone"].detail)
        assert service.http is not None
        async with client.get(f"http://127.0.0.1:{service.http.port}/healthz") as response:
            assert response.status == 200  # a tool server down takes only its tools away
            body = await response.json()
    assert body["status"] == "ok"
    count = len(await build_server().list_tools())
    assert body["tools"]["mcp:fake"] == {"ok": True, "detail": f"{count} tools", "tools": count}
    assert body["tools_down"] == ["mcp:gone"]
    assert body["tools"]["mcp:gone"]["ok"] is False
    assert body["tools"]["mcp:gone"]["detail"].startswith(f"cannot run {tmp_path}/no-such-server")


async def test_stopping_the_bridge_stops_its_mcp_servers(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    pid_file = tmp_path / "server.pid"
    wrapper = tmp_path / "mcp-server"
    wrapper.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec {sys.executable} {SCRIPT} stdio\n")
    wrapper.chmod(0o700)
    config = write_config(tmp_path, mosquitto.url, llm)
    with config.open("a", encoding="utf-8") as file:
        file.write(f'[[tools.mcp]]\nname = "fake"\ncommand = "{wrapper}"\n')
    count = len(await build_server().list_tools())
    proc = await spawn_run(tmp_path, config, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while not any(f"mcp:fake: {count} tools" in line for line in log):
                line = await proc.stderr.readline()
                assert line, "".join(log)
                log.append(line.decode())
        server = psutil.Process(int(pid_file.read_text()))
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            await proc.stderr.read()
            await proc.wait()
    assert proc.returncode == 0
    # Its own session (the SDK starts it so): only the bridge can stop it, and it did.
    _, alive = psutil.wait_procs([server], timeout=WAIT_S)
    assert not alive
