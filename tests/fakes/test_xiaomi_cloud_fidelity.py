"""The fake Xiaomi cloud speaks the real wire format: driven by the real MiService library.

MiService (`miservice-fork`, which xiaogpt uses, or Yonsm's `miservice` 3.x: both install
the same `miservice` package, so one of them is importable) hardcodes Xiaomi's HTTPS hosts.
The library is handed a session that sends those URLs to the fake on loopback instead and
refuses anything else, so nothing here leaves 127.0.0.1 and the library's code is unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.fakes.xiaomi_cloud import FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi import MinaClient, MiotClient, XiaomiAuth, new_session

# Untyped third-party code: Any from here on.
miservice: Any = pytest.importorskip("miservice", reason="the test extras install miservice-fork")
MiAccount, MiIOService, MiNAService = (
    miservice.MiAccount,
    miservice.MiIOService,
    miservice.MiNAService,
)

# Yonsm's 3.x has its own login UA constant and answers booleans/parsed dicts in places
# where the fork returns the raw cloud answer.
YONSM = hasattr(miservice.miaccount, "UA_LOGIN")
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# The fork logs its re-login with the deprecated `Logger.warn`.
RELOGIN_WARNING = "ignore:The 'warn' method is deprecated:DeprecationWarning"


class LoopbackSession:
    """The part of aiohttp's ClientSession MiService uses, with Xiaomi's hosts sent to the fake.

    A duck type rather than a ClientSession subclass, which aiohttp discourages.
    """

    def __init__(self, session: aiohttp.ClientSession, routes: dict[str, str]) -> None:
        self._session = session
        self._routes = routes  # "https://host[/prefix]" -> fake base URL
        self.urls: list[str] = []  # what the library asked for, before rewriting

    def _rewrite(self, url: str) -> str:
        self.urls.append(url)
        for prefix, base in self._routes.items():
            if url == prefix or url.startswith((prefix + "/", prefix + "?")):
                url = base + url[len(prefix) :]
                break
        host = urlsplit(url).hostname
        if host not in LOOPBACK:
            # The safety net: the library must never reach a real host from a test.
            msg = f"refusing to contact {host!r} from a test"
            raise RuntimeError(msg)
        return url

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        """Like ClientSession.request, to the fake."""
        return self._session.request(method, self._rewrite(str(url)), **kwargs)

    def get(self, url: str, **kwargs: Any) -> Any:
        """Like ClientSession.get, to the fake."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        """Like ClientSession.post, to the fake."""
        return self.request("POST", url, **kwargs)

    async def close(self) -> None:
        """The underlying session belongs to the test fixture."""


@pytest.fixture
async def cloud() -> AsyncIterator[FakeXiaomiCloud]:
    async with FakeXiaomiCloud() as fake:
        yield fake


@pytest.fixture
async def session(cloud: FakeXiaomiCloud) -> AsyncIterator[LoopbackSession]:
    base = cloud.endpoints
    routes = {
        "https://account.xiaomi.com": base["account"],
        "https://api2.mina.mi.com": base["mina"],
        "https://userprofile.mina.mi.com": base["conversation"],
        "https://api.io.mi.com/app": base["miot"],
    }
    async with aiohttp.ClientSession() as client:
        yield LoopbackSession(client, routes)


def _account(
    session: LoopbackSession, cloud: FakeXiaomiCloud, token_file: Path, password: str = ""
) -> Any:
    return MiAccount(session, cloud.account, password or cloud.password, str(token_file))


async def _play_status(mina: Any, device_id: str) -> int:
    answer = await mina.player_get_status(device_id)
    if YONSM:
        return int(answer["status"])
    # As xiaogpt reads it: `info` is a JSON string inside the ubus answer.
    return int(json.loads(answer["data"]["info"])["status"])


async def test_login_to_both_sids_writes_the_token_file(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    token_file = tmp_path / ".mi.token"
    account = _account(session, cloud, token_file)

    assert await account.login("micoapi") is True
    assert await account.login("xiaomiio") is True

    token = json.loads(token_file.read_text())
    assert re.fullmatch(r"[A-Z0-9]{16}", token["deviceId"])
    assert token["userId"] == cloud.user_id  # a JSON number, kept as an int
    assert token["passToken"] in cloud.pass_tokens
    for sid in ("micoapi", "xiaomiio"):
        ssecurity, service_token = token[sid]
        assert cloud.service_tokens[service_token] == (sid, ssecurity)
    # The second sid came from the passToken, not from the password again.
    assert cloud.password_logins == 1
    logins = cloud.calls_to("account", "/pass/serviceLogin")
    assert [call.query["sid"] for call in logins] == ["micoapi", "xiaomiio"]
    assert logins[1].cookies["passToken"] == token["passToken"]
    assert {call.cookies["deviceId"] for call in logins} == {token["deviceId"]}
    # Every URL the library built was a real Xiaomi one (or the STS location the fake gave).
    hosts = {urlsplit(url).hostname for url in session.urls}
    assert hosts == {"account.xiaomi.com", "127.0.0.1"}


async def test_wrong_password_fails_the_library_way(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    token_file = tmp_path / ".mi.token"
    account = _account(session, cloud, token_file, password="wrong password")

    # On 70016 from serviceLoginAuth2 MiService logs the answer and returns False.
    assert await account.login("micoapi") is False
    assert account.token is None
    assert not token_file.exists()
    assert cloud.password_logins == 1
    assert cloud.service_tokens == {}

    with pytest.raises(Exception, match="Login failed"):
        await MiNAService(account).device_list()


@pytest.mark.parametrize("failure", ["captcha", "verification"])
async def test_risk_control_fails_the_login(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path, failure: str
) -> None:
    cloud.login_failure = failure
    token_file = tmp_path / ".mi.token"
    account = _account(session, cloud, token_file)

    # 87001 has no `qs`, a 2FA answer no `userId`: MiService gives up with False either way.
    assert await account.login("micoapi") is False
    assert not token_file.exists()
    assert cloud.service_tokens == {}
    # Captcha stops before the password is sent; the 2FA answer comes after it.
    assert cloud.password_logins == (0 if failure == "captcha" else 1)


async def test_pasted_pass_token_logs_in_without_the_password(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    # What MiService's mi_token_gen.py writes from browser cookies: no service tokens yet.
    pass_token = "V1:pasted-from-the-browser"
    cloud.pass_tokens.add(pass_token)
    token_file = tmp_path / ".mi.token"
    token_file.write_text(
        json.dumps(
            {"deviceId": "ABCDEFGHIJ012345", "userId": cloud.user_id, "passToken": pass_token}
        )
    )
    account = _account(session, cloud, token_file, password="unknown")

    devices = await MiNAService(account).device_list()

    assert [device["deviceID"] for device in devices] == [cloud.speaker.device_id]
    assert cloud.password_logins == 0
    token = json.loads(token_file.read_text())
    assert token["passToken"] == pass_token  # a passToken login hands back the same one
    assert cloud.service_tokens[token["micoapi"][1]][0] == "micoapi"


async def test_mina_lists_speakers_speaks_and_pauses(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    second = cloud.add_speaker("卧室音箱", "L05C", miot_did="987654321")
    cloud.seconds_per_char = 10.0  # the fake speaker keeps playing the TTS
    mina = MiNAService(_account(session, cloud, tmp_path / ".mi.token"))

    devices = await mina.device_list()
    assert [(d["deviceID"], d["hardware"], d["name"]) for d in devices] == [
        (s.device_id, s.hardware, s.name) for s in cloud.speakers.values()
    ]
    assert [d["miotDID"] for d in devices] == ["123456789", "987654321"]

    device_id = cloud.speaker.device_id
    assert await _play_status(mina, device_id) == 0
    spoken = await mina.text_to_speech(device_id, "你好，我是测试")
    assert spoken is True if YONSM else spoken["code"] == 0
    assert await _play_status(mina, device_id) == 1
    assert await mina.player_pause(device_id)
    assert await _play_status(mina, device_id) == 2
    assert await mina.text_to_speech(second.device_id, "第二个")

    assert cloud.tts_texts() == ["你好，我是测试", "第二个"]
    assert cloud.tts_texts(second.device_id) == ["第二个"]
    assert cloud.player_operations(device_id) == ["pause"]
    ubus = cloud.calls_to("mina", "/remote/ubus")
    assert all(call.form["requestId"].startswith("app_ios_") for call in ubus)
    assert {call.form["path"] for call in ubus} == {"mibrain", "mediaplayer"}


async def test_mina_plays_a_url_with_the_api_the_model_needs(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    second = cloud.add_speaker("卧室音箱", "L05C")
    mina = MiNAService(_account(session, cloud, tmp_path / ".mi.token"))
    url = cloud.url + "/no-such-audio.mp3"  # the fake speaker fetches it from loopback

    await mina.play_by_url(cloud.speaker.device_id, url)
    await mina.play_by_url(second.device_id, url)

    methods = [call.method for call in cloud.ubus_calls]
    assert methods == ["player_play_url", "player_play_music"]
    assert cloud.played_urls() == [url, url]


@pytest.mark.filterwarnings(RELOGIN_WARNING)
async def test_expired_service_token_makes_the_library_log_in_again(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    account = _account(session, cloud, tmp_path / ".mi.token")
    mina = MiNAService(account)
    assert await mina.device_list()
    cloud.expire_tokens("micoapi")

    # The 401 HTML answer makes MiService drop its token and log in with the password.
    assert await mina.device_list()
    assert cloud.password_logins == 2
    statuses = [call.status for call in cloud.calls_to("mina", "/admin/v2/device_list")]
    assert statuses == [200, 401, 200]


async def test_miot_action_is_signed_the_way_the_fake_verifies(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    account = _account(session, cloud, tmp_path / ".mi.token")
    miio = MiIOService(account)
    did = cloud.speaker.miot_did

    assert await miio.miot_action(did, (5, 1), ["你好"]) == 0
    assert await miio.miot_action("555", (5, 1), ["你好"]) == -704010000
    action = cloud.action_calls[0]
    assert (action.did, action.siid, action.aiid, action.args) == (did, 5, 1, ["你好"])
    assert len(cloud.action_calls) == 1

    call = cloud.calls_to("miot", "/miotspec/action")[0]
    assert set(call.form) == {"_nonce", "data", "signature"}
    assert call.cookies["PassportDeviceId"] == account.token["deviceId"]
    ssecurity = account.token["xiaomiio"][0]
    assert cloud.signature_ok(
        "/miotspec/action",
        ssecurity,
        call.form["_nonce"],
        call.form["data"],
        call.form["signature"],
    )

    # Signed with the wrong ssecurity: the fake refuses, and the library raises.
    account.token["xiaomiio"] = ("AAAAAAAAAAAAAAAAAAAAAA==", account.token["xiaomiio"][1])
    with pytest.raises(Exception, match="/miotspec/action"):
        await miio.miot_action(did, (5, 1), ["再见"])
    assert len(cloud.action_calls) == 1


async def test_miot_device_list_and_properties(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    miio = MiIOService(_account(session, cloud, tmp_path / ".mi.token"))
    did = cloud.speaker.miot_did

    devices = await miio.device_list()
    assert [(d["did"], d["model"], d["name"]) for d in devices] == [
        (did, "xiaomi.wifispeaker.lx06", "小爱音箱Pro")
    ]
    assert re.fullmatch(r"[0-9a-f]{32}", devices[0]["token"])

    assert await miio.miot_set_props(did, [(2, 1, 30)]) == [0]
    assert await miio.miot_get_props(did, [(2, 1), (2, 2)]) == [30, None]
    assert cloud.properties[(did, 2, 1)] == 30


@pytest.mark.filterwarnings(RELOGIN_WARNING)
async def test_expired_miot_token_makes_the_library_log_in_again(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    miio = MiIOService(_account(session, cloud, tmp_path / ".mi.token"))
    did = cloud.speaker.miot_did
    assert await miio.miot_action(did, (5, 1), ["一"]) == 0
    cloud.expire_tokens("xiaomiio")

    # "auth err" in the message is MiService's cue to log in again.
    assert await miio.miot_action(did, (5, 1), ["二"]) == 0
    assert cloud.password_logins == 2
    assert [call.args for call in cloud.action_calls] == [["一"], ["二"]]


async def test_our_client_runs_on_the_token_file_the_library_wrote(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    token_file = tmp_path / ".mi.token"
    account = _account(session, cloud, token_file)
    assert await account.login("micoapi")
    assert await account.login("xiaomiio")
    calls_before = len(cloud.calls_to("account"))

    async with new_session() as http:
        auth = XiaomiAuth(http, token_path=token_file, base_url=cloud.endpoints["account"])
        mina = MinaClient(http, auth, base_url=cloud.endpoints["mina"])
        miot = MiotClient(http, auth, base_url=cloud.endpoints["miot"])
        devices = await mina.device_list()
        await miot.action(cloud.speaker.miot_did, 5, 1, ["你好"])

    assert [device.device_id for device in devices] == [cloud.speaker.device_id]
    assert auth.device_id == account.token["deviceId"]
    assert len(cloud.calls_to("account")) == calls_before  # no login of its own
    assert [call.args for call in cloud.action_calls] == [["你好"]]


async def test_the_library_runs_on_the_token_file_our_client_wrote(
    cloud: FakeXiaomiCloud, session: LoopbackSession, tmp_path: Path
) -> None:
    token_file = tmp_path / ".mi.token"
    async with new_session() as http:
        ours = XiaomiAuth(
            http,
            account=cloud.account,
            password=cloud.password,
            token_path=token_file,
            base_url=cloud.endpoints["account"],
        )
        await ours.login()
    calls_before = len(cloud.calls_to("account"))

    account = _account(session, cloud, token_file, password="not needed")
    devices = await MiNAService(account).device_list()
    assert await MiIOService(account).miot_action(cloud.speaker.miot_did, (5, 1), ["好"]) == 0

    assert [device["deviceID"] for device in devices] == [cloud.speaker.device_id]
    assert len(cloud.calls_to("account")) == calls_before
    assert cloud.calls_to("miot")[0].cookies["PassportDeviceId"] == ours.device_id


async def test_the_session_refuses_non_loopback_hosts(session: LoopbackSession) -> None:
    with pytest.raises(RuntimeError, match=r"miot-spec\.org"):
        session.get("http://miot-spec.org/miot-spec-v2/instances?status=all")
