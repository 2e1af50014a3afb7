"""MiNA client against the fake cloud: device list, ubus TTS/pause/status, token expiry."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.fakes.xiaomi_cloud import ACCOUNT, MINA, STS, FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi.auth import XiaomiAuth
from xiaoai_bridge.clients.xiaomi.errors import (
    XiaomiApiError,
    XiaomiNetworkError,
    XiaomiServerError,
    XiaomiUnavailableError,
)
from xiaoai_bridge.clients.xiaomi.mina import MinaClient, PlayState, parse_play_status


@pytest.fixture
def mina(cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, auth: XiaomiAuth) -> MinaClient:
    return MinaClient(session, auth, base_url=cloud.endpoints["mina"], timeout_s=0.3)


async def test_device_list(cloud: FakeXiaomiCloud, mina: MinaClient) -> None:
    second = cloud.add_speaker("卧室", "L05C", miot_did="987654321")
    second.presence = "offline"

    devices = await mina.device_list()

    assert [(d.name, d.hardware, d.miot_did, d.online) for d in devices] == [
        ("小爱音箱Pro", "LX06", "123456789", True),
        ("卧室", "L05C", "987654321", False),
    ]
    assert devices[0].device_id == cloud.speaker.device_id
    (call,) = cloud.calls_to(MINA)
    assert call.query["master"] == "0"
    assert call.query["requestId"].startswith("app_ios_")
    assert len(call.query["requestId"]) == len("app_ios_") + 30
    assert set(call.cookies) == {"userId", "serviceToken"}


async def test_tts_pause_and_status_go_through_ubus(
    cloud: FakeXiaomiCloud, mina: MinaClient
) -> None:
    cloud.seconds_per_char = 60.0  # still speaking when the status is read
    device = cloud.speaker.device_id

    await mina.text_to_speech(device, "你好，世界")
    playing = await mina.play_status(device)
    await mina.pause(device)
    paused = await mina.play_status(device)
    await mina.stop(device)

    assert cloud.tts_texts() == ["你好，世界"]
    assert cloud.player_operations() == ["pause", "stop"]
    assert playing.playing
    assert paused.status == PlayState.PAUSED
    assert paused.volume == 50
    # The wire format: form fields, the message a JSON string.
    tts_call = cloud.calls_to(MINA, "/remote/ubus")[0]
    assert tts_call.form["deviceId"] == device
    assert (tts_call.form["path"], tts_call.form["method"]) == ("mibrain", "text_to_speech")
    assert json.loads(tts_call.form["message"]) == {"text": "你好，世界"}
    assert tts_call.form["requestId"].startswith("app_ios_")
    pause_call = cloud.ubus_calls[2]
    assert pause_call.message == {"action": "pause", "media": "app_ios"}


async def test_status_leaves_playing_when_speech_ends(
    cloud: FakeXiaomiCloud, mina: MinaClient
) -> None:
    now = [1000.0]
    cloud.clock = lambda: now[0]
    cloud.seconds_per_char = 0.25
    device = cloud.speaker.device_id

    await mina.text_to_speech(device, "四个字呀")
    assert (await mina.play_status(device)).playing
    now[0] += 1.0
    assert (await mina.play_status(device)).status == PlayState.IDLE


def test_play_status_parsing() -> None:
    detail = json.dumps(
        {
            "status": 1,
            "volume": 30,
            "media_type": 3,
            "loop_type": 1,
            "play_song_detail": {"position": 1200, "duration": 5000},
        }
    )
    status = parse_play_status({"code": 0, "info": detail})
    assert (status.status, status.volume, status.media_type) == (1, 30, 3)
    assert (status.position_ms, status.duration_ms) == (1200, 5000)
    with pytest.raises(XiaomiApiError):
        parse_play_status({"code": 0, "info": "not json"})
    with pytest.raises(XiaomiApiError):
        parse_play_status({"mode": 0, "effect": 1})  # some ubus answers have no info at all


async def test_token_expiry_mid_session_relogs_in_and_keeps_the_request(
    cloud: FakeXiaomiCloud, mina: MinaClient
) -> None:
    device = cloud.speaker.device_id
    await mina.text_to_speech(device, "第一句")
    cloud.expire_tokens()

    await mina.text_to_speech(device, "第二句")

    assert cloud.tts_texts() == ["第一句", "第二句"]
    statuses = [call.status for call in cloud.calls_to(MINA)]
    assert statuses == [200, 401, 200]
    assert cloud.password_logins == 1  # the re-login used the passToken


async def test_concurrent_requests_share_one_relogin(
    cloud: FakeXiaomiCloud, mina: MinaClient
) -> None:
    device = cloud.speaker.device_id
    await mina.play_status(device)
    cloud.expire_tokens()
    sts_before = len(cloud.calls_to(STS))

    await asyncio.gather(*(mina.text_to_speech(device, f"句{i}") for i in range(3)))

    assert sorted(cloud.tts_texts()) == ["句0", "句1", "句2"]
    assert len(cloud.calls_to(STS)) == sts_before + 1
    assert len(cloud.calls_to(ACCOUNT, "/pass/serviceLogin")) == 2


async def test_unknown_device_is_an_api_error(mina: MinaClient) -> None:
    with pytest.raises(XiaomiApiError) as caught:
        await mina.pause("no-such-device")
    assert caught.value.api_code == 101


async def test_server_errors_and_timeouts_are_transient(
    cloud: FakeXiaomiCloud, mina: MinaClient
) -> None:
    device = cloud.speaker.device_id
    await mina.play_status(device)

    cloud.fail(MINA, 502)
    with pytest.raises(XiaomiServerError) as caught:
        await mina.text_to_speech(device, "一")
    assert isinstance(caught.value, XiaomiUnavailableError)
    assert caught.value.status == 502

    cloud.fail(MINA, 429)
    with pytest.raises(XiaomiServerError) as caught:
        await mina.text_to_speech(device, "二")
    assert caught.value.code == "rate_limited"

    cloud.stall(MINA)
    with pytest.raises(XiaomiNetworkError):
        await mina.text_to_speech(device, "三")

    await mina.text_to_speech(device, "四")
    assert cloud.tts_texts() == ["四"]
