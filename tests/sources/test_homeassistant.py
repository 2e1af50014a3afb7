"""Tests for the Home Assistant source, driven through the fake HA like HA would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.fakes.homeassistant_server import (
    DEFAULT_TOKEN,
    FakeHomeAssistant,
    conversation_timestamp,
)
from xiaoai_bridge.clients.homeassistant import ENTITY_REGISTRY_UPDATED, HomeAssistantClient
from xiaoai_bridge.models import HomeAssistantRoute, Utterance
from xiaoai_bridge.reconnect import ReconnectPolicy
from xiaoai_bridge.sources.homeassistant import (
    HomeAssistantSource,
    parse_timestamp,
    xiaoai_answer,
)

_LOGGER = logging.getLogger(__name__)


@pytest.fixture
async def client(ha: FakeHomeAssistant) -> AsyncIterator[HomeAssistantClient]:
    policy = ReconnectPolicy(
        name="homeassistant", logger=_LOGGER, initial_delay_s=0.01, max_delay_s=0.05
    )
    ha_client = HomeAssistantClient(
        ha.url,
        DEFAULT_TOKEN,
        policy=policy,
        command_timeout_s=2.0,
        event_types=(ENTITY_REGISTRY_UPDATED,),
    )
    await ha_client.start()
    yield ha_client
    await ha_client.aclose()


def watching(source: HomeAssistantSource, ha: FakeHomeAssistant) -> Callable[[], bool]:
    """Whether HA sends the source's sensors and speakers to it (and it knows some)."""
    return lambda: bool(wanted := source.wanted_entities()) and wanted <= ha.watched


@contextlib.asynccontextmanager
async def listening(
    source: HomeAssistantSource, ha: FakeHomeAssistant
) -> AsyncIterator[asyncio.Queue[Utterance]]:
    """Run the source; yields once it watches its entities, so later records reach it."""
    heard: asyncio.Queue[Utterance] = asyncio.Queue()
    taken = ha.commands_of("get_states")

    async def consume() -> None:
        async with contextlib.aclosing(source.utterances()) as utterances:
            async for utterance in utterances:
                heard.put_nowait(utterance)

    task = asyncio.create_task(consume())
    try:
        await ha.wait_for_commands("get_states", taken + 1)
        await ha.wait_until(watching(source, ha))
        yield heard
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_heard(heard: asyncio.Queue[Utterance], within_s: float = 2.0) -> Utterance:
    async with asyncio.timeout(within_s):
        return await heard.get()


async def test_fresh_question_is_yielded(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    speaker = ha.add_speaker()
    source = HomeAssistantSource(client)
    async with listening(source, ha) as heard:
        ha.set_conversation(speaker.sensor, "机器人今天适合穿什么", answer="今天晴")
        utterance = await next_heard(heard)
    assert utterance.text == "机器人今天适合穿什么"
    assert utterance.source == "homeassistant"
    assert utterance.device == speaker.media_player
    assert isinstance(utterance.route, HomeAssistantRoute)
    assert utterance.route.media_player == speaker.media_player
    assert utterance.route.sensor == speaker.sensor
    assert utterance.route.timestamp  # the sensor's own, as Home Assistant wrote it
    assert utterance.xiaoai_answer == "今天晴"
    assert str(utterance.id).startswith(speaker.sensor + "@")
    assert source.speakers == {speaker.sensor: speaker.media_player}


async def test_same_text_twice_with_new_timestamps_yields_twice(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    speaker = ha.add_speaker()
    now = time.time()
    async with listening(HomeAssistantSource(client), ha) as heard:
        ha.set_conversation(speaker.sensor, "机器人讲个笑话", timestamp=now - 2)
        first = await next_heard(heard)
        # An answers-only update of the same record changes attributes but not timestamp.
        ha.set_conversation(speaker.sensor, "机器人讲个笑话", timestamp=now - 2, answer="新答案")
        ha.set_conversation(speaker.sensor, "机器人讲个笑话", timestamp=now - 1)
        second = await next_heard(heard)
        ha.set_conversation(speaker.sensor, "marker")
        assert (await next_heard(heard)).text == "marker"
    assert first.text == second.text == "机器人讲个笑话"
    assert first.id != second.id


async def test_replayed_old_record_after_reconnect_is_ignored(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    speaker = ha.add_speaker()
    t_old, t_seen = time.time() - 20, time.time() - 10
    async with listening(HomeAssistantSource(client), ha) as heard:
        ha.set_conversation(speaker.sensor, "机器人开灯", timestamp=t_seen)
        assert (await next_heard(heard)).text == "机器人开灯"

        taken = ha.commands_of("get_states")
        async with ha.down():
            # HA restarts: the sensor is unavailable, then its first poll brings back the
            # last record, or an older one after a failed poll.
            ha.set_unavailable(speaker.sensor)
            ha.set_conversation(speaker.sensor, "更早的问题", timestamp=t_old)
        await ha.wait_for_commands("get_states", taken + 1)
        ha.set_unavailable(speaker.sensor)
        ha.set_conversation(speaker.sensor, "机器人开灯", timestamp=t_seen)
        ha.set_conversation(speaker.sensor, "更早的问题", timestamp=t_old)
        ha.set_conversation(speaker.sensor, "marker")
        assert (await next_heard(heard)).text == "marker"
        assert heard.empty()
    assert client.policy.reconnects == 1


async def test_question_said_while_disconnected_is_answered_after_reconnect(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    speaker = ha.add_speaker()
    async with listening(HomeAssistantSource(client), ha) as heard:
        await ha.drop_clients()
        ha.set_conversation(speaker.sensor, "机器人在吗")  # no subscriber sees this event
        utterance = await next_heard(heard)
    assert utterance.text == "机器人在吗"


async def test_existing_record_at_startup_is_not_answered(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    speaker = ha.add_speaker()
    ha.set_conversation(speaker.sensor, "启动前说的话")
    async with listening(HomeAssistantSource(client), ha) as heard:
        ha.set_conversation(speaker.sensor, "marker")
        assert (await next_heard(heard)).text == "marker"
        assert heard.empty()


async def test_stale_record_is_ignored(
    ha: FakeHomeAssistant, client: HomeAssistantClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    speaker = ha.add_speaker()
    async with listening(HomeAssistantSource(client, freshness_s=60), ha) as heard:
        ha.set_conversation(speaker.sensor, "很久以前", timestamp=time.time() - 120)
        ha.set_conversation(speaker.sensor, "marker")
        assert (await next_heard(heard)).text == "marker"
        assert heard.empty()
    assert any("old" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("state", ["unavailable", "unknown", ""])
async def test_non_speech_states_are_ignored(
    ha: FakeHomeAssistant, client: HomeAssistantClient, state: str
) -> None:
    speaker = ha.add_speaker()
    async with listening(HomeAssistantSource(client), ha) as heard:
        attributes = dict(ha.states[speaker.sensor]["attributes"])
        attributes["timestamp"] = conversation_timestamp()
        ha.set_state(speaker.sensor, state, attributes)
        ha.set_unavailable(speaker.sensor)
        ha.set_conversation(speaker.sensor, "marker")
        assert (await next_heard(heard)).text == "marker"
        assert heard.empty()


async def test_two_speakers_are_told_apart(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    living = ha.add_speaker("dea6", model="lx06")
    bedroom = ha.add_speaker("5996", model="l06a")
    async with listening(HomeAssistantSource(client), ha) as heard:
        ha.set_conversation(living.sensor, "客厅的问题")
        ha.set_conversation(bedroom.sensor, "卧室的问题")
        got = {(u := await next_heard(heard)).text: u.device for _ in range(2)}
    assert got == {"客厅的问题": living.media_player, "卧室的问题": bedroom.media_player}


async def test_configured_speakers_only(ha: FakeHomeAssistant, client: HomeAssistantClient) -> None:
    living = ha.add_speaker("dea6")
    other = ha.add_speaker("ffff")
    source = HomeAssistantSource(client, speakers={living.sensor: "media_player.override"})
    async with listening(source, ha) as heard:
        ha.set_conversation(other.sensor, "不该听到")
        ha.set_conversation(living.sensor, "该听到")
        utterance = await next_heard(heard)
        assert heard.empty()
    assert utterance.text == "该听到"
    assert utterance.device == "media_player.override"


def _state(text: str, timestamp: Any, **attrs: Any) -> Mapping[str, Any]:
    return {
        "entity_id": "sensor.xiaomi_lx06_x_conversation",
        "state": text,
        "attributes": {
            "content": text,
            "timestamp": timestamp,
            "entity_class": "XiaoaiConversationSensor",
            "parent_entity_id": "media_player.xiaomi_lx06_x_play_control",
            **attrs,
        },
    }


def test_freshness_window_uses_the_injected_clock() -> None:
    now = datetime(2026, 7, 20, 0, 1, 2, tzinfo=UTC).timestamp()
    source = HomeAssistantSource(
        HomeAssistantClient("http://127.0.0.1:1", "t"), freshness_s=5, clock=lambda: now
    )
    assert source.accept_state(_state("太旧", conversation_timestamp(now - 6))) is None
    accepted = source.accept_state(_state("刚好", conversation_timestamp(now - 4)))
    assert accepted is not None
    assert accepted.device == "media_player.xiaomi_lx06_x_play_control"
    # Same timestamp again (answers changed): already seen.
    assert source.accept_state(_state("刚好", conversation_timestamp(now - 4), answers=[])) is None


def test_parse_timestamp_forms() -> None:
    expected = datetime(2026, 7, 20, 0, 1, 2, 345000, tzinfo=UTC).timestamp()
    assert parse_timestamp("2026-07-20T08:01:02.345000+08:00") == pytest.approx(expected)
    assert parse_timestamp(expected * 1000) == pytest.approx(expected)
    assert parse_timestamp(expected) == pytest.approx(expected)
    assert parse_timestamp(None) is None
    assert parse_timestamp("yesterday") is None


def test_xiaoai_answer_reads_tts_then_llm() -> None:
    assert xiaoai_answer({"answers": [{"type": "TTS", "tts": {"text": "好的"}}]}) == "好的"
    assert xiaoai_answer({"answers": [{"type": "LLM", "llm": {"text": "大模型"}}]}) == "大模型"
    assert xiaoai_answer({"answers": [{"type": "AUDIO", "audio": {}}]}) == ""
    assert xiaoai_answer({}) == ""


async def test_busy_house_never_reaches_the_source(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    speaker = ha.add_speaker()
    source = HomeAssistantSource(client)
    async with listening(source, ha) as heard:
        for i in range(500):
            ha.set_state(f"sensor.power_{i % 50}", str(i))
        ha.set_conversation(speaker.sensor, "机器人你好")
        assert (await next_heard(heard)).text == "机器人你好"
    assert ha.watched == {speaker.sensor, speaker.media_player}
    assert not any(key.startswith("sensor.power") for key in ha.entity_messages_sent)


async def test_speaker_added_at_runtime_is_watched_and_heard(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    first = ha.add_speaker("aaaa")
    source = HomeAssistantSource(client)
    async with listening(source, ha) as heard:
        second = ha.add_speaker("bbbb")  # its registry entry is created, then its state
        await ha.wait_watching([second.sensor, second.media_player])
        ha.set_conversation(second.sensor, "新音箱的问题")
        utterance = await next_heard(heard)
    assert (utterance.text, utterance.device) == ("新音箱的问题", second.media_player)
    assert source.speakers == {
        first.sensor: first.media_player,
        second.sensor: second.media_player,
    }


async def test_speaker_without_registry_event_is_found_by_the_periodic_scan(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    source = HomeAssistantSource(client, rediscover_s=0.05)
    ha.add_speaker("aaaa")
    async with listening(source, ha) as heard:
        # hass-xiaomi-miot still loading after an HA restart: the entity was registered before.
        late = ha.add_speaker("late", registered=True)
        await ha.wait_watching([late.sensor, late.media_player])
        ha.set_conversation(late.sensor, "晚到的音箱")
        assert (await next_heard(heard)).device == late.media_player


async def test_record_said_between_snapshot_and_subscription_is_answered(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    speaker = ha.add_speaker()

    def speak_before_subscribing(msg: dict[str, Any]) -> None:
        if msg.get("type") == "subscribe_entities":
            ha.set_conversation(speaker.sensor, "机器人刚才说的")

    ha.command_hooks.append(speak_before_subscribing)
    async with listening(HomeAssistantSource(client), ha) as heard:
        assert (await next_heard(heard)).text == "机器人刚才说的"


HOSTILE_SENSOR_VALUES = [
    ("state", ["a list"]),
    ("state", "\ud800 lone surrogate"),
    ("timestamp", 10**400),
    ("timestamp", float("inf")),
    ("timestamp", float("nan")),
    ("timestamp", "9999-12-31T23:59:59+14:00"),
    ("timestamp", "3000-01-01T00:00:00+00:00"),  # would silence the sensor until then
    ("timestamp", {"nested": [1, 2]}),
    ("parent_entity_id", {"not": "an id"}),
    ("answers", [{"tts": {"text": "\udfff"}}]),
]


async def test_hostile_sensor_states_are_refused_and_the_source_keeps_listening(
    ha: FakeHomeAssistant, client: HomeAssistantClient, caplog: pytest.LogCaptureFixture
) -> None:
    speaker = ha.add_speaker()
    async with listening(HomeAssistantSource(client), ha) as heard:
        for i, (field, value) in enumerate(HOSTILE_SENSOR_VALUES):
            attributes = dict(ha.states[speaker.sensor]["attributes"])
            # Distinct and older than the marker below, so only the values can refuse them.
            attributes["timestamp"] = conversation_timestamp(time.time() - 10 + i)
            state: Any = "机器人坏数据"
            if field == "state":
                state = value
            else:
                attributes[field] = value
            compressed = {"s": state, "a": attributes, "c": "01A", "lc": time.time()}
            # Sent raw: the fake's own encoder keeps lone surrogates, which its socket refuses.
            body = json.dumps({"c": {speaker.sensor: {"+": compressed}}})
            await ha.send_entity_event(body)
        ha.set_conversation(speaker.sensor, "机器人正常的问题")
        got = [await next_heard(heard)]
        while got[-1].text != "机器人正常的问题":
            got.append(await next_heard(heard))
    # A hostile parent id or answer leaves the question itself valid, on the same speaker.
    assert [u.text for u in got[:-1]] == ["机器人坏数据"] * 2
    assert {u.device for u in got} == {speaker.media_player}
    assert got[1].xiaoai_answer == ""
    assert "not text" in caplog.text
    assert "in the future" in caplog.text
