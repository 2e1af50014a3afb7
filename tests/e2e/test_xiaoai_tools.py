"""XiaoAi's skills and the built-in tools end to end, in Home Assistant and Xiaomi cloud modes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.test_homeassistant_mode import ha_settings, running, spoken
from tests.e2e.test_xiaomi_mode import running as running_xiaomi
from tests.e2e.test_xiaomi_mode import wait_until, xiaomi_settings
from tests.fakes.homeassistant_server import FakeHomeAssistant
from tests.fakes.openai_server import FakeOpenAI, ScriptedCall, ToolRound
from tests.fakes.xiaomi_cloud import FakeXiaomiCloud
from xiaoai_bridge.config import Settings, ToolsSettings
from xiaoai_bridge.tools.builtin import CONTINUOUS_CONVERSATION, CURRENT_TIME
from xiaoai_bridge.tools.xiaoai import ACCEPTED, TOOL_NAME

ALARM = "明天早上七点叫我起床"


@pytest.fixture
async def cloud() -> AsyncIterator[FakeXiaomiCloud]:
    async with FakeXiaomiCloud() as fake:
        yield fake


def without_filler(settings: Settings) -> Settings:
    """No filler: under load a slow round would otherwise add a speak call of its own."""
    return settings.model_copy(update={"tools": ToolsSettings(filler="")})


def call(name: str, arguments: dict[str, object], call_id: str = "call_1") -> ToolRound:
    """The model asks for one call, its arguments split across deltas."""
    text = json.dumps(arguments, ensure_ascii=False)
    return ToolRound((ScriptedCall(call_id, name, text, pieces=3),))


async def test_xiaoai_carries_out_a_command_in_home_assistant_mode(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = ha.add_speaker()
    llm.script(call(TOOL_NAME, {"command": ALARM}, "call_xiaoai"), "好的。")
    async with running(without_filler(ha_settings(tmp_path, ha, llm)), ha):
        ha.set_conversation(speaker.sensor, "机器人帮我定个明早七点的闹钟")
        await ha.wait_until(lambda: "好的。" in spoken(ha), within_s=10)

    executed, answered = ha.calls_to("xiaomi_miot", "intelligent_speaker")
    assert executed.service_data == {
        "entity_id": speaker.media_player,
        "text": ALARM,
        "execute": True,
        "silent": False,
    }
    assert executed.return_response is True
    assert answered.entity_id == speaker.media_player
    assert (answered.text, answered.service_data["execute"]) == ("好的。", False)
    asked, told = llm.requests
    assert {TOOL_NAME, CURRENT_TIME} <= {tool["function"]["name"] for tool in asked.tools}
    (result,) = told.tool_messages
    assert result == {"role": "tool", "tool_call_id": "call_xiaoai", "content": ACCEPTED}


async def test_xiaoai_failing_inside_a_successful_call_is_told_to_the_model(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = ha.add_speaker()
    ha.register_service(
        "xiaomi_miot",
        "intelligent_speaker",
        supports_response="optional",
        handler=lambda c: {"error": "device offline"} if c.service_data.get("execute") else {},
    )
    llm.script(call(TOOL_NAME, {"command": ALARM}), "抱歉，小爱现在没响应。")
    async with running(without_filler(ha_settings(tmp_path, ha, llm)), ha):
        ha.set_conversation(speaker.sensor, "机器人帮我定个明早七点的闹钟")
        await ha.wait_until(lambda: "抱歉，小爱现在没响应。" in spoken(ha), within_s=10)
    (result,) = llm.requests[1].tool_messages
    assert "device offline" in str(result["content"])


async def test_the_model_starts_a_continuous_conversation(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = ha.add_speaker()
    llm.script(call(CONTINUOUS_CONVERSATION, {"on": True}), "好的，我们接着聊。", "第二个回答。")
    async with running(without_filler(ha_settings(tmp_path, ha, llm)), ha):
        ha.set_conversation(speaker.sensor, "机器人我们多聊一会儿吧")
        await ha.wait_until(lambda: "好的，我们接着聊。" in spoken(ha), within_s=10)
        ha.set_conversation(speaker.sensor, "没有关键词的问题")
        await ha.wait_until(lambda: "第二个回答。" in spoken(ha), within_s=10)
    assert llm.requests[-1].last_user_message == "没有关键词的问题"


async def test_xiaoai_carries_out_a_command_in_xiaomi_cloud_mode(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    llm.script(call(TOOL_NAME, {"command": "音量调到30"}), "好的。")
    async with running_xiaomi(without_filler(xiaomi_settings(tmp_path, cloud, llm)), cloud):
        cloud.say("帮我把音量调到30")
        await wait_until(lambda: "好的。" in cloud.tts_texts())
    (action,) = cloud.action_calls
    # The fake's first speaker is an LX06: execute-text-directive is siid 5, aiid 5.
    assert (action.did, action.siid, action.aiid) == (cloud.speaker.miot_did, 5, 5)
    assert action.args == ["音量调到30", False]
    (result,) = llm.requests[1].tool_messages
    assert result["content"] == ACCEPTED


async def test_a_continuous_conversation_the_model_starts_wakes_the_xiaomi_speaker(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    # The answer that switched it on already carries keep_listening, though the question
    # began outside a continuous conversation: the sink wakes the speaker after it.
    llm.script(call(CONTINUOUS_CONVERSATION, {"on": True}), "好的，我们接着聊。", "第二个回答。")
    async with running_xiaomi(without_filler(xiaomi_settings(tmp_path, cloud, llm)), cloud):
        cloud.say("帮我开个持续对话")
        await wait_until(lambda: "好的，我们接着聊。" in cloud.tts_texts())
        # LX06's wake-up action: siid 5, aiid 3.
        await wait_until(lambda: [(c.siid, c.aiid) for c in cloud.action_calls] == [(5, 3)])
        cloud.say("没有关键词的问题")
        await wait_until(lambda: "第二个回答。" in cloud.tts_texts())
    assert llm.requests[-1].last_user_message == "没有关键词的问题"


async def test_xiaoais_record_of_the_command_is_not_taken_for_a_question(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    # In a continuous conversation every record is a question: XiaoAi's record of the
    # command handed to it must not be, or the model would hand it over again and again.
    llm.script(call(TOOL_NAME, {"command": "音量调到30"}), "好的。", "下一个回答。")
    async with running_xiaomi(without_filler(xiaomi_settings(tmp_path, cloud, llm)), cloud):
        cloud.say("开始持续对话")
        await wait_until(lambda: len(cloud.tts_texts()) == 1)
        cloud.say("把音量调到30吧")
        await wait_until(lambda: "好的。" in cloud.tts_texts())
        cloud.say("音量调到30", answer="已调到30")  # the echo of the command
        cloud.say("下一个问题")
        await wait_until(lambda: "下一个回答。" in cloud.tts_texts())
    asked = [r.last_user_message for r in llm.requests]
    assert asked == ["把音量调到30吧", "把音量调到30吧", "下一个问题"]
    executed = [c.args for c in cloud.action_calls if (c.siid, c.aiid) == (5, 5)]
    assert executed == [["音量调到30", False]]
