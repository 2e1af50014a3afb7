"""The fake HA serves what Node-RED's HA nodes ask for, in Home Assistant's wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.fakes.homeassistant_server import DEFAULT_TOKEN, FakeHomeAssistant


class Socket:
    """An authenticated raw websocket with increasing ids."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 1

    async def command(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send one command and return its result message."""
        msg_id = self.next_id
        self.next_id += 1
        await self.ws.send_json({"id": msg_id, "type": kind, **fields})
        reply = await self.receive()
        assert reply["id"] == msg_id
        assert reply["type"] == "result"
        return reply

    async def receive(self) -> dict[str, Any]:
        """The next message (the fake does not coalesce for this client)."""
        data = await self.ws.receive_json(timeout=2)
        assert isinstance(data, dict)
        return data


@pytest.fixture
async def socket(ha: FakeHomeAssistant) -> AsyncIterator[Socket]:
    async with aiohttp.ClientSession() as session, session.ws_connect(ha.ws_url) as ws:
        assert (await ws.receive_json())["type"] == "auth_required"
        await ws.send_json({"type": "auth", "access_token": DEFAULT_TOKEN})
        assert (await ws.receive_json())["type"] == "auth_ok"
        yield Socket(ws)


async def test_current_user_is_an_admin(socket: Socket) -> None:
    user = (await socket.command("auth/current_user"))["result"]
    assert user["is_admin"] is True
    assert user["is_owner"] is True
    assert {"id", "name", "credentials", "mfa_modules"} <= set(user)


async def test_config_says_running_with_version_and_components(
    ha: FakeHomeAssistant, socket: Socket
) -> None:
    config = (await socket.command("get_config"))["result"]
    assert config["state"] == "RUNNING"
    assert config["version"] == ha.ha_version
    assert "websocket_api" in config["components"]
    assert "tag" not in config["components"]  # else clients also ask for tag/list
    assert set(config["unit_system"]) >= {"length", "temperature"}


async def test_services_describe_fields_targets_and_responses(socket: Socket) -> None:
    services = (await socket.command("get_services"))["result"]
    speaker = services["xiaomi_miot"]["intelligent_speaker"]
    assert speaker["response"] == {"optional": True}
    assert speaker["fields"]["entity_id"]["required"] is True
    assert "target" not in speaker  # the speaker is a field of this action
    pause = services["media_player"]["media_pause"]
    assert "response" not in pause
    assert pause["fields"] == {}
    assert pause["target"] == {"entity": [{"domain": ["media_player"]}]}


@pytest.mark.parametrize("name", ["area", "device", "entity", "floor", "label"])
async def test_registries_list_empty(socket: Socket, name: str) -> None:
    reply = await socket.command(f"config/{name}_registry/list")
    assert reply["success"] is True
    assert reply["result"] == []


async def test_subscribe_entities_sends_states_then_compressed_diffs(
    ha: FakeHomeAssistant, socket: Socket
) -> None:
    speaker = ha.add_speaker()
    reply = await socket.command("subscribe_entities")
    assert reply["result"] is None
    initial = await socket.receive()
    assert initial["id"] == reply["id"]
    added = initial["event"]["a"]
    assert set(added) == {speaker.sensor, speaker.media_player}
    sensor = added[speaker.sensor]
    state = ha.states[speaker.sensor]
    assert sensor["s"] == "unknown"
    assert sensor["a"] == state["attributes"]
    assert sensor["c"] == state["context"]["id"]  # a bare id: no parent, no user
    assert isinstance(sensor["lc"], float)

    # A new utterance: state, time, context and some attributes change.
    ha.set_conversation(speaker.sensor, "机器人讲个笑话")
    changed = (await socket.receive())["event"]["c"][speaker.sensor]
    new = ha.states[speaker.sensor]
    assert changed["+"]["s"] == "机器人讲个笑话"
    assert isinstance(changed["+"]["lc"], float)
    assert changed["+"]["c"] == new["context"]["id"]
    assert changed["+"]["a"]["content"] == "机器人讲个笑话"
    assert "friendly_name" not in changed["+"]["a"]  # unchanged attributes are left out
    assert "-" not in changed

    # Attributes only: last_updated moves, last_changed does not; removals are listed.
    attributes = dict(new["attributes"])
    del attributes["answers"]
    ha.set_state(speaker.sensor, new["state"], attributes)
    changed = (await socket.receive())["event"]["c"][speaker.sensor]
    assert "s" not in changed["+"]
    assert "lc" not in changed["+"]
    assert isinstance(changed["+"]["lu"], float)
    assert changed["-"] == {"a": ["answers"]}


async def test_subscribe_entities_filters_and_unsubscribes(
    ha: FakeHomeAssistant, socket: Socket
) -> None:
    speaker = ha.add_speaker()
    reply = await socket.command("subscribe_entities", entity_ids=[speaker.sensor])
    assert set((await socket.receive())["event"]["a"]) == {speaker.sensor}
    ha.set_player_state(speaker.media_player, "playing")  # not asked for: nothing sent
    ha.set_conversation(speaker.sensor, "你好")
    assert set((await socket.receive())["event"]["c"]) == {speaker.sensor}
    assert (await socket.command("unsubscribe_events", subscription=reply["id"]))["success"]
    ha.set_conversation(speaker.sensor, "再见")
    # Messages arrive in order: a pong with nothing before it means no event was sent.
    await socket.ws.send_json({"id": socket.next_id, "type": "ping"})
    assert await socket.receive() == {"id": socket.next_id, "type": "pong"}


async def test_http_requests_are_recorded(ha: FakeHomeAssistant, socket: Socket) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{ha.url}/api/") as response:
        assert response.status == 404  # no REST API in this fake
    assert ha.http_requests == ["GET /api/websocket", "GET /api/"]
