"""Tests for the Home Assistant sink: speak calls as the fake HA records them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.homeassistant_server import (
    DEFAULT_TOKEN,
    FakeHomeAssistant,
    FakeSpeaker,
    RecordedCall,
)
from xiaoai_bridge.clients.homeassistant import (
    HomeAssistantClient,
    HomeAssistantCommandError,
    refuses_responses,
)
from xiaoai_bridge.models import Answer, HomeAssistantRoute, Outcome, SpeechChunk, Utterance
from xiaoai_bridge.reconnect import ReconnectPolicy
from xiaoai_bridge.sinks.homeassistant import (
    INTELLIGENT_SPEAKER,
    NOTIFY_SEND_MESSAGE,
    HomeAssistantSink,
    resolve_speak_service,
)
from xiaoai_bridge.spoken import estimate_speech_s

_LOGGER = logging.getLogger(__name__)
# Fast speech keeps the suite quick: 10 characters take 0.1 s.
CPS = 100.0
TEN = "一二三四五六七八九十"


@pytest.fixture
async def client(ha: FakeHomeAssistant) -> AsyncIterator[HomeAssistantClient]:
    policy = ReconnectPolicy(
        name="homeassistant", logger=_LOGGER, initial_delay_s=0.01, max_delay_s=0.05
    )
    ha_client = HomeAssistantClient(ha.url, DEFAULT_TOKEN, policy=policy, command_timeout_s=2.0)
    await ha_client.start()
    yield ha_client
    await ha_client.aclose()


@pytest.fixture
def speaker(ha: FakeHomeAssistant) -> FakeSpeaker:
    return ha.add_speaker()


def question(speaker: FakeSpeaker, qid: str = "q1") -> Utterance:
    return Utterance(
        text="机器人问题",
        device=speaker.media_player,
        id=qid,
        source="homeassistant",
        route=HomeAssistantRoute(
            media_player=speaker.media_player,
            sensor=speaker.sensor,
            timestamp="2026-11-29T12:00:00+00:00",
        ),
    )


def sentence(utterance: Utterance, seq: int, text: str, *, final: bool = False) -> SpeechChunk:
    return SpeechChunk(
        question_id=utterance.id, device=utterance.device, seq=seq, text=text, final=final
    )


def make_sink(client: HomeAssistantClient, **kwargs: Any) -> HomeAssistantSink:
    options: dict[str, Any] = {"chars_per_second": CPS, "speech_overhead_s": 0.0}
    options.update(kwargs)
    return HomeAssistantSink(client, **options)


def speech(ha: FakeHomeAssistant) -> list[RecordedCall]:
    return ha.calls_to("xiaomi_miot", "intelligent_speaker")


async def test_speaks_with_intelligent_speaker_wire_format(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    q = question(speaker)
    async with make_sink(client) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "你好。", final=True))
        await sink.end(Answer(utterance=q, outcome=Outcome.ANSWERED, text="你好。"))
        (call,) = await ha.wait_for_calls(1)
        await sink.wait_idle()
    assert call.service_data == {
        "entity_id": speaker.media_player,
        "text": "你好。",
        "execute": False,
        "silent": False,
    }
    assert call.return_response is True
    assert sink.spoken == 1


async def test_second_chunk_waits_for_the_first_estimated_duration(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    q = question(speaker)
    async with make_sink(client, merge_max_chars=10) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN))
        await sink.chunk(q, sentence(q, 1, "后半句话。"))
        first, second = await ha.wait_for_calls(2)
    gap = second.at - first.at
    assert gap >= estimate_speech_s(TEN, CPS) - 0.005
    assert gap < 0.1 + 0.15  # it does not stall either
    assert [first.text, second.text] == [TEN, "后半句话。"]


async def test_short_sentences_queued_meanwhile_are_merged(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    q = question(speaker)
    async with make_sink(client, merge_max_chars=8) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN))
        for i, text in enumerate(["甲。", "乙。", "丙。", "丁。", "戊。"], start=1):
            await sink.chunk(q, sentence(q, i, text))
        calls = await ha.wait_for_calls(3)
    # Sent while the first was spoken, then merged up to merge_max_chars (8) per call.
    assert [c.text for c in calls] == [TEN, "甲。乙。丙。丁。", "戊。"]


async def test_new_question_cancels_the_queued_rest(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    first_q, second_q = question(speaker, "q1"), question(speaker, "q2")
    async with make_sink(client, merge_max_chars=4) as sink:
        await sink.begin(first_q)
        await sink.chunk(first_q, sentence(first_q, 0, TEN))
        await sink.chunk(first_q, sentence(first_q, 1, "旧答案二。"))
        await sink.chunk(first_q, sentence(first_q, 2, "旧答案三。"))
        await ha.wait_for_calls(1)
        await sink.end(Answer(utterance=first_q, outcome=Outcome.ANSWERED))
        await sink.begin(second_q)
        assert sink.pending(speaker.media_player) == 0
        await sink.chunk(second_q, sentence(second_q, 0, "新的。"))
        await sink.chunk(second_q, sentence(second_q, 1, "完了。", final=True))
        calls = await ha.wait_for_calls(3)
    assert [c.text for c in calls] == [TEN, "新的。", "完了。"]
    # The new answer did not wait for the cut-off old sentence to "finish".
    assert calls[1].at - calls[0].at < estimate_speech_s(TEN, CPS)


async def test_failing_service_is_logged_and_the_queue_goes_on(
    ha: FakeHomeAssistant,
    client: HomeAssistantClient,
    speaker: FakeSpeaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    q = question(speaker)
    ha.fail_service("xiaomi_miot", "intelligent_speaker", message="Cloud request failed")
    async with make_sink(client, merge_max_chars=3) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "第一。"))
        await ha.wait_for_calls(1)
        ha.heal_service("xiaomi_miot", "intelligent_speaker")
        await sink.chunk(q, sentence(q, 1, "第二。"))
        calls = await ha.wait_for_calls(2)
        await sink.wait_idle()
    assert [c.text for c in calls] == ["第一。", "第二。"]
    assert (sink.failed, sink.spoken) == (1, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Cloud request failed" in m and "home_assistant_error" in m for m in warnings)


async def test_error_inside_a_successful_response_is_logged(
    ha: FakeHomeAssistant,
    client: HomeAssistantClient,
    speaker: FakeSpeaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # hass-xiaomi-miot 1.1.0/1.1.1 returned its exception this way (issue #2691).
    ha.register_service(
        "xiaomi_miot",
        "intelligent_speaker",
        supports_response="optional",
        handler=lambda call: {"error": "'NoneType' object has no attribute 'update'"},
    )
    q = question(speaker)
    async with make_sink(client) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "你好。"))
        await sink.wait_idle()
    assert len(ha.calls) == 1
    assert sink.failed == 1
    assert any("NoneType" in r.getMessage() for r in caplog.records)


async def test_speak_service_without_responses_is_called_without_asking_for_one(
    ha: FakeHomeAssistant,
    client: HomeAssistantClient,
    speaker: FakeSpeaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # hass-xiaomi-miot before v0.7.18 registers its services without a response.
    ha.register_service("xiaomi_miot", "intelligent_speaker", supports_response="none")
    q = question(speaker)
    async with make_sink(client, merge_max_chars=3) as sink:
        await sink.begin(q)
        for seq, text in enumerate(["第一。", "第二。", "第三。"]):
            await sink.chunk(q, sentence(q, seq, text))
        await ha.wait_for_calls(4)
        await sink.wait_idle()
    refused, *spoken = speech(ha)
    assert refused.return_response is True
    (error,) = ha.errors_sent
    assert error["error"]["translation_key"] == "service_does_not_support_response"
    assert [(c.text, c.return_response) for c in spoken] == [
        ("第一。", False),
        ("第二。", False),
        ("第三。", False),
    ]
    assert (sink.spoken, sink.failed) == (3, 0)
    logged = [r for r in caplog.records if "does not support responses" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.WARNING


@pytest.mark.parametrize(
    ("code", "message", "refuses"),
    [
        # Home Assistant 2023.7 to 2023.12 raised a plain ValueError.
        (
            "unknown_error",
            "Invalid argument return_response=True when handler does not support responses",
            True,
        ),
        (
            "service_validation_error",
            "Validation error: A service which does not return responses can't be called "
            "with return_response=True",
            True,
        ),
        (
            "service_validation_error",
            "Validation error: An action which does not return responses can't be called "
            "with return_response=True",
            True,
        ),
        ("home_assistant_error", "Cloud request failed", False),
    ],
)
def test_refuses_responses_across_home_assistant_versions(
    code: str, message: str, *, refuses: bool
) -> None:
    assert refuses_responses(HomeAssistantCommandError(code, message)) is refuses


async def test_pause_xiaoai_and_acknowledge_at_begin(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    ha.set_player_state(speaker.media_player, "playing")
    q = question(speaker)
    async with make_sink(client, stop_xiaoai="pause", acknowledgement="让我想想") as sink:
        await sink.begin(q)
        pause, ack = await ha.wait_for_calls(2)
        await sink.chunk(q, sentence(q, 0, "答案。"))
        calls = await ha.wait_for_calls(3)
    assert (pause.domain, pause.service, pause.target) == (
        "media_player",
        "media_pause",
        {"entity_id": speaker.media_player},
    )
    assert ha.states[speaker.media_player]["state"] == "paused"
    assert ack.text == "让我想想"
    assert calls[2].text == "答案。"
    assert calls[2].at - ack.at >= estimate_speech_s("让我想想", CPS) - 0.005


async def test_player_reporting_done_releases_the_next_chunk_early(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    slow_cps = 10.0  # TEN would take 1 s by estimate

    def speaker_plays(call: RecordedCall) -> None:
        if call.service == "intelligent_speaker":
            ha.set_player_state(speaker.media_player, "playing")

    ha.service_hooks.append(speaker_plays)
    q = question(speaker)
    async with make_sink(client, chars_per_second=slow_cps, merge_max_chars=10) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN))
        await sink.chunk(q, sentence(q, 1, "下一句。"))
        await ha.wait_for_calls(1)
        await asyncio.sleep(0.05)
        ha.set_player_state(speaker.media_player, "idle")
        first, second = await ha.wait_for_calls(2)
    assert second.at - first.at < estimate_speech_s(TEN, slow_cps) / 2


async def test_two_speakers_are_paced_independently(
    ha: FakeHomeAssistant, client: HomeAssistantClient
) -> None:
    living, bedroom = ha.add_speaker("aaaa"), ha.add_speaker("bbbb")
    q_living, q_bedroom = question(living, "l1"), question(bedroom, "b1")
    async with make_sink(client, chars_per_second=10.0) as sink:
        await sink.begin(q_living)
        await sink.chunk(q_living, sentence(q_living, 0, TEN))  # 1 s by estimate
        await sink.begin(q_bedroom)
        await sink.chunk(q_bedroom, sentence(q_bedroom, 0, "卧室。"))
        first, second = await ha.wait_for_calls(2)
    assert {first.entity_id, second.entity_id} == {living.media_player, bedroom.media_player}
    assert second.at - first.at < 0.5


async def test_ha_restart_mid_answer_keeps_speaking_after_reconnect(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    q = question(speaker)
    async with make_sink(client) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "重启前。"))
        await ha.wait_for_calls(1)
        await sink.wait_idle()
        async with ha.down():
            await sink.chunk(q, sentence(q, 1, "重启后。", final=True))
        calls = await ha.wait_for_calls(2)
        await sink.wait_idle()
    assert [c.text for c in calls] == ["重启前。", "重启后。"]
    assert client.policy.reconnects == 1
    assert sink.failed == 0


async def test_notify_send_message_targets_the_mapped_entity(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    notify_entity = "notify.xiaomi_cn_123_lx06_play_text_a_5_1"
    q = question(speaker)
    sink = make_sink(
        client,
        speak=resolve_speak_service("notify.send_message"),
        speak_targets={speaker.media_player: notify_entity},
        follow_player_state=False,
    )
    async with sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "注意: yes"))
        (call,) = await ha.wait_for_calls(1)
    assert (call.domain, call.service) == ("notify", "send_message")
    assert call.target == {"entity_id": notify_entity}
    assert call.service_data == {"message": '["注意: yes"]'}
    assert call.return_response is False


def test_resolve_speak_service() -> None:
    assert resolve_speak_service("xiaomi_miot.intelligent_speaker") is INTELLIGENT_SPEAKER
    assert resolve_speak_service("notify.send_message") is NOTIFY_SEND_MESSAGE
    custom = resolve_speak_service("script.say", text_field="message", data={"volume": 0.4})
    assert custom.build("media_player.x", "你好") == (
        {"volume": 0.4, "message": "你好", "entity_id": "media_player.x"},
        None,
    )
    with pytest.raises(ValueError, match=r"domain\.service"):
        resolve_speak_service("intelligent_speaker")


def test_estimate_speech_s() -> None:
    assert estimate_speech_s("一二三四", 4.0) == pytest.approx(1.0)
    assert estimate_speech_s("一 二\n三四", 4.0, 0.5) == pytest.approx(1.5)
    assert estimate_speech_s("   ", 4.0, 0.5) == 0.0
