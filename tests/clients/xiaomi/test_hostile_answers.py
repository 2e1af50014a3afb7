"""Whatever the cloud answers, each client raises its own error (or copes) and keeps working."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import cloud_auth
from tests.fakes.xiaomi_cloud import (
    ACCOUNT,
    CONVERSATION,
    HOSTILE_BODIES,
    MINA,
    MIOT,
    FakeXiaomiCloud,
)
from xiaoai_bridge.clients.xiaomi.answers import MAX_ANSWER_BYTES
from xiaoai_bridge.clients.xiaomi.auth import SID_MINA, XiaomiAuth
from xiaoai_bridge.clients.xiaomi.conversation import ConversationClient, parse_conversation
from xiaoai_bridge.clients.xiaomi.errors import XiaomiApiError, XiaomiError, XiaomiNetworkError
from xiaoai_bridge.clients.xiaomi.mina import MinaClient, parse_play_status
from xiaoai_bridge.clients.xiaomi.miot import SPEAKER_ACTIONS, MiotClient

Operation = Callable[[], Awaitable[object]]


class Clients:
    def __init__(self, cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, auth: XiaomiAuth):
        self.cloud = cloud
        self.mina = MinaClient(session, auth, base_url=cloud.endpoints["mina"], timeout_s=2)
        self.conversation = ConversationClient(
            session, auth, base_url=cloud.endpoints["conversation"], timeout_s=2
        )
        self.miot = MiotClient(session, auth, base_url=cloud.endpoints["miot"], timeout_s=2)

    def operations(self) -> dict[str, tuple[str, Operation]]:
        speaker = self.cloud.speaker
        device, did = speaker.device_id, speaker.miot_did
        playing = SPEAKER_ACTIONS["L15A"]  # has a readable playing property
        return {
            "mina device_list": (MINA, self.mina.device_list),
            "mina play_status": (MINA, lambda: self.mina.play_status(device)),
            "mina text_to_speech": (MINA, lambda: self.mina.text_to_speech(device, "你好")),
            "conversation fetch": (
                CONVERSATION,
                lambda: self.conversation.fetch(device, speaker.hardware),
            ),
            "miot device_list": (MIOT, self.miot.device_list),
            "miot get_properties": (MIOT, lambda: self.miot.get_properties(did, [(3, 1)])),
            "miot action": (MIOT, lambda: self.miot.play_text(did, SPEAKER_ACTIONS["LX06"], "你")),
            "miot is_playing": (MIOT, lambda: self.miot.is_playing(did, playing)),
        }


@pytest.fixture
def clients(cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, auth: XiaomiAuth) -> Clients:
    return Clients(cloud, session, auth)


OPERATIONS = [
    "mina device_list",
    "mina play_status",
    "mina text_to_speech",
    "conversation fetch",
    "miot device_list",
    "miot get_properties",
    "miot action",
    "miot is_playing",
]


async def _outcome(operation: Operation) -> str:
    """ "ok", or the code of the client's own error; anything else fails the test."""
    try:
        await operation()
    except XiaomiError as err:
        return err.code
    return "ok"


@pytest.mark.parametrize("body", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize("name", OPERATIONS)
async def test_a_hostile_answer_is_an_error_of_the_client_and_the_next_call_works(
    clients: Clients, name: str, body: str
) -> None:
    service, operation = clients.operations()[name]
    await operation()  # logged in, so the hostile body reaches the service's parser
    clients.cloud.serve_raw(service, HOSTILE_BODIES[body])

    outcome = await _outcome(operation)

    assert clients.cloud.faults_pending == 0
    # "ok" where the answer holds nothing usable but is not wrong either (records skipped).
    assert outcome in {"api_error", "ok"}
    assert await _outcome(operation) == "ok"


@pytest.mark.parametrize("name", OPERATIONS)
async def test_a_body_cut_short_is_a_network_error(clients: Clients, name: str) -> None:
    service, operation = clients.operations()[name]
    await operation()
    clients.cloud.serve_raw(service, b'{"code":0,"message":"ok","da', cut_short=True)

    with pytest.raises(XiaomiNetworkError):
        await operation()
    assert await _outcome(operation) == "ok"


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_answer_past_the_size_limit_is_refused(
    cloud: FakeXiaomiCloud, clients: Clients, chunked: bool
) -> None:
    await clients.mina.device_list()
    # Valid JSON, so only its size is wrong; cut short, it arrives without a usable length.
    body = b'{"code":0,"data":[],"pad":"' + b"x" * MAX_ANSWER_BYTES + b'"}'
    cloud.serve_raw(MINA, body, cut_short=chunked)

    with pytest.raises(XiaomiApiError, match="too large"):
        await clients.mina.device_list()
    assert await clients.mina.device_list()


@pytest.mark.parametrize("body", sorted(HOSTILE_BODIES))
async def test_a_hostile_login_answer_is_an_error_of_the_client(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, tmp_path: Path, body: str
) -> None:
    auth = cloud_auth(cloud, session, tmp_path / "token.json")
    cloud.serve_raw(ACCOUNT, b"&&&START&&&" + HOSTILE_BODIES[body])

    with pytest.raises(XiaomiError):
        await auth.credentials(SID_MINA)
    assert (await auth.credentials(SID_MINA)).service_token


@pytest.mark.parametrize(
    "info", ["[" * 100_000 + "]" * 100_000, '{"status": ' * 50_000, "[1]", "\udcff", ""]
)
def test_play_status_info_of_any_kind_is_a_bad_response(info: str) -> None:
    with pytest.raises(XiaomiApiError) as caught:
        parse_play_status({"code": 0, "info": info})
    assert caught.value.api_code == "bad_response"


@pytest.mark.parametrize(
    "data", ["[" * 100_000 + "]" * 100_000, '{"records": ' * 50_000, "[1]", 5, None]
)
def test_conversation_data_of_any_kind_is_a_bad_response(data: object) -> None:
    with pytest.raises(XiaomiApiError) as caught:
        parse_conversation(json.dumps({"code": 0, "message": "ok", "data": data}))
    assert caught.value.api_code == "bad_response"
