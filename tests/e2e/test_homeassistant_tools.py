"""Home Assistant mode end to end with tools: the speaker acts on what was exposed to Assist."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_homeassistant_mode import ha_settings, running, spoken
from tests.fakes.homeassistant_server import FakeHomeAssistant, FakeSpeaker
from tests.fakes.openai_server import FakeOpenAI, ScriptedCall, ToolRound


def control(entity: str, service: str, call_id: str = "call_1") -> ToolRound:
    """The model asks ha_control to act on `entity`."""
    arguments = json.dumps({"entity": entity, "service": service}, ensure_ascii=False)
    return ToolRound((ScriptedCall(call_id, "ha_control", arguments, pieces=3),))


def house(ha: FakeHomeAssistant) -> FakeSpeaker:
    """A living room light (exposed by default), a bedroom light not exposed, a front door lock."""
    ha.house.add_area("living_room", "客厅")
    ha.house.add_area("bedroom", "卧室")
    ha.house.add_entity(
        "light.living_room", "on", {"brightness": 255}, name="客厅灯", area_id="living_room"
    )
    ha.house.add_entity("light.bedroom", "on", name="卧室灯", area_id="bedroom", expose=False)
    ha.house.add_entity("lock.front_door", "locked", name="前门锁")
    return ha.add_speaker()


async def test_turning_the_living_room_light_off_by_voice(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = house(ha)
    llm.script(control("客厅灯", "turn_off"), "好的，客厅灯已经关了。")
    async with running(ha_settings(tmp_path, ha, llm), ha):
        # The tools follow the exposed entities once they have read the house.
        await ha.wait_watching({"light.living_room", "lock.front_door"}, within_s=10)
        ha.set_conversation(speaker.sensor, "小爱机器人，把客厅灯关了")
        await ha.wait_for_calls(1, domain="light", within_s=10)
        await ha.wait_until(lambda: "好的，客厅灯已经关了。" in spoken(ha), within_s=10)
    assert ha.states["light.living_room"]["state"] == "off"
    (turned_off,) = ha.calls_to("light", "turn_off")
    assert turned_off.target == {"entity_id": ["light.living_room"]}
    asked, answered = llm.requests
    offered = {tool["function"]["name"]: tool["function"] for tool in asked.tools}
    assert {"ha_get_state", "ha_control"} <= set(offered)
    listing = offered["ha_get_state"]["parameters"]["properties"]["entity"]["description"]
    assert '"客厅灯" [客厅]: on' in listing
    assert "light.bedroom" not in listing
    (result,) = answered.tool_messages
    assert result["content"] == "done: light.turn_off on 客厅灯 (light.living_room)"


async def test_an_entity_not_exposed_is_refused(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = house(ha)
    llm.script(control("卧室灯", "turn_off"), "抱歉，卧室灯没有开放给我控制。")
    async with running(ha_settings(tmp_path, ha, llm), ha):
        await ha.wait_watching({"light.living_room"}, within_s=10)
        ha.set_conversation(speaker.sensor, "机器人，把卧室灯关了")
        await ha.wait_until(lambda: "抱歉，卧室灯没有开放给我控制。" in spoken(ha), within_s=10)
    assert ha.calls_to("light", "turn_off") == []
    assert ha.states["light.bedroom"]["state"] == "on"
    (result,) = llm.requests[1].tool_messages
    assert "not exposed to Assist" in result["content"]


async def test_a_lock_asks_first_and_opens_only_after_yes(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = house(ha)
    llm.script(control("前门锁", "unlock"))
    async with running(ha_settings(tmp_path, ha, llm), ha):
        await ha.wait_watching({"lock.front_door"}, within_s=10)
        ha.set_conversation(speaker.sensor, "机器人，打开前门锁")
        await ha.wait_until(lambda: "确定要打开前门锁吗？" in spoken(ha), within_s=10)
        assert ha.calls_to("lock", "unlock") == []
        assert ha.states["lock.front_door"]["state"] == "locked"
        ha.set_conversation(speaker.sensor, "确定")
        await ha.wait_until(lambda: "好的，前门锁已打开。" in spoken(ha), within_s=10)
    assert ha.states["lock.front_door"]["state"] == "unlocked"
    assert len(ha.calls_to("lock", "unlock")) == 1
    assert len(llm.requests) == 1  # the yes went to no model
