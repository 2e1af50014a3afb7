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


async def test_exposure_lists_stored_settings_only_as_core_does(
    ha: FakeHomeAssistant, socket: Socket
) -> None:
    ha.house.add_entity("light.kitchen", "on", name="Kitchen")
    ha.house.add_entity("light.porch", "off", name="Porch", expose=False)
    ha.house.add_entity("light.legacy", "off", registered=False)
    ha.house.add_entity("light.legacy_on", "off", registered=False, expose=True)
    listed = (await socket.command("homeassistant/expose_entity/list"))["result"]
    # Registered entities are listed with what is stored (nothing yet: {}); a legacy entity
    # only once something stored a setting for it.
    assert listed == {
        "exposed_entities": {
            "light.legacy_on": {"conversation": True},
            "light.kitchen": {},
            "light.porch": {"conversation": False},
        }
    }
    reply = await socket.command("homeassistant/expose_new_entities/get", assistant="conversation")
    assert reply["result"] == {"expose_new": True}
    reply = await socket.command("homeassistant/expose_new_entities/get", assistant="cloud.alexa")
    assert reply["result"] == {"expose_new": False}


async def test_admin_only_commands_answer_unauthorized_to_other_users() -> None:
    async with (
        FakeHomeAssistant(admin=False) as ha,
        aiohttp.ClientSession() as session,
        session.ws_connect(ha.ws_url) as ws,
    ):
        await ws.receive_json()
        await ws.send_json({"type": "auth", "access_token": DEFAULT_TOKEN})
        await ws.receive_json()
        socket = Socket(ws)
        reply = await socket.command("homeassistant/expose_entity/list")
        assert reply["success"] is False
        assert reply["error"] == {"code": "unauthorized", "message": "Unauthorized"}
        assert (await socket.command("auth/current_user"))["result"]["is_admin"] is False
        # Reading states and the registries needs no admin.
        assert (await socket.command("config/entity_registry/get_entries", entity_ids=[]))[
            "success"
        ]


async def test_registries_answer_in_cores_shapes(ha: FakeHomeAssistant, socket: Socket) -> None:
    area = ha.house.add_area("living_room", "客厅", aliases=["起居室"])
    device = ha.house.add_device("吊灯", area_id=area)
    ha.house.add_entity(
        "light.ceiling", "on", name="客厅灯", aliases=["大灯"], device_id=device, hidden=True
    )
    entries = (
        await socket.command(
            "config/entity_registry/get_entries", entity_ids=["light.ceiling", "light.none"]
        )
    )["result"]
    assert entries["light.none"] is None
    entry = entries["light.ceiling"]
    assert entry["aliases"] == ["大灯"]
    assert (entry["device_id"], entry["area_id"], entry["hidden_by"]) == (device, None, "user")
    assert {"capabilities", "device_class", "original_device_class", "unique_id"} <= set(entry)
    display = (await socket.command("config/entity_registry/list_for_display"))["result"]
    assert display["entity_categories"] == {"0": "config", "1": "diagnostic"}
    assert display["entities"] == [
        {"ei": "light.ceiling", "pl": "demo", "lb": [], "di": device, "hb": True}
    ]
    (listed,) = (await socket.command("config/area_registry/list"))["result"]
    assert (listed["area_id"], listed["name"], listed["aliases"]) == (area, "客厅", ["起居室"])
    (listed,) = (await socket.command("config/device_registry/list"))["result"]
    assert (listed["id"], listed["area_id"], listed["name_by_user"]) == (device, area, None)


async def test_services_change_states_and_fire_state_changed(
    ha: FakeHomeAssistant, socket: Socket
) -> None:
    ha.house.add_entity("light.kitchen", "off", name="Kitchen")
    await socket.command("subscribe_events", event_type="state_changed")
    await socket.ws.send_json(
        {
            "id": socket.next_id,
            "type": "call_service",
            "domain": "light",
            "service": "turn_on",
            "service_data": {"brightness_pct": 50},
            "target": {"entity_id": ["light.kitchen"]},
        }
    )
    event, result = await socket.receive(), await socket.receive()
    # As in core: the state is written while the service runs, before the result is sent.
    assert event["type"] == "event"
    assert event["event"]["data"]["new_state"]["state"] == "on"
    assert event["event"]["data"]["new_state"]["attributes"]["brightness"] == 128
    assert result["success"] is True
    assert set(result["result"]) == {"context"}


async def test_conversation_process_answers_like_assist(
    ha: FakeHomeAssistant, socket: Socket
) -> None:
    ha.house.agent = lambda text, language, agent_id: ("action_done", "已关闭")
    reply = await socket.command("conversation/process", text="关灯", language="zh-cn")
    result = reply["result"]
    assert result["response"]["speech"] == {"plain": {"speech": "已关闭", "extra_data": None}}
    assert result["response"]["response_type"] == "action_done"
    assert result["response"]["data"] == {"targets": [], "success": [], "failed": []}
    assert result["response"]["language"] == "zh-cn"
    assert isinstance(result["conversation_id"], str)
    assert result["continue_conversation"] is False
    reply = await socket.command("conversation/process")
    assert reply["error"]["code"] == "invalid_format"
