"""Xiaomi cloud sink against the fake cloud: silencing, pacing, cancelling, waking."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cloud_auth
from tests.fakes.xiaomi_cloud import MINA, FakeSpeaker, FakeXiaomiCloud, UbusCall
from xiaoai_bridge.clients.xiaomi import new_session
from xiaoai_bridge.clients.xiaomi.mina import MinaClient
from xiaoai_bridge.clients.xiaomi.miot import MiotClient, SpeakerActions
from xiaoai_bridge.models import Answer, Outcome, SpeechChunk, Utterance, XiaomiRoute
from xiaoai_bridge.pipeline.ports import Sink
from xiaoai_bridge.sinks.xiaomi import XiaomiSink
from xiaoai_bridge.spoken import estimate_speech_s

# Fast speech keeps the suite quick: the sink estimates 10 characters at 0.1 s, while the
# fake speaker reports "playing" for 0.3 s, so only the play status can pace correctly.
CPS = 100.0
SECONDS_PER_CHAR = 0.03
POLL_S = 0.02
TEN = "一二三四五六七八九十"
WAIT_S = 3.0


@dataclass
class Rig:
    cloud: FakeXiaomiCloud
    mina: MinaClient
    miot: MiotClient

    def sink(self, **options: Any) -> XiaomiSink:
        values: dict[str, Any] = {
            "chars_per_second": CPS,
            "speech_overhead_s": 0.0,
            "status_poll_interval_s": POLL_S,
            "status_grace_s": 0.2,
        }
        return XiaomiSink(self.mina, self.miot, **(values | options))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with FakeXiaomiCloud() as cloud, new_session() as session:
        cloud.seconds_per_char = SECONDS_PER_CHAR
        auth = cloud_auth(cloud, session, tmp_path / "token.json")
        yield Rig(
            cloud,
            MinaClient(session, auth, base_url=cloud.endpoints["mina"], timeout_s=0.5),
            MiotClient(session, auth, base_url=cloud.endpoints["miot"], timeout_s=0.5),
        )


def question(speaker: FakeSpeaker, qid: str = "q1") -> Utterance:
    """An utterance as the Xiaomi source makes it."""
    return Utterance(
        text="请问问题",
        device=speaker.device_id,
        id=qid,
        source="xiaomi",
        route=XiaomiRoute(
            device_id=speaker.device_id,
            hardware=speaker.hardware,
            miot_did=speaker.miot_did,
            name=speaker.name,
        ),
    )


def sentence(utterance: Utterance, seq: int, text: str, *, final: bool = False) -> SpeechChunk:
    return SpeechChunk(utterance.id, utterance.device, seq, text, final)


def done(utterance: Utterance, *, keep_listening: bool = False) -> Answer:
    return Answer(utterance, Outcome.ANSWERED, keep_listening=keep_listening)


async def wait_for(condition: Callable[[], bool], within_s: float = WAIT_S) -> None:
    """Poll `condition`: the fake cloud records calls but signals nothing."""
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def ubus(cloud: FakeXiaomiCloud, method: str) -> list[UbusCall]:
    return [call for call in cloud.ubus_calls if call.method == method]


def test_satisfies_the_sink_protocol(rig: Rig) -> None:
    sink: Sink = rig.sink()
    assert sink.name == "xiaomi"


def test_estimate_counts_spoken_characters() -> None:
    assert estimate_speech_s("一二 三\n", 3.0) == pytest.approx(1.0)
    assert estimate_speech_s("  ", 4.5) == 0.0


async def test_xiaoai_is_paused_before_the_first_tts(rig: Rig) -> None:
    cloud = rig.cloud
    speaker = cloud.speaker
    speaker.status = 1  # XiaoAi is busy answering the question itself
    q = question(speaker)
    async with rig.sink() as sink:
        await sink.begin(q)
        # begin only queues the pause: no call has reached the cloud when it returns.
        assert cloud.ubus_calls == []
        await sink.chunk(q, sentence(q, 0, "你好。", final=True))
        await wait_for(lambda: bool(cloud.tts_texts()))

    assert [call.method for call in cloud.ubus_calls[:3]] == [
        "player_play_operation",
        "player_get_play_status",
        "text_to_speech",
    ]
    # The pause took, so no stop was needed.
    assert cloud.player_operations() == ["pause"]
    (pause,) = ubus(cloud, "player_play_operation")
    (tts,) = ubus(cloud, "text_to_speech")
    assert pause.time < tts.time
    assert pause.message == {"action": "pause", "media": "app_ios"}
    assert tts.message == {"text": "你好。"}
    assert tts.device_id == speaker.device_id


async def test_speaker_without_play_status_is_also_stopped(rig: Rig) -> None:
    cloud = rig.cloud
    screen = cloud.add_speaker("触屏音箱", "X08E")  # reports no play status
    q = question(screen)
    async with rig.sink() as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "你好。", final=True))
        await wait_for(lambda: bool(cloud.tts_texts()))
    assert cloud.player_operations() == ["pause", "stop"]
    assert [call.method for call in cloud.ubus_calls] == [
        "player_play_operation",
        "player_play_operation",
        "text_to_speech",
    ]


async def test_next_sentence_waits_until_the_status_leaves_playing(rig: Rig) -> None:
    cloud = rig.cloud
    q = question(cloud.speaker)
    # A small merge limit keeps the two sentences apart (both are queued at once here).
    async with rig.sink(merge_max_chars=10) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN))
        await sink.chunk(q, sentence(q, 1, "后半句话。"))
        await wait_for(lambda: len(cloud.tts_texts()) == 2)

    first, second = ubus(cloud, "text_to_speech")
    played_s = len(TEN) * SECONDS_PER_CHAR
    gap = second.time - first.time
    # Longer than the 0.1 s estimate: it waited for the speaker, and not much longer.
    assert gap >= played_s
    assert gap < played_s + POLL_S + 0.1
    polls = [c for c in ubus(cloud, "player_get_play_status") if first.time < c.time < second.time]
    assert len(polls) >= 2
    assert cloud.tts_texts() == [TEN, "后半句话。"]


async def test_sentences_queued_meanwhile_are_merged(rig: Rig) -> None:
    cloud = rig.cloud
    q = question(cloud.speaker)
    async with rig.sink(merge_max_chars=8) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN))
        await wait_for(lambda: bool(cloud.tts_texts()))
        for seq, text in enumerate(["甲。", "乙。", "丙。", "丁。", "戊。"], start=1):
            await sink.chunk(q, sentence(q, seq, text))
        await wait_for(lambda: len(cloud.tts_texts()) == 3)
    assert cloud.tts_texts() == [TEN, "甲。乙。丙。丁。", "戊。"]


async def test_new_question_silences_at_once_and_drops_the_queued_rest(rig: Rig) -> None:
    cloud = rig.cloud
    cloud.seconds_per_char = 0.05  # TEN plays for 0.5 s
    first_q, second_q = question(cloud.speaker, "q1"), question(cloud.speaker, "q2")
    async with rig.sink(merge_max_chars=10) as sink:
        await sink.begin(first_q)
        await sink.chunk(first_q, sentence(first_q, 0, TEN))
        await sink.chunk(first_q, sentence(first_q, 1, "旧答案二。"))
        await sink.chunk(first_q, sentence(first_q, 2, "旧答案三。"))
        await wait_for(lambda: bool(cloud.tts_texts()))
        assert sink.pending(cloud.speaker.device_id) == 2

        asked_at = time.time()
        await sink.begin(second_q)
        assert sink.pending(cloud.speaker.device_id) == 0
        await sink.chunk(second_q, sentence(second_q, 0, "新答案。", final=True))
        await wait_for(lambda: len(cloud.tts_texts()) == 2)

    assert cloud.tts_texts() == [TEN, "新答案。"]
    second_pause = ubus(cloud, "player_play_operation")[1]
    # Paused right away, not after the old sentence had finished (0.5 s).
    assert second_pause.time - asked_at < 0.1
    assert second_pause.time < ubus(cloud, "text_to_speech")[1].time


async def test_keep_listening_wakes_the_speaker_after_the_last_sentence(rig: Rig) -> None:
    cloud = rig.cloud
    speaker = cloud.speaker
    q = question(speaker)
    async with rig.sink() as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN, final=True))
        await sink.end(done(q, keep_listening=True))
        await wait_for(lambda: bool(cloud.action_calls))
        await sink.wait_idle()

    (wake,) = cloud.action_calls
    # LX06's wake-up action is 5-3 and takes no arguments.
    assert (wake.did, wake.siid, wake.aiid, wake.args) == (speaker.miot_did, 5, 3, [])
    (tts,) = ubus(cloud, "text_to_speech")
    assert wake.time >= tts.time + len(TEN) * SECONDS_PER_CHAR


async def test_no_wake_without_keep_listening_or_after_a_new_question(rig: Rig) -> None:
    cloud = rig.cloud
    q1, q2, q3, q4 = (question(cloud.speaker, qid) for qid in ("q1", "q2", "q3", "q4"))
    async with rig.sink() as sink:
        await sink.begin(q1)
        await sink.chunk(q1, sentence(q1, 0, "好的。", final=True))
        await sink.end(done(q1))
        await sink.wait_idle()
        # The wake of q2 is still waiting for its sentence to end when q3 comes in.
        await sink.begin(q2)
        await sink.chunk(q2, sentence(q2, 0, TEN, final=True))
        await sink.end(done(q2, keep_listening=True))
        await wait_for(lambda: len(cloud.tts_texts()) == 2)
        await sink.begin(q3)
        await sink.chunk(q3, sentence(q3, 0, "好。", final=True))
        await sink.end(done(q3))
        # q4 was left to XiaoAi (never begun): its end must not wake the speaker either.
        await sink.end(Answer(q4, Outcome.IGNORED, keep_listening=True))
        await sink.wait_idle()
    assert cloud.tts_texts() == ["好的。", TEN, "好。"]
    assert cloud.action_calls == []


async def test_wake_by_text_directive_where_the_table_says_so(rig: Rig) -> None:
    cloud = rig.cloud
    q = question(cloud.speaker)
    directive_only = SpeakerActions(play_text=(5, 1), wake_up=None, execute_text_directive=(5, 5))
    async with rig.sink(models={"LX06": directive_only}) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "好的。", final=True))
        await sink.end(done(q, keep_listening=True))
        await wait_for(lambda: bool(cloud.action_calls))
    (wake,) = cloud.action_calls
    assert (wake.siid, wake.aiid, wake.args) == (5, 5, ["小爱同学", False])


async def test_miot_play_text_for_a_model_that_prefers_it(rig: Rig) -> None:
    cloud = rig.cloud
    play = cloud.add_speaker("小爱音箱Play", "L05B", miot_did="222333444")
    q = question(play)
    async with rig.sink(merge_max_chars=10) as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN))
        await sink.chunk(q, sentence(q, 1, "第二句。"))
        await wait_for(lambda: len(cloud.action_calls) == 2)

    first, second = cloud.action_calls
    # L05B speaks through MIoT play-text 5-3, never ubus text_to_speech.
    assert (first.did, first.siid, first.aiid, first.args) == (play.miot_did, 5, 3, [TEN])
    assert second.args == ["第二句。"]
    assert cloud.tts_texts() == []
    # No play status to read on this model: paced by the estimate alone.
    assert second.time - first.time >= estimate_speech_s(TEN, CPS)
    assert ubus(cloud, "player_get_play_status") == []


async def test_the_model_table_and_the_route_can_be_overridden(rig: Rig) -> None:
    cloud = rig.cloud
    play = cloud.add_speaker("小爱音箱Play", "L05B", miot_did="222333444")
    via_miot = SpeakerActions(
        play_text=(5, 1), wake_up=(5, 3), execute_text_directive=(5, 5), prefer_miot_tts=True
    )
    async with rig.sink(models={"lx06": via_miot}) as sink:
        q = question(cloud.speaker)
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "覆盖。", final=True))
        await wait_for(lambda: bool(cloud.action_calls))
    assert [(c.siid, c.aiid, c.args) for c in cloud.action_calls] == [(5, 1, ["覆盖。"])]

    async with rig.sink(tts="mina") as sink:
        q = question(play)
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "强制。", final=True))
        await wait_for(lambda: bool(cloud.tts_texts()))
    assert cloud.tts_texts() == ["强制。"]


async def test_token_expiry_mid_answer_still_speaks(rig: Rig) -> None:
    cloud = rig.cloud
    q = question(cloud.speaker)
    async with rig.sink() as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "第一句。"))
        await wait_for(lambda: bool(cloud.tts_texts()))
        cloud.expire_tokens()
        await sink.chunk(q, sentence(q, 1, "第二句。", final=True))
        await wait_for(lambda: len(cloud.tts_texts()) == 2)
    assert cloud.tts_texts() == ["第一句。", "第二句。"]
    assert 401 in [call.status for call in cloud.calls_to(MINA)]
    assert cloud.password_logins == 1  # the saved passToken did the re-login
    assert sink.failed == 0


async def test_cloud_error_is_logged_and_the_queue_goes_on(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    cloud = rig.cloud
    q = question(cloud.speaker)
    async with rig.sink(silence="none") as sink:
        await sink.begin(q)
        cloud.fail(MINA, 503)
        await sink.chunk(q, sentence(q, 0, "丢了。"))
        await wait_for(lambda: any(call.status == 503 for call in cloud.calls_to(MINA)))
        await sink.chunk(q, sentence(q, 1, "还在。", final=True))
        # The fake records the text on receipt; the sink counts it once the answer is back.
        await wait_for(lambda: bool(cloud.tts_texts()) and sink.spoken == 1)
    assert cloud.tts_texts() == ["还在。"]
    assert sink.failed == 1
    assert sink.spoken == 1
    assert any("failed" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


async def test_secrets_and_ids_stay_out_of_the_logs(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cloud = rig.cloud
    q = question(cloud.speaker)
    async with rig.sink() as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "第一句。"))
        await wait_for(lambda: bool(cloud.tts_texts()))
        cloud.expire_tokens()
        cloud.fail(MINA, 503)
        await sink.chunk(q, sentence(q, 1, "第二句。", final=True))
        await sink.end(done(q, keep_listening=True))
        await wait_for(lambda: bool(cloud.action_calls))

    text = caplog.text + json.dumps([r.args for r in caplog.records], default=str)
    secrets = [
        cloud.password,
        str(cloud.user_id),
        cloud.speaker.device_id,
        cloud.speaker.miot_did,
        *cloud.pass_tokens,
        *(call.cookies.get("serviceToken", "") for call in cloud.calls),
    ]
    for secret in filter(None, secrets):
        assert secret not in text
    assert "小爱音箱Pro" in caplog.text  # speakers are named by their name instead
