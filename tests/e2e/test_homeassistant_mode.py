"""Home Assistant mode end to end: the sensor changes, the speaker speaks, no Node-RED."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.conftest import llm_settings, open_probe
from tests.fakes.homeassistant_server import (
    CONVERSATION_ENTITY_CLASS,
    DEFAULT_TOKEN,
    FakeHomeAssistant,
)
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI
from xiaoai_bridge.app import run_service
from xiaoai_bridge.clients.homeassistant import HomeAssistantAuthError
from xiaoai_bridge.config import HomeAssistantSettings, HttpSettings, MqttSettings, Settings
from xiaoai_bridge.pipeline.pipeline import CONTINUOUS_ON_REPLY

FAST = 200.0  # characters per second: keeps pacing real but the suite quick


def ha_settings(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI, **ha_values: object
) -> Settings:
    values: dict[str, object] = {
        "url": ha.url,
        "token": SecretStr(DEFAULT_TOKEN),
        "chars_per_second": FAST,
    }
    values.update(ha_values)
    return Settings(
        data_dir=tmp_path / "data",
        http=HttpSettings(port=0),
        llm=llm_settings(llm),
        homeassistant=HomeAssistantSettings.model_validate(values),
    )


def speaker_entities(ha: FakeHomeAssistant) -> set[str]:
    """Every conversation sensor of the fake and its media_player."""
    found = set()
    for entity_id, state in ha.states.items():
        if state["attributes"].get("entity_class") == CONVERSATION_ENTITY_CLASS:
            found |= {entity_id, state["attributes"]["parent_entity_id"]}
    return found


@contextlib.asynccontextmanager
async def running(settings: Settings, ha: FakeHomeAssistant) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(settings, stop=stop))
    # The states read as the baseline, then the speakers watched: from now on, speech counts.
    await ha.wait_for_commands("get_states", 1, within_s=10)
    await ha.wait_watching(speaker_entities(ha), within_s=10)
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


def spoken(ha: FakeHomeAssistant) -> list[str]:
    return [call.text for call in ha.calls_to("xiaomi_miot", "intelligent_speaker")]


async def test_triggered_question_is_spoken_sentence_by_sentence(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = ha.add_speaker()
    llm.answer = "今天天气很好，适合出门。记得带上水杯。"
    llm.token_delay = 0.05  # the second sentence arrives while the first is being spoken
    async with running(ha_settings(tmp_path, ha, llm), ha):
        ha.set_conversation(speaker.sensor, "打开客厅的灯")  # XiaoAi's business: left alone
        ha.set_conversation(speaker.sensor, "机器人今天天气怎么样")
        calls = await ha.wait_for_calls(2, domain="xiaomi_miot", within_s=10)
    assert [c.text for c in calls] == ["今天天气很好，适合出门。", "记得带上水杯。"]
    assert all(c.entity_id == speaker.media_player for c in calls)
    assert [r.last_user_message for r in llm.requests] == ["今天天气怎么样"]
    assert "MQTT" not in " ".join(spoken(ha))


async def test_same_sentence_twice_is_answered_twice_and_speakers_are_independent(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    kitchen, bedroom = ha.add_speaker("aaaa"), ha.add_speaker("bbbb")
    llm.answer = "好的。"
    async with running(ha_settings(tmp_path, ha, llm), ha):
        ha.set_conversation(kitchen.sensor, "机器人你好")
        ha.set_conversation(bedroom.sensor, "机器人你好")
        await ha.wait_for_calls(2, domain="xiaomi_miot", within_s=10)
        ha.set_conversation(kitchen.sensor, "机器人你好")
        calls = await ha.wait_for_calls(3, domain="xiaomi_miot", within_s=10)
    assert sorted(c.entity_id for c in calls) == sorted(
        [kitchen.media_player, bedroom.media_player, kitchen.media_player]
    )
    assert len(llm.requests) == 3


async def test_continuous_conversation_needs_no_keyword_until_stopped(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = ha.add_speaker()
    llm.answer = "回答。"
    async with running(ha_settings(tmp_path, ha, llm), ha):
        ha.set_conversation(speaker.sensor, "开始持续对话")
        await ha.wait_for_calls(1, domain="xiaomi_miot", within_s=10)
        ha.set_conversation(speaker.sensor, "没有关键词的问题")
        await ha.wait_for_calls(2, domain="xiaomi_miot", within_s=10)
        ha.set_conversation(speaker.sensor, "结束持续对话")
        await ha.wait_for_calls(3, domain="xiaomi_miot", within_s=10)
        ha.set_conversation(speaker.sensor, "又一个没有关键词的问题")
        # Utterances are judged in order: once this one is answered, the one before was not.
        ha.set_conversation(speaker.sensor, "机器人最后一个")
        await ha.wait_for_calls(4, domain="xiaomi_miot", within_s=10)
    assert spoken(ha)[0] == CONTINUOUS_ON_REPLY
    assert [r.last_user_message for r in llm.requests] == ["没有关键词的问题", "最后一个"]
    assert len(spoken(ha)) == 4


async def test_wrong_token_stops_the_service_with_a_clear_error(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    settings = ha_settings(tmp_path, ha, llm, token=SecretStr("wrong-token"))
    with pytest.raises(HomeAssistantAuthError):
        await asyncio.wait_for(run_service(settings), 10)
    assert ha.auth_failures == 1


async def test_cli_exits_non_zero_on_a_wrong_token(tmp_path: Path, ha: FakeHomeAssistant) -> None:
    config = tmp_path / "ha.toml"
    config.write_text(f'[homeassistant]\nurl = "{ha.url}"\ntoken = "wrong-token"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xiaoai_bridge.cli",
        "run",
        "--config",
        str(config),
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XIAOAI_BRIDGE_HTTP__PORT": "0"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode == 4
    message = err.decode()
    last = message.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert "token" in last
    assert "Traceback" not in message
    assert "wrong-token" not in message


async def run_cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xiaoai_bridge.cli",
        *args,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XIAOAI_BRIDGE_HTTP__PORT": "0"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_check_and_ha_speakers_list_the_speakers(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = ha.add_speaker()
    config = tmp_path / "ha.toml"
    config.write_text(
        f'[homeassistant]\nurl = "{ha.url}"\ntoken = "{DEFAULT_TOKEN}"\n'
        f'[llm]\nbase_url = "{llm.base_url}"\napi_key = "{llm.api_key}"\nmodel = "fake-model"\n'
    )
    code, out = await run_cli(tmp_path, "check", "--config", str(config))
    assert code == 0, out
    assert f"ok   homeassistant: Home Assistant {ha.ha_version}" in out
    assert f"{speaker.sensor} -> {speaker.media_player}" in out
    assert "mqtt" not in out  # MQTT mode is off when only Home Assistant is configured
    code, out = await run_cli(tmp_path, "ha-speakers", "--config", str(config))
    assert code == 0
    assert f'"{speaker.sensor}" = "{speaker.media_player}"' in out
    config.write_text(config.read_text().replace(DEFAULT_TOKEN, "wrong-token"))
    code, out = await run_cli(tmp_path, "check", "--config", str(config))
    assert code == 1
    assert "FAIL homeassistant: " in out
    assert "access token" in out


async def test_keywords_can_differ_per_speaker(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    kids, parents = ha.add_speaker("kids"), ha.add_speaker("prnt")
    llm.answer = "好的。"
    settings = ha_settings(tmp_path, ha, llm, speaker_keywords={kids.media_player: ("小白",)})
    async with running(settings, ha):
        ha.set_conversation(kids.sensor, "机器人你好")  # not this speaker's keyword
        ha.set_conversation(kids.sensor, "小白讲个故事")
        ha.set_conversation(parents.sensor, "机器人你好")
        calls = await ha.wait_for_calls(2, domain="xiaomi_miot", within_s=10)
    # The kids' "机器人你好" came before their answered question, so it was judged already.
    assert sorted(c.entity_id for c in calls) == sorted([kids.media_player, parents.media_player])
    assert sorted(r.last_user_message for r in llm.requests) == ["你好", "小白讲个故事"]


async def test_mqtt_and_home_assistant_modes_run_together(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI, mosquitto: Mosquitto
) -> None:
    speaker = ha.add_speaker()
    llm.answer = "两边都回答。"
    settings = ha_settings(tmp_path, ha, llm).model_copy(
        update={"mqtt": MqttSettings(url=mosquitto.url, enabled=True, client_id="both-modes")}
    )
    async with open_probe(mosquitto, "both-probe") as probe, running(settings, ha):
        await probe.wait_status("online")
        await probe.ask("从 Node-RED 来的问题")
        ha.set_conversation(speaker.sensor, "机器人从音箱来的问题")
        assert await probe.reply_text() == "两边都回答。"
        calls = await ha.wait_for_calls(1, domain="xiaomi_miot", within_s=10)
    assert calls[0].text == "两边都回答。"
    assert sorted(r.last_user_message for r in llm.requests) == [
        "从 Node-RED 来的问题",
        "从音箱来的问题",
    ]


async def test_a_busy_house_never_reaches_the_bridge_while_a_question_is_answered(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = ha.add_speaker()
    llm.answer = "照常回答。"
    rate = 1000.0  # unrelated state changes per second, over 100 entities
    changed = 0
    loop = asyncio.get_running_loop()

    async def busy_house() -> None:
        nonlocal changed
        start = loop.time()
        while True:
            while changed < int((loop.time() - start) * rate):
                ha.set_state(f"sensor.power_{changed % 100}", str(changed), {"unit": "W"})
                changed += 1
            await asyncio.sleep(0.005)

    async with running(ha_settings(tmp_path, ha, llm), ha):
        flood = asyncio.create_task(busy_house())
        try:
            await ha.wait_until(lambda: changed >= 200, within_s=5)
            ha.set_conversation(speaker.sensor, "机器人忙碌的时候也回答吗")
            calls = await ha.wait_for_calls(1, domain="xiaomi_miot", within_s=10)
        finally:
            flood.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flood
    assert calls[0].text == "照常回答。"
    assert changed >= 200
    # Home Assistant filtered them: not one unrelated change was sent to the bridge.
    assert not [key for key in ha.entity_messages_sent if key.startswith("sensor.power_")]


async def test_hostile_frames_never_stop_the_bridge_answering(
    tmp_path: Path, ha: FakeHomeAssistant, llm: FakeOpenAI
) -> None:
    speaker = ha.add_speaker()
    llm.answer = "还在。"
    deep = "[" * 5_000 + "]" * 5_000
    async with running(ha_settings(tmp_path, ha, llm), ha):
        for frame in (deep, "[" * 100_000, "42", "[null, 1]", '{"id": true, "type": "result"}'):
            await ha.send_raw(frame)
        await ha.send_raw(b"\x00", binary=True)
        for change in ('{"s": [[1]]}', '{"s": "机器人", "a": {"timestamp": 1e999}}'):
            await ha.send_entity_event(
                json.dumps({"c": {speaker.sensor: {"+": "CHANGE"}}}).replace('"CHANGE"', change)
            )
        ha.set_conversation(speaker.sensor, "机器人你还在吗")
        await ha.wait_for_calls(1, domain="xiaomi_miot", within_s=10)
        # A text frame that is not UTF-8 breaks the protocol: the bridge reconnects.
        await ha.send_raw(b'{"type": "\xff"}')
        await ha.wait_until(lambda: ha.connections == 2, within_s=10)
        await ha.wait_watching(speaker_entities(ha), within_s=10)
        ha.set_conversation(speaker.sensor, "机器人重连以后呢")
        calls = await ha.wait_for_calls(2, domain="xiaomi_miot", within_s=10)
    assert [c.text for c in calls] == ["还在。", "还在。"]
    assert [r.last_user_message for r in llm.requests] == ["你还在吗", "重连以后呢"]
