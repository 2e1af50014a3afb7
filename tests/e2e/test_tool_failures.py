"""Tool failure paths through the running service: a hung tool, bad arguments, a looping model."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from tests.conftest import WAIT_S, Probe, make_settings
from tests.fakes.mcp_server import SCRIPT
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI, ScriptedCall, ToolRound
from xiaoai_bridge.app import Service, open_service, serve
from xiaoai_bridge.config import McpServerSettings, ToolsSettings
from xiaoai_bridge.pipeline.pipeline import TOOL_LIMIT_APOLOGY
from xiaoai_bridge.tools.builtin import CURRENT_TIME

CALL_TIMEOUT_S = 0.5


def call(name: str, arguments: str, call_id: str) -> ToolRound:
    return ToolRound((ScriptedCall(call_id, name, arguments, pieces=2),))


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():  # noqa: ASYNC110 - a source connecting in the service's task
            await asyncio.sleep(0.01)


@asynccontextmanager
async def serving(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe, **tools: object
) -> AsyncIterator[Service]:
    server = McpServerSettings(name="fake", command=sys.executable, args=(str(SCRIPT), "stdio"))
    # No filler: under load a slow round would otherwise add a reply of its own.
    values: dict[str, object] = {
        "filler": "",
        "call_timeout_s": CALL_TIMEOUT_S,
        "mcp": (server,),
    }
    settings = make_settings(
        tmp_path, mosquitto, llm, tools=ToolsSettings.model_validate(values | tools)
    )
    stop = asyncio.Event()
    async with open_service(settings) as service:
        task = asyncio.create_task(serve(service, stop))
        try:
            await probe.wait_status("online")
            await until(lambda: service.tools.health()["mcp:fake"].ok)
            yield service
        finally:
            stop.set()
            async with asyncio.timeout(WAIT_S):
                await task


async def test_a_hung_tool_is_reported_to_the_model_and_the_server_stays_usable(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    llm.script(
        call("fake__hang", "{}", "call_hang"),
        "抱歉，那个工具没有响应。",
        call("fake__echo", '{"text": "还在"}', "call_echo"),
        "工具说还在。",
    )
    async with serving(tmp_path, mosquitto, llm, probe):
        await probe.ask("用那个会卡住的工具")
        assert await probe.reply_text() == "抱歉，那个工具没有响应。"
        await probe.ask("再回声一下")
        assert await probe.reply_text() == "工具说还在。"
    told = llm.requests[1].tool_messages
    assert told == [
        {
            "role": "tool",
            "tool_call_id": "call_hang",
            "content": f"error: the tool did not answer within {CALL_TIMEOUT_S:g} s",
        }
    ]
    assert llm.requests[3].tool_messages[0]["content"] == "还在"


async def test_malformed_arguments_are_told_to_the_model_which_tries_again(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    llm.script(
        call(CURRENT_TIME, '{"timezone": "Asia/Sha', "call_bad"),
        call(CURRENT_TIME, "{}", "call_good"),
        "现在是下午。",
    )
    async with serving(tmp_path, mosquitto, llm, probe):
        await probe.ask("现在几点")
        assert await probe.reply_text() == "现在是下午。"
    (bad,) = llm.requests[1].tool_messages
    assert bad["tool_call_id"] == "call_bad"
    assert bad["content"].startswith("error: the arguments are not valid JSON")
    earlier, good = llm.requests[2].tool_messages
    assert earlier == bad
    assert good["tool_call_id"] == "call_good"
    assert not good["content"].startswith("error")
    # What went to the model each round is valid for the real API: calls, then their results.
    assistant = [m for m in llm.requests[2].messages if m.get("tool_calls")]
    assert [m["tool_calls"][0]["id"] for m in assistant] == ["call_bad", "call_good"]
    assert json.loads(assistant[1]["tool_calls"][0]["function"]["arguments"]) == {}


async def test_a_model_looping_on_tools_gets_an_apology_at_the_round_limit(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    llm.script(*(call(CURRENT_TIME, "{}", f"call_{n}") for n in range(4)))
    async with serving(tmp_path, mosquitto, llm, probe, max_rounds=3):
        await probe.ask("一直查时间")
        assert await probe.reply_text() == TOOL_LIMIT_APOLOGY
        await probe.ask("你好")
        assert await probe.reply_text() == "你问的是：你好。这是第二句话。"
    assert llm.request_count == 3 + 1 + 1
