"""Tests for the Home Assistant websocket client against the loopback fake HA."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from tests.fakes.homeassistant_server import DEFAULT_TOKEN, FakeHomeAssistant
from xiaoai_bridge.clients.homeassistant import (
    CONVERSATION_ENTITY_CLASS,
    EventStream,
    HassEvent,
    HomeAssistantAuthError,
    HomeAssistantClient,
    HomeAssistantCommandError,
    HomeAssistantConnection,
    HomeAssistantConnectionError,
    StreamItem,
    Subscribed,
    discover_conversation_sensors,
    probe,
    websocket_url,
)
from xiaoai_bridge.errors import BridgeError, ConfigError
from xiaoai_bridge.reconnect import ConnectionState, ReconnectPolicy

_LOGGER = logging.getLogger(__name__)


def fast_policy() -> ReconnectPolicy:
    return ReconnectPolicy(
        name="homeassistant", logger=_LOGGER, initial_delay_s=0.01, max_delay_s=0.05
    )


def make_client(
    ha: FakeHomeAssistant, token: str = DEFAULT_TOKEN, **kwargs: object
) -> HomeAssistantClient:
    options: dict[str, object] = {
        "policy": fast_policy(),
        "connect_timeout_s": 2.0,
        "command_timeout_s": 2.0,
    }
    options.update(kwargs)
    return HomeAssistantClient(ha.url, token, **options)  # type: ignore[arg-type]


def state_of(client: HomeAssistantClient) -> ConnectionState:
    """Read the state afresh (mypy would otherwise keep an earlier narrowing)."""
    return client.state


async def next_item(stream: EventStream, within_s: float = 2.0) -> StreamItem:
    async with asyncio.timeout(within_s):
        return await anext(stream)


async def next_event(stream: EventStream, within_s: float = 2.0) -> HassEvent:
    """The next HassEvent, skipping Subscribed markers."""
    async with asyncio.timeout(within_s):
        while True:
            item = await anext(stream)
            if isinstance(item, HassEvent):
                return item


def test_websocket_url_accepts_base_and_websocket_urls() -> None:
    assert str(websocket_url("http://ha.local:8123")) == "ws://ha.local:8123/api/websocket"
    assert str(websocket_url("https://ha.example/")) == "wss://ha.example/api/websocket"
    assert str(websocket_url("ws://ha:8123/api/websocket")) == "ws://ha:8123/api/websocket"
    with pytest.raises(ConfigError, match=r"homeassistant\.url"):
        websocket_url("mqtt://broker")


async def test_connection_authenticates(ha: FakeHomeAssistant) -> None:
    async with HomeAssistantConnection(ha.url, DEFAULT_TOKEN) as conn:
        assert conn.ha_version == ha.ha_version
        await conn.ping()
        assert not conn.closed
    assert ha.connections == 1
    assert ha.auth_failures == 0


async def test_wrong_token_is_a_distinct_fatal_error_without_retries(
    ha: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "wrong-secret-token-value"
    with pytest.raises(HomeAssistantAuthError, match="rejected the access token") as info:
        async with HomeAssistantConnection(ha.url, secret):
            pass
    assert isinstance(info.value, BridgeError)

    backoffs: list[float] = []

    async def no_sleep(delay: float) -> None:
        backoffs.append(delay)

    client = make_client(ha, token=secret, sleep=no_sleep)
    with pytest.raises(HomeAssistantAuthError):
        async with client:
            pass
    assert client.state is ConnectionState.FAILED
    assert backoffs == []  # no retry was even scheduled: the client stopped (and was closed)
    assert ha.auth_attempts == 2
    assert ha.connections == 0
    assert all(secret not in record.getMessage() for record in caplog.records)


async def test_token_never_logged_on_success(
    ha: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with make_client(ha) as client:
        await client.call_service("notify", "send_message", {"message": "hi"})
    assert caplog.records
    assert all(DEFAULT_TOKEN not in record.getMessage() for record in caplog.records)


async def test_ids_strictly_increase_under_concurrency(ha: FakeHomeAssistant) -> None:
    async with HomeAssistantConnection(ha.url, DEFAULT_TOKEN) as conn:
        await asyncio.gather(
            *(conn.ping() for _ in range(20)),
            *(conn.get_states() for _ in range(10)),
            *(conn.call_service("notify", "send_message", {"message": str(i)}) for i in range(10)),
        )
    ids = [msg["id"] for msg in ha.received]
    assert len(ids) == 41  # supported_features + 40 commands
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert not any(err["error"]["code"] == "id_reuse" for err in ha.errors_sent)


async def test_fake_rejects_reused_ids(ha: FakeHomeAssistant) -> None:
    """Guard the fake itself: a reused or lower id gets HA's id_reuse error."""
    async with aiohttp.ClientSession() as session, session.ws_connect(ha.ws_url) as ws:
        assert (await ws.receive_json())["type"] == "auth_required"
        await ws.send_json({"type": "auth", "access_token": DEFAULT_TOKEN})
        assert (await ws.receive_json())["type"] == "auth_ok"
        await ws.send_json({"id": 5, "type": "ping"})
        assert await ws.receive_json() == {"id": 5, "type": "pong"}
        for reused in (5, 3):
            await ws.send_json({"id": reused, "type": "ping"})
            assert await ws.receive_json() == {
                "id": reused,
                "type": "result",
                "success": False,
                "error": {"code": "id_reuse", "message": "Identifier values have to increase."},
            }
        await ws.send_json({"id": 6, "type": "no_such_command"})
        reply = await ws.receive_json()
        assert reply["error"]["code"] == "unknown_command"


async def test_coalesced_array_frames_are_parsed(ha: FakeHomeAssistant) -> None:
    async with make_client(ha) as client, client.subscribe_events() as stream:
        assert await next_item(stream) == Subscribed(reconnected=False)
        # Fired back to back, HA's writer sends them as one JSON array.
        for i in range(5):
            ha.set_state("input_number.n", str(i))
        seen = [(await next_event(stream)).data["new_state"]["state"] for _ in range(5)]
    assert seen == ["0", "1", "2", "3", "4"]
    assert ha.array_frames_sent >= 1


async def test_no_arrays_without_the_feature() -> None:
    async with FakeHomeAssistant(supports_coalescing=False) as ha:
        async with make_client(ha) as client, client.subscribe_events() as stream:
            for i in range(3):
                ha.set_state("input_number.n", str(i))
            seen = [(await next_event(stream)).data["new_state"]["state"] for _ in range(3)]
        assert seen == ["0", "1", "2"]
        assert ha.array_frames_sent == 0


async def test_events_stream_state_changed_with_real_state_shape(ha: FakeHomeAssistant) -> None:
    speaker = ha.add_speaker()
    async with make_client(ha) as client, client.subscribe_events() as stream:
        ha.set_conversation(speaker.sensor, "机器人你好")
        event = await next_event(stream)
    assert event.event_type == "state_changed"
    assert event.origin == "LOCAL"
    assert event.data["entity_id"] == speaker.sensor
    new_state = event.data["new_state"]
    assert set(new_state) >= {
        "entity_id",
        "state",
        "attributes",
        "last_changed",
        "last_updated",
        "context",
    }
    assert new_state["state"] == "机器人你好"
    assert new_state["attributes"]["entity_class"] == CONVERSATION_ENTITY_CLASS
    assert event.data["old_state"]["state"] == "unknown"


async def test_restart_reconnects_resubscribes_and_events_continue(
    ha: FakeHomeAssistant,
) -> None:
    async with make_client(ha) as client, client.subscribe_events() as stream:
        assert await next_item(stream) == Subscribed(reconnected=False)
        ha.set_state("sensor.a", "1")
        assert (await next_event(stream)).data["new_state"]["state"] == "1"

        await ha.restart()
        assert await next_item(stream) == Subscribed(reconnected=True)
        ha.set_state("sensor.a", "2")
        assert (await next_event(stream)).data["new_state"]["state"] == "2"
        assert client.state is ConnectionState.CONNECTED
        assert client.policy.reconnects == 1
        assert ha.connections == 2
        assert ha.client_count == 1


async def test_down_at_start_is_retried_in_background() -> None:
    async with FakeHomeAssistant() as ha:
        await ha.stop()
        client = make_client(ha, connect_timeout_s=0.5)
        async with client:
            assert client.state is ConnectionState.RECONNECTING
            assert not client.connected
            await ha.start()
            await client.wait_connected(2.0)
            assert state_of(client) is ConnectionState.CONNECTED


async def test_call_service_success_and_errors(ha: FakeHomeAssistant) -> None:
    speaker = ha.add_speaker()
    async with make_client(ha) as client:
        response = await client.call_service(
            "xiaomi_miot",
            "intelligent_speaker",
            {"entity_id": speaker.media_player, "text": "你好", "execute": False, "silent": False},
            return_response=True,
        )
        assert response["code"] == 0
        assert (
            await client.call_service(
                "media_player", "media_pause", target={"entity_id": speaker.media_player}
            )
            is None
        )
        assert ha.states[speaker.media_player]["state"] == "paused"

        ha.fail_service("xiaomi_miot", "intelligent_speaker", message="Cloud request failed")
        with pytest.raises(HomeAssistantCommandError) as info:
            await client.call_service(
                "xiaomi_miot",
                "intelligent_speaker",
                {"entity_id": speaker.media_player, "text": "x"},
            )
        assert info.value.code == "home_assistant_error"
        assert info.value.message == "Cloud request failed"

        with pytest.raises(HomeAssistantCommandError) as info:
            await client.call_service("nope", "missing")
        assert info.value.code == "not_found"
        assert "nope.missing" in info.value.message
        # The connection survives error results.
        assert client.connected

    first = ha.calls[0]
    assert (first.domain, first.service, first.return_response) == (
        "xiaomi_miot",
        "intelligent_speaker",
        True,
    )
    assert first.service_data["text"] == "你好"
    assert ha.calls[1].target == {"entity_id": speaker.media_player}


async def test_any_command_on_the_live_connection(ha: FakeHomeAssistant) -> None:
    async with make_client(ha) as client:
        reply = await client.command(
            {"type": "homeassistant/expose_new_entities/get", "assistant": "conversation"}
        )
        assert reply == {"expose_new": True}
        with pytest.raises(HomeAssistantCommandError) as info:
            await client.command({"type": "no/such/command"})
        assert info.value.code == "unknown_command"
        ha.admin = False
        with pytest.raises(HomeAssistantCommandError) as info:
            await client.command({"type": "homeassistant/expose_entity/list"})
        assert info.value.code == "unauthorized"


async def test_discovers_conversation_sensors(ha: FakeHomeAssistant) -> None:
    living = ha.add_speaker("dea6", model="lx06")
    bedroom = ha.add_speaker("5996", model="l06a")
    ha.set_state("sensor.temperature", "21.5", {"unit_of_measurement": "°C"})
    async with make_client(ha) as client:
        speakers = await client.discover_speakers()
    assert [(s.entity_id, s.media_player) for s in speakers] == sorted(
        [
            (living.sensor, living.media_player),
            (bedroom.sensor, bedroom.media_player),
        ]
    )
    assert speakers[0].friendly_name.endswith("conversation")
    assert discover_conversation_sensors([{"entity_id": "sensor.x", "state": "1"}]) == []


async def test_missing_pong_declares_connection_dead(
    ha: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    ha.respond_to_pings = False
    async with (
        make_client(ha, heartbeat_interval_s=0.03, heartbeat_timeout_s=0.03) as client,
        client.subscribe_events() as stream,
    ):
        assert await next_item(stream) == Subscribed(reconnected=False)
        assert await next_item(stream) == Subscribed(reconnected=True)
    assert ha.connections >= 2
    assert any("no pong" in record.getMessage() for record in caplog.records)


async def test_slow_client_is_dropped_and_reconnects() -> None:
    async with (
        FakeHomeAssistant(max_pending=8) as ha,
        make_client(ha) as client,
        client.subscribe_events() as stream,
    ):
        assert await next_item(stream) == Subscribed(reconnected=False)
        ha.pause_writes()
        for i in range(20):
            ha.set_state("sensor.flood", str(i))
        ha.resume_writes()
        assert ha.clients_dropped == 1
        while not isinstance(item := await next_item(stream), Subscribed):
            pass
        assert item == Subscribed(reconnected=True)
        ha.set_state("sensor.flood", "after")
        assert (await next_event(stream)).data["new_state"]["state"] == "after"


async def test_commands_fail_fast_when_connection_is_lost(ha: FakeHomeAssistant) -> None:
    async with HomeAssistantConnection(ha.url, DEFAULT_TOKEN) as conn:
        await ha.drop_clients()
        error = await asyncio.wait_for(conn.wait_closed(), 2.0)
        assert isinstance(error, HomeAssistantConnectionError)
        with pytest.raises(HomeAssistantConnectionError):
            await conn.ping()


async def test_auth_error_ends_streams(ha: FakeHomeAssistant) -> None:
    client = make_client(ha, token="bad")
    with pytest.raises(HomeAssistantAuthError):
        await client.start()
    stream = client.subscribe_events()
    with pytest.raises(HomeAssistantAuthError):
        await next_item(stream)
    with pytest.raises(HomeAssistantAuthError):
        await client.call_service("notify", "send_message", {"message": "x"})
    await client.aclose()


def test_event_from_wire_tolerates_missing_fields() -> None:
    event = HassEvent.from_wire(json.loads('{"event_type": "x"}'))
    assert event == HassEvent(event_type="x", data={})


async def test_probe_lists_speakers_once(ha: FakeHomeAssistant) -> None:
    speaker = ha.add_speaker()
    result = await probe(ha.url, DEFAULT_TOKEN, timeout_s=2.0)
    assert result.ha_version == ha.ha_version
    assert [(s.entity_id, s.media_player) for s in result.speakers] == [
        (speaker.sensor, speaker.media_player)
    ]
    with pytest.raises(HomeAssistantAuthError):
        await probe(ha.url, "bad-token", timeout_s=2.0)
    await ha.stop()
    with pytest.raises(HomeAssistantConnectionError, match="cannot connect"):
        await probe(ha.url, DEFAULT_TOKEN, timeout_s=2.0)


async def test_connection_level_subscribe_and_unsubscribe(ha: FakeHomeAssistant) -> None:
    seen: list[str] = []
    async with HomeAssistantConnection(ha.url, DEFAULT_TOKEN) as conn:
        subscription = await conn.subscribe_events(
            "state_changed", lambda event: seen.append(event["data"]["new_state"]["state"])
        )
        ha.set_state("sensor.a", "1")
        await conn.ping()  # the event was written before the pong
        await conn.unsubscribe_events(subscription)
        ha.set_state("sensor.a", "2")
        await conn.ping()
        with pytest.raises(HomeAssistantCommandError) as info:
            await conn.unsubscribe_events(subscription)
        assert info.value.code == "not_found"
    assert seen == ["1"]


async def test_watched_entities_stream_as_state_changed_and_nothing_else(
    ha: FakeHomeAssistant,
) -> None:
    speaker = ha.add_speaker()
    ha.set_state("sensor.power", "1")
    async with make_client(ha, event_types=()) as client, client.subscribe_events() as stream:
        assert await next_item(stream) == Subscribed(reconnected=False)
        initial = await client.watch_entities([speaker.sensor, "Not An Entity"])
        assert [state["entity_id"] for state in initial] == [speaker.sensor]
        assert initial[0]["attributes"] == ha.states[speaker.sensor]["attributes"]
        assert await client.watch_entities([speaker.sensor]) == []  # already watched
        for i in range(50):
            ha.set_state("sensor.power", str(i))
        ha.set_conversation(speaker.sensor, "机器人你好")
        event = await next_event(stream)
    assert event.event_type == "state_changed"
    assert event.data["entity_id"] == speaker.sensor
    assert event.data["old_state"]["state"] == "unknown"
    expected = {k: v for k, v in ha.states[speaker.sensor].items() if k != "last_reported"}
    assert event.data["new_state"] == expected
    assert ha.entity_messages_sent["sensor.power"] == 0
    assert client.watched == {speaker.sensor}


async def test_watched_entities_are_resubscribed_after_a_restart(ha: FakeHomeAssistant) -> None:
    async with make_client(ha, event_types=()) as client, client.subscribe_events() as stream:
        await client.watch_entities(["sensor.a"])  # not there yet: it appears later
        ha.set_state("sensor.a", "1")
        first = await next_event(stream)
        assert (first.data["old_state"], first.data["new_state"]["state"]) == (None, "1")
        await ha.restart()
        assert await next_item(stream) == Subscribed(reconnected=True)
        assert ha.watched == {"sensor.a"}
        ha.set_state("sensor.a", "2", {"unit": "W"})
        ha.set_state("sensor.a", "2")  # an attribute removed
        added, removed = await next_event(stream), await next_event(stream)
        del ha.states["sensor.a"]
        ha.fire_event(
            "state_changed", {"entity_id": "sensor.a", "old_state": None, "new_state": None}
        )
        gone = await next_event(stream)
    assert added.data["new_state"]["attributes"] == {"unit": "W"}
    assert removed.data["new_state"]["attributes"] == {}
    assert gone.data["new_state"] is None


HOSTILE_FRAMES = [
    "[" * 100_000,  # cut short, deeply nested
    "[" * 5_000 + "]" * 5_000,  # valid JSON nested past the recursion limit
    "42",
    '"text"',
    "null",
    '[1, "x", null, []]',
    '{"id": true, "type": "result", "success": true, "result": null}',
    '{"id": 1.5, "type": "event", "event": {}}',
    '{"id": [], "type": {"a": 1}}',
    "not json at all",
]
HOSTILE_ENTITY_EVENTS = [
    "[]",
    '"a"',
    '{"c": []}',
    '{"a": {"sensor.a": {"s": {"x": 1}, "lc": 1}}}',
    '{"a": {"sensor.a": {"s": "on", "lc": 1e999}}}',
    '{"c": {"sensor.a": {"+": {"s": 5, "lu": "x"}, "-": {"a": 7}}}}',
    '{"r": 5}',
]


async def test_hostile_frames_are_refused_in_words_and_events_go_on(
    ha: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    ha.set_state("sensor.a", "0")
    async with make_client(ha, event_types=()) as client, client.subscribe_events() as stream:
        await client.watch_entities(["sensor.a"])
        for frame in HOSTILE_FRAMES:
            await ha.send_raw(frame)
        await ha.send_raw(b"\x00\x01", binary=True)
        for body in HOSTILE_ENTITY_EVENTS:
            await ha.send_entity_event(body)
        ha.set_state("sensor.a", "1")
        event = await next_event(stream)
        assert event.data["new_state"]["state"] == "1"
        await client.wait_connected()  # still the same connection: nothing made it drop
        assert ha.connections == 1
        # Invalid UTF-8 in a text frame breaks the websocket protocol: a reconnect.
        await ha.send_raw(b'{"id": 1, "type": "\xff"}')
        assert await next_item(stream) == Subscribed(reconnected=True)
        ha.set_state("sensor.a", "2")
        assert (await next_event(stream)).data["new_state"]["state"] == "2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("nested too deeply" in message for message in warnings)
    assert any("binary frame" in message for message in warnings)
    assert any("subscribe_entities" in message for message in warnings)
