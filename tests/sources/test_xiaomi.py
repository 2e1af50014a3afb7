"""Xiaomi cloud source against the fake cloud: records become utterances exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import cloud_auth
from tests.fakes.xiaomi_cloud import ACCOUNT, CONVERSATION, HOSTILE_BODIES, MINA, FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi import new_session
from xiaoai_bridge.clients.xiaomi.auth import XiaomiAuth
from xiaoai_bridge.clients.xiaomi.conversation import ConversationClient
from xiaoai_bridge.clients.xiaomi.mina import MinaClient, MinaDevice
from xiaoai_bridge.errors import ConfigError
from xiaoai_bridge.models import Utterance, XiaomiRoute
from xiaoai_bridge.reconnect import ConnectionState
from xiaoai_bridge.sources.base import Source
from xiaoai_bridge.sources.xiaomi import XiaomiSource, match_speakers, redact_id

POLL_S = 0.02
WAIT_S = 3.0


@dataclass
class Rig:
    """The fake cloud and real clients pointed at it."""

    cloud: FakeXiaomiCloud
    session: aiohttp.ClientSession
    auth: XiaomiAuth
    mina: MinaClient
    conversation: ConversationClient
    options: dict[str, Any] = field(default_factory=dict)

    def source(self, **options: Any) -> XiaomiSource:
        values: dict[str, Any] = {
            "poll_interval_s": POLL_S,
            "backoff_initial_s": 0.02,
            "backoff_max_s": 0.1,
            "auth_retry_s": 0.15,
            "rng": random.Random(7),  # noqa: S311  # jitter, seeded for repeatable runs
        }
        return XiaomiSource(self.mina, self.conversation, **(values | options))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with FakeXiaomiCloud() as cloud, new_session() as session:
        auth = cloud_auth(cloud, session, tmp_path / "token.json", relogin_cooldown_s=0.0)
        yield Rig(
            cloud,
            session,
            auth,
            MinaClient(session, auth, base_url=cloud.endpoints["mina"], timeout_s=0.5),
            ConversationClient(
                session, auth, base_url=cloud.endpoints["conversation"], timeout_s=0.3
            ),
        )


async def wait_for(condition: Callable[[], bool], within_s: float = WAIT_S) -> None:
    """Poll `condition`: the fake cloud records calls but signals nothing."""
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def listening(
    source: XiaomiSource, cloud: FakeXiaomiCloud
) -> AsyncIterator[asyncio.Queue[Utterance]]:
    """Run the source; yields once every polled speaker has been polled at least once."""
    heard: asyncio.Queue[Utterance] = asyncio.Queue()

    async def consume() -> None:
        async with contextlib.aclosing(source.utterances()) as stream:
            async for utterance in stream:
                heard.put_nowait(utterance)

    task = asyncio.create_task(consume())
    try:
        await wait_for(
            lambda: (
                task.done()
                or (bool(source.pollers) and all(p.polls for p in source.pollers.values()))
            )
        )
        if task.done():
            task.result()
        yield heard
    finally:
        task.cancel()
        await asyncio.wait([task])
    if not task.cancelled():
        task.result()  # the source ended by itself: surface its error


def route_name(utterance: Utterance) -> str:
    """The speaker's name as the Xiaomi source hands it to its sink."""
    assert isinstance(utterance.route, XiaomiRoute)
    return utterance.route.name


async def next_heard(heard: asyncio.Queue[Utterance], within_s: float = WAIT_S) -> Utterance:
    async with asyncio.timeout(within_s):
        return await heard.get()


async def polls_pass(cloud: FakeXiaomiCloud, count: int) -> None:
    """Let `count` more conversation-log requests happen."""
    target = len(cloud.calls_to(CONVERSATION)) + count
    await wait_for(lambda: len(cloud.calls_to(CONVERSATION)) >= target)


def test_satisfies_the_source_protocol(rig: Rig) -> None:
    source: Source = rig.source()
    assert source.name == "xiaomi"


async def test_new_record_is_yielded_once_with_its_speaker(rig: Rig) -> None:
    cloud = rig.cloud
    speaker = cloud.speaker
    source = rig.source()
    async with listening(source, cloud) as heard:
        record = cloud.say("请问今天天气怎么样", answer="今天晴")
        utterance = await next_heard(heard)
        await polls_pass(cloud, 5)
        assert heard.empty()

    assert utterance.text == "请问今天天气怎么样"
    assert utterance.source == "xiaomi"
    assert utterance.device == speaker.device_id
    assert utterance.id == record["requestId"]
    assert utterance.said_at == record["time"] / 1000
    assert utterance.route == XiaomiRoute(
        device_id=speaker.device_id,
        hardware="LX06",
        miot_did=speaker.miot_did,
        name="小爱音箱Pro",
    )
    assert utterance.xiaoai_answer == "今天晴"
    # The log is read for this speaker with the real query shape.
    call = cloud.calls_to(CONVERSATION)[-1]
    assert call.query == {"source": "dialogu", "hardware": "LX06", "limit": "2"}
    assert call.cookies["deviceId"] == speaker.device_id
    assert source.pollers[speaker.device_id].heard == 1
    assert source.pollers[speaker.device_id].policy.state is ConnectionState.STOPPED


async def test_records_from_before_the_start_are_ignored(rig: Rig) -> None:
    cloud = rig.cloud
    now_ms = int(time.time() * 1000)
    cloud.say("昨天说的", time_ms=now_ms - 86_400_000)
    cloud.say("刚刚说的", time_ms=now_ms - 500)
    async with listening(rig.source(), cloud) as heard:
        await polls_pass(cloud, 3)
        cloud.say("启动后说的")
        assert (await next_heard(heard)).text == "启动后说的"
        await polls_pass(cloud, 3)
        assert heard.empty()


async def test_three_records_between_two_polls_all_come_in_order(rig: Rig) -> None:
    cloud = rig.cloud
    async with listening(rig.source(), cloud) as heard:
        now_ms = int(time.time() * 1000)
        # No await in between: the three land between two polls.
        for offset, text in enumerate(("第一句", "第二句", "第三句")):
            cloud.say(text, time_ms=now_ms + offset)
        got = [(await next_heard(heard)).text for _ in range(3)]
        await polls_pass(cloud, 3)
        assert heard.empty()

    assert got == ["第一句", "第二句", "第三句"]
    # Two records fill the limit-2 page, so the source paged back for the third.
    assert any("timestamp" in call.query for call in cloud.calls_to(CONVERSATION))


async def test_two_speakers_are_polled_concurrently(rig: Rig) -> None:
    cloud = rig.cloud
    living = cloud.speaker
    bedroom = cloud.add_speaker("卧室音箱", "L06A", miot_did="555")
    source = rig.source()
    async with listening(source, cloud) as heard:
        cloud.say("请问客厅的问题", device_id=living.device_id)
        cloud.say("请问卧室的问题", device_id=bedroom.device_id)
        got = {}
        for _ in range(2):
            utterance = await next_heard(heard)
            got[utterance.text] = (utterance.device, route_name(utterance))

    assert got == {
        "请问客厅的问题": (living.device_id, "小爱音箱Pro"),
        "请问卧室的问题": (bedroom.device_id, "卧室音箱"),
    }
    polled = {call.cookies["deviceId"] for call in cloud.calls_to(CONVERSATION)}
    assert polled == {living.device_id, bedroom.device_id}
    assert set(source.health()["speakers"]) == {"小爱音箱Pro", "卧室音箱"}


async def test_speakers_are_jittered_apart(rig: Rig) -> None:
    cloud = rig.cloud
    second = cloud.add_speaker("卧室音箱", "L06A")
    async with listening(rig.source(poll_interval_s=0.05), cloud):
        await polls_pass(cloud, 12)
    times: dict[str, list[float]] = {}
    for call in cloud.calls_to(CONVERSATION):
        times.setdefault(call.cookies["deviceId"], []).append(call.time)
    first = times[cloud.speaker.device_id]
    first_gaps = [b - a for a, b in itertools.pairwise(first)]
    # Waits vary around the interval instead of repeating it exactly.
    assert max(first_gaps) - min(first_gaps) > 0.005
    assert times[second.device_id][0] != pytest.approx(first[0], abs=1e-4)


async def test_only_the_configured_speakers_are_polled(rig: Rig) -> None:
    cloud = rig.cloud
    bedroom = cloud.add_speaker("卧室音箱", "L06A")
    source = rig.source(speakers=["卧室音箱"])
    async with listening(source, cloud) as heard:
        cloud.say("客厅说的")
        cloud.say("卧室说的", device_id=bedroom.device_id)
        assert (await next_heard(heard)).text == "卧室说的"
        await polls_pass(cloud, 3)
        assert heard.empty()
    assert {call.cookies["deviceId"] for call in cloud.calls_to(CONVERSATION)} == {
        bedroom.device_id
    }
    assert [device.name for device in source.speakers] == ["卧室音箱"]


def test_match_speakers_by_name_alias_or_device_id() -> None:
    def device(device_id: str, name: str, alias: str) -> MinaDevice:
        return MinaDevice(device_id, name, alias, "LX06", "1", "sn", online=True)

    living = device("0f6b-aaaa", "小爱音箱Pro", "客厅")
    bedroom = device("77c1-bbbb", "Xiaomi Sound", "卧室")
    devices = [living, bedroom]

    assert match_speakers(devices, []) == devices
    assert match_speakers(devices, ["客厅"]) == [living]
    assert match_speakers(devices, ["xiaomi sound"]) == [bedroom]
    assert match_speakers(devices, ["77C1-BBBB", "卧室"]) == [bedroom]
    with pytest.raises(ConfigError) as caught:
        match_speakers(devices, ["书房"])
    assert "'书房'" in str(caught.value)
    assert "小爱音箱Pro" in str(caught.value)


async def test_unknown_configured_speaker_is_a_config_error(rig: Rig) -> None:
    source = rig.source(speakers=["书房"])
    with pytest.raises(ConfigError, match="书房"):
        async with contextlib.aclosing(source.utterances()) as stream:
            await anext(stream)


async def test_cloud_errors_back_off_without_crash_or_duplicates(rig: Rig) -> None:
    cloud = rig.cloud
    source = rig.source()
    async with listening(source, cloud) as heard:
        poller_policy = source.pollers[cloud.speaker.device_id].policy
        first = cloud.say("请问第一个")
        assert (await next_heard(heard)).text == "请问第一个"
        before = len(cloud.calls_to(CONVERSATION))
        cloud.fail(CONVERSATION, 503, times=2)
        cloud.fail(CONVERSATION, 429, times=1)
        cloud.stall(CONVERSATION, times=1)  # held until the client's 0.3 s timeout
        cloud.say("请问第二个")
        utterance = await next_heard(heard)
        await polls_pass(cloud, 3)
        assert heard.empty()
        assert source.health()["state"] == "connected"

    assert utterance.text == "请问第二个"
    assert utterance.id != first["requestId"]
    failed = cloud.calls_to(CONVERSATION)[before : before + 5]
    # The stalled request never got an answer (status 0): the client gave up on it.
    assert [call.status for call in failed] == [503, 503, 429, 0, 200]
    # Each retry waited longer than the one before (jittered, capped at backoff_max_s).
    gaps = [b.time - a.time for a, b in itertools.pairwise(failed[:3])]
    assert gaps[0] >= 0.01
    assert gaps[1] >= 0.02
    assert poller_policy.reconnects == 1
    assert poller_policy.last_error == "XiaomiNetworkError"


async def test_hostile_answers_are_backed_off_and_polling_goes_on(rig: Rig) -> None:
    cloud = rig.cloud
    for body in HOSTILE_BODIES.values():
        cloud.serve_raw(MINA, body)  # the speaker lookup first
    cloud.serve_raw(MINA, b'{"code":0,"data":[{"deviceID":', cut_short=True)
    source = rig.source(backoff_max_s=0.02)
    async with listening(source, cloud) as heard:
        policy = source.pollers[cloud.speaker.device_id].policy
        for body in HOSTILE_BODIES.values():
            cloud.serve_raw(CONVERSATION, body)
        cloud.serve_raw(CONVERSATION, b'{"code":0,"data":"{\\"rec', cut_short=True)
        await wait_for(lambda: cloud.faults_pending == 0)
        cloud.say("请问还在吗")
        utterance = await next_heard(heard)
        assert source.health()["state"] == "connected"

    assert utterance.text == "请问还在吗"
    assert source.discovery.failures == 0  # connected in the end
    assert source.discovery.reconnects == 1
    assert policy.reconnects >= 1


async def test_cloud_down_at_start_delays_the_speaker_lookup(rig: Rig) -> None:
    cloud = rig.cloud
    cloud.fail(MINA, 502, times=2)
    source = rig.source()
    async with listening(source, cloud) as heard:
        cloud.say("请问你好")
        assert (await next_heard(heard)).text == "请问你好"
    assert [call.status for call in cloud.calls_to(MINA, "/admin/v2/device_list")] == [
        502,
        502,
        200,
    ]
    assert source.discovery.reconnects == 1


async def test_token_expiry_mid_session_logs_in_again_and_still_yields(rig: Rig) -> None:
    cloud = rig.cloud
    async with listening(rig.source(), cloud) as heard:
        cloud.say("请问第一个")
        assert (await next_heard(heard)).text == "请问第一个"
        cloud.expire_tokens()
        cloud.say("请问第二个")
        assert (await next_heard(heard)).text == "请问第二个"
        await polls_pass(cloud, 3)
        assert heard.empty()
    assert 401 in [call.status for call in cloud.calls_to(CONVERSATION)]
    # Logged in again with the saved passToken, not the password.
    assert cloud.password_logins == 1
    assert len(cloud.calls_to(ACCOUNT, "/pass/serviceLogin")) == 2


async def test_auth_failure_is_retried_slowly(rig: Rig) -> None:
    cloud = rig.cloud
    source = rig.source(auth_retry_s=0.15)
    async with listening(source, cloud) as heard:
        policy = source.pollers[cloud.speaker.device_id].policy
        cloud.expire_tokens()
        cloud.expire_pass_tokens()
        cloud.login_failure = "invalid"
        await wait_for(lambda: policy.state is ConnectionState.RECONNECTING)
        rejected_at = cloud.calls_to(CONVERSATION)[-1].time
        cloud.login_failure = None
        cloud.say("请问恢复了吗")
        assert (await next_heard(heard)).text == "请问恢复了吗"
    next_try = next(c for c in cloud.calls_to(CONVERSATION) if c.time > rejected_at)
    assert next_try.time - rejected_at >= 0.15
    assert policy.last_error == "InvalidCredentialsError"


async def test_continuous_conversation_polls_faster(rig: Rig) -> None:
    cloud = rig.cloud
    device_id = cloud.speaker.device_id
    source = rig.source(poll_interval_s=0.1, continuous_poll_interval_s=0.01, jitter=0.0)

    def last_gap() -> float:
        *_, before, last = cloud.calls_to(CONVERSATION)
        return last.time - before.time

    async with listening(source, cloud):
        await polls_pass(cloud, 2)
        slow = last_gap()
        source.set_continuous(device_id, on=True)
        await polls_pass(cloud, 1)  # the slow wait in progress ends first
        await polls_pass(cloud, 3)
        fast = last_gap()
        assert source.health()["speakers"]["小爱音箱Pro"]["continuous"] is True
        # Lapses by itself: the pipeline's idle timeout ends it without telling anyone.
        source.set_continuous(device_id, on=True, for_s=0.03)
        await polls_pass(cloud, 5)
        lapsed = last_gap()
        assert source.health()["speakers"]["小爱音箱Pro"]["continuous"] is False
    assert slow >= 0.09
    assert fast < 0.05
    assert lapsed >= 0.09


async def test_secrets_and_ids_stay_out_of_the_logs(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cloud = rig.cloud
    async with listening(rig.source(), cloud) as heard:
        cloud.say("请问第一个")
        await next_heard(heard)
        cloud.expire_tokens()
        cloud.fail(CONVERSATION, 503, times=2)
        cloud.say("请问第二个")
        await next_heard(heard)

    text = caplog.text + json.dumps([r.args for r in caplog.records], default=str)
    secrets = [
        cloud.password,
        str(cloud.user_id),
        cloud.speaker.device_id,
        *cloud.pass_tokens,
        *(call.cookies.get("serviceToken", "") for call in cloud.calls if call.cookies),
    ]
    for secret in filter(None, secrets):
        assert secret not in text
    assert "connection restored" in caplog.text  # the logs did say something useful


def test_redact_id_keeps_only_a_tail() -> None:
    assert redact_id("0f6b2c1e-1234-4bcd-9f00-aa55aa55cafe") == "…cafe"
    assert redact_id("abc") == "…"
