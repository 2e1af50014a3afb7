"""MIoT client against the fake cloud: signing, actions, properties, the model table."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.xiaomi_cloud import MIOT, FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi.auth import SID_MIOT, XiaomiAuth, cookie_header
from xiaoai_bridge.clients.xiaomi.errors import TokenExpiredError, XiaomiApiError
from xiaoai_bridge.clients.xiaomi.miot import (
    DEFAULT_SPEAKER_ACTIONS,
    SPEAKER_ACTIONS,
    MiotClient,
    SpeakerActions,
    hardware_of,
    is_known_model,
    make_nonce,
    signed_form,
    speaker_actions,
)


@pytest.fixture
def miot(cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, auth: XiaomiAuth) -> MiotClient:
    return MiotClient(session, auth, base_url=cloud.endpoints["miot"])


async def test_signed_action_is_accepted(cloud: FakeXiaomiCloud, miot: MiotClient) -> None:
    did = cloud.speaker.miot_did
    result = await miot.action(did, 5, 1, ["你好 世界"])

    assert result["code"] == 0
    (action,) = cloud.action_calls
    assert (action.did, action.siid, action.aiid, action.args) == (did, 5, 1, ["你好 世界"])
    (call,) = cloud.calls_to(MIOT)
    assert call.path == "/miotspec/action"
    assert set(call.form) == {"_nonce", "data", "signature"}
    assert json.loads(call.form["data"]) == {
        "params": {"did": did, "siid": 5, "aiid": 1, "in": ["你好 世界"]}
    }
    assert set(call.cookies) == {"userId", "serviceToken", "PassportDeviceId"}


async def test_tampered_signature_is_rejected_by_the_fake(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, auth: XiaomiAuth
) -> None:
    creds = await auth.credentials(SID_MIOT)
    data = json.dumps({"params": {"did": cloud.speaker.miot_did, "siid": 5, "aiid": 1, "in": []}})
    cookies = cookie_header(
        {
            "userId": creds.user_id,
            "serviceToken": creds.service_token,
            "PassportDeviceId": creds.device_id,
        }
    )
    url = cloud.endpoints["miot"] + "/miotspec/action"

    async def post(form: dict[str, str]) -> object:
        async with session.post(url, data=form, headers={"Cookie": cookies}) as resp:
            assert resp.status == 200
            return await resp.json()

    good = signed_form("/miotspec/action", data, creds.ssecurity, make_nonce())
    tampered = dict(good, _nonce=make_nonce())
    tampered["signature"] = good["signature"]
    flipped = base64.b64decode(good["signature"])
    forged = dict(
        signed_form("/miotspec/action", data, creds.ssecurity, make_nonce()),
        signature=base64.b64encode(bytes([flipped[0] ^ 1]) + flipped[1:]).decode(),
    )
    other_data = dict(good, data=data.replace('"aiid": 1', '"aiid": 3'))

    assert await post(tampered) == {"code": 0, "message": "invalid signature"}
    assert await post(forged) == {"code": 0, "message": "invalid signature"}
    assert await post(other_data) == {"code": 0, "message": "invalid signature"}
    assert cloud.action_calls == []
    accepted = await post(good)
    assert isinstance(accepted, dict)
    assert accepted["result"]["code"] == 0
    assert len(cloud.action_calls) == 1
    # The same nonce again is a replay.
    replay = await post(good)
    assert isinstance(replay, dict)
    assert replay["code"] == -1


def corrupt_ssecurity(path: Path) -> None:
    saved = json.loads(path.read_text())
    saved[SID_MIOT][0] = base64.b64encode(b"0123456789abcdef").decode()
    path.write_text(json.dumps(saved))


async def test_a_mismatched_ssecurity_is_fixed_by_one_relogin(
    cloud: FakeXiaomiCloud, miot: MiotClient, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await miot.wake_up(cloud.speaker.miot_did, DEFAULT_SPEAKER_ACTIONS)
    corrupt_ssecurity(tmp_path / "token.json")
    # A restarted process reads the cache; its ssecurity no longer matches the token.
    restarted = MiotClient(
        session,
        XiaomiAuth(
            session,
            account=cloud.account,
            password=cloud.password,
            token_path=tmp_path / "token.json",
            base_url=cloud.endpoints["account"],
        ),
        base_url=cloud.endpoints["miot"],
    )

    await restarted.wake_up(cloud.speaker.miot_did, DEFAULT_SPEAKER_ACTIONS)

    assert len(cloud.action_calls) == 2
    assert cloud.password_logins == 1


async def test_expired_token_relogs_in_and_the_action_still_runs(
    cloud: FakeXiaomiCloud, miot: MiotClient
) -> None:
    did = cloud.speaker.miot_did
    actions = speaker_actions("xiaomi.wifispeaker.lx06")
    await miot.play_text(did, actions, "一")
    cloud.expire_tokens()

    await miot.execute_text_directive(did, actions, "小爱同学")

    assert [(a.siid, a.aiid, a.args) for a in cloud.action_calls] == [
        (5, 1, ["一"]),
        (5, 5, ["小爱同学", True]),
    ]
    assert cloud.password_logins == 1


async def test_relogin_that_keeps_failing_gives_up(
    cloud: FakeXiaomiCloud, miot: MiotClient
) -> None:
    await miot.device_list()
    cloud.fail(MIOT, 401, times=2)
    with pytest.raises(TokenExpiredError):
        await miot.device_list()


async def test_properties_and_device_list(cloud: FakeXiaomiCloud, miot: MiotClient) -> None:
    did = cloud.speaker.miot_did
    await miot.set_property(did, 2, 1, 30)
    (value,) = await miot.get_properties(did, [(2, 1)])
    devices = await miot.device_list()

    assert (value.siid, value.piid, value.code, value.value) == (2, 1, 0, 30)
    assert [(d.did, d.model, d.online) for d in devices] == [(did, "xiaomi.wifispeaker.lx06", True)]
    oh2p = speaker_actions("OH2P")
    cloud.properties[(did, 3, 1)] = 1
    assert await miot.is_playing(did, oh2p) is True
    assert await miot.is_playing(did, speaker_actions("LX06")) is None


async def test_device_not_on_the_account(miot: MiotClient) -> None:
    with pytest.raises(XiaomiApiError) as caught:
        await miot.action("42", 5, 1, ["你好"])
    assert caught.value.api_code == -704010000
    assert "does not belong" in str(caught.value)


def test_action_table() -> None:
    assert hardware_of("xiaomi.wifispeaker.lx06") == "LX06"
    assert is_known_model("xiaomi.wifispeaker.oh2p")
    assert not is_known_model("xiaomi.wifispeaker.zz99")
    assert speaker_actions("zz99") == DEFAULT_SPEAKER_ACTIONS
    lx06, oh2p, l05c, l09a = (SPEAKER_ACTIONS[m] for m in ("LX06", "OH2P", "L05C", "L09A"))
    assert (lx06.play_text, lx06.wake_up, lx06.execute_text_directive) == ((5, 1), (5, 3), (5, 5))
    assert (oh2p.play_text, oh2p.wake_up, oh2p.execute_text_directive) == ((7, 3), (7, 1), (7, 4))
    assert (l05c.play_text, l05c.wake_up) == ((5, 3), (5, 1))
    assert l05c.prefer_miot_tts
    assert not l05c.reports_play_status
    assert l09a.silent_as_int
    override = SpeakerActions(play_text=(9, 9), wake_up=None, execute_text_directive=None)
    assert speaker_actions("xiaomi.wifispeaker.lx06", {"lx06": override}) == override


async def test_missing_action_is_reported(cloud: FakeXiaomiCloud, miot: MiotClient) -> None:
    with pytest.raises(XiaomiApiError, match="no wake-up action"):
        await miot.wake_up(cloud.speaker.miot_did, SPEAKER_ACTIONS["SM4"])
    assert cloud.calls_to(MIOT) == []


def test_nonce_layout() -> None:
    nonce = base64.b64decode(make_nonce(b"\x01" * 8, unix_time=600.0))
    assert nonce == b"\x01" * 8 + (10).to_bytes(4, "big")
