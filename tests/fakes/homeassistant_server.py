"""Loopback fake of Home Assistant's websocket API, speaking its exact wire format."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Literal, Self

from aiohttp import WSCloseCode, WSMsgType, web

from tests.fakes.homeassistant_house import ADMIN_ONLY, HOUSE_SERVICES, CommandFailed, FakeHouse

HOST = "127.0.0.1"
WEBSOCKET_PATH = "/api/websocket"
DEFAULT_TOKEN = "test-long-lived-access-token"
HA_VERSION = "2026.7.2"
# core websocket_api/const.py MAX_PENDING_MSG: a client this far behind is dropped.
MAX_PENDING_MSG = 4096
# hass-xiaomi-miot writes `timestamp` in the local zone; China is UTC+8.
LOCAL_ZONE = timezone(timedelta(hours=8))
CONVERSATION_ENTITY_CLASS = "XiaoaiConversationSensor"
AUTH_TIMEOUT_S = 10.0
# Integrations `get_config` lists. No "tag" and no "nodered": Node-RED's HA nodes would then
# also ask for `tag/list` and `nodered/version`, which this fake does not serve.
COMPONENTS = ("api", "http", "media_player", "notify", "sensor", "text", "websocket_api")
# `config/*_registry/list` commands; the house (homeassistant_house.py) serves the area, device
# and entity registries, the others are empty here.
REGISTRY_LISTS = frozenset(
    f"config/{name}_registry/list" for name in ("area", "device", "entity", "floor", "label")
)
# hass-xiaomi-miot's services.yaml for intelligent_speaker: the speaker is a field, not a target.
SPEAKER_FIELDS: dict[str, Any] = {
    "entity_id": {
        "description": "ID of the entity.",
        "example": "media_player.xiaoai_x08c",
        "required": True,
        "selector": {"entity": {"integration": "xiaomi_miot", "domain": "media_player"}},
    },
    "text": {
        "description": "Text content.",
        "example": "Turn on light",
        "required": True,
        "selector": {"text": None},
    },
    "execute": {
        "description": "Execute text directive.",
        "default": False,
        "example": True,
        "selector": {"boolean": None},
    },
    "silent": {
        "description": "Silent execution.",
        "default": False,
        "example": False,
        "selector": {"boolean": None},
    },
    "throw": {
        "description": "Throw result.",
        "default": False,
        "example": False,
        "selector": {"boolean": None},
    },
}
PLAYER_TARGET: dict[str, Any] = {"entity": [{"domain": ["media_player"]}]}

ResponseMode = Literal["none", "optional", "only"]
ServiceHandler = Callable[["RecordedCall"], Any]


@dataclass(frozen=True)
class RecordedCall:
    """One call_service command as the fake received it."""

    domain: str
    service: str
    service_data: dict[str, Any]
    target: dict[str, Any] | None
    return_response: bool
    at: float  # time.monotonic() when it arrived
    msg_id: int

    @property
    def entity_id(self) -> str:
        """The entity the call addressed, from service_data or target."""
        for source in (self.service_data, self.target or {}):
            value = source.get("entity_id")
            if isinstance(value, str):
                return value
            if isinstance(value, list) and value:
                return str(value[0])
        return ""

    @property
    def text(self) -> str:
        """The text of a speak call (`text`, or notify's `message`)."""
        return str(self.service_data.get("text", self.service_data.get("message", "")))


@dataclass
class _Service:
    supports_response: ResponseMode
    handler: ServiceHandler | None = None
    error: tuple[str, str] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] | None = None

    def description(self) -> dict[str, Any]:
        """This service's entry in `get_services`, as HA builds it from services.yaml."""
        described: dict[str, Any] = {
            "name": "",
            "description": "",
            "fields": copy.deepcopy(self.fields),
        }
        if self.target is not None:
            described["target"] = copy.deepcopy(self.target)
        if self.supports_response != "none":
            described["response"] = {"optional": self.supports_response == "optional"}
        return described


@dataclass(frozen=True)
class FakeSpeaker:
    """The entity ids of one fake XiaoAi speaker."""

    sensor: str
    media_player: str
    name: str


@dataclass(eq=False)
class _Client:
    ws: web.WebSocketResponse
    outbox: asyncio.Queue[str | None]
    writer: asyncio.Task[None] | None = None
    authenticated: bool = False
    coalesce: bool = False
    last_id: int = 0
    subscriptions: dict[int, str | None] = field(default_factory=dict)
    # subscribe_entities: id -> the entity ids asked for (None: all).
    entity_subscriptions: dict[int, frozenset[str] | None] = field(default_factory=dict)
    dropped: bool = False


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _context() -> dict[str, Any]:
    return {"id": uuid.uuid4().hex[:26].upper(), "parent_id": None, "user_id": None}


def _error(
    msg_id: Any, code: str, message: str, translation_key: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if translation_key is not None:
        # Core's ServiceValidationError carries its translation (websocket_api messages.py).
        error["translation_key"] = translation_key
        error["translation_placeholders"] = {"return_response": "return_response=True"}
        error["translation_domain"] = "homeassistant"
    return {"id": msg_id, "type": "result", "success": False, "error": error}


def _result(msg_id: int, result: Any = None) -> dict[str, Any]:
    return {"id": msg_id, "type": "result", "success": True, "result": result}


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def compressed_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state in `subscribe_entities` form: s, a, c, lc (and lu when it differs)."""
    context = state["context"]
    compressed: dict[str, Any] = {
        "s": state["state"],
        "a": state["attributes"],
        # A bare context id unless the context has a parent or a user.
        "c": context["id"]
        if context.get("parent_id") is None and context.get("user_id") is None
        else dict(context),
        "lc": _timestamp(state["last_changed"]),
    }
    if state["last_updated"] != state["last_changed"]:
        compressed["lu"] = _timestamp(state["last_updated"])
    return compressed


def state_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What changed between two states, as `subscribe_entities` sends it ("+" and "-")."""
    added: dict[str, Any] = {}
    diff: dict[str, Any] = {"+": added}
    if old["state"] != new["state"]:
        added["s"] = new["state"]
    if old["last_changed"] != new["last_changed"]:
        added["lc"] = _timestamp(new["last_changed"])
    elif old["last_updated"] != new["last_updated"]:
        added["lu"] = _timestamp(new["last_updated"])
    old_context, new_context = old["context"], new["context"]
    context: dict[str, Any] = {
        key: new_context.get(key)
        for key in ("parent_id", "user_id")
        if old_context.get(key) != new_context.get(key)
    }
    if old_context["id"] != new_context["id"]:
        if context:
            context["id"] = new_context["id"]
        else:
            added["c"] = new_context["id"]
    if context:
        added["c"] = context
    old_attrs, new_attrs = old["attributes"], new["attributes"]
    if changed := {k: v for k, v in new_attrs.items() if k not in old_attrs or old_attrs[k] != v}:
        added["a"] = changed
    if removed := [k for k in old_attrs if k not in new_attrs]:
        diff["-"] = {"a": removed}
    return diff


def conversation_timestamp(when: datetime | float | None = None) -> str:
    """`attributes.timestamp` as the API shows it: ms precision, local zone, ISO 8601."""
    if isinstance(when, datetime):
        moment = when
    else:
        epoch = time.time() if when is None else when
        # hass-xiaomi-miot: datetime.fromtimestamp(record["time"] / 1000, local_zone())
        moment = datetime.fromtimestamp(int(epoch * 1000) / 1000, LOCAL_ZONE)
    return moment.isoformat()


class FakeHomeAssistant:
    """Home Assistant's `/api/websocket` on 127.0.0.1 with a tiny state machine.

    Tests drive it like HA would: `set_conversation` fires `state_changed`, service calls
    are recorded in `calls`, `restart()` drops every client and comes back on the same port.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        ha_version: str = HA_VERSION,
        max_pending: int = MAX_PENDING_MSG,
        supports_coalescing: bool = True,
        admin: bool = True,
    ) -> None:
        self.token = token
        # Whether the token's user is an administrator (admin-only commands answer
        # `unauthorized` otherwise, as core's `require_admin` does).
        self.admin = admin
        self.ha_version = ha_version
        self.max_pending = max_pending
        self.supports_coalescing = supports_coalescing
        self.respond_to_pings = True
        self.port = 0
        self.states: dict[str, dict[str, Any]] = {}
        self.calls: list[RecordedCall] = []
        self.received: list[dict[str, Any]] = []
        self.errors_sent: list[dict[str, Any]] = []
        self.auth_attempts = 0
        self.auth_failures = 0
        self.connections = 0
        self.frames_sent = 0
        self.array_frames_sent = 0
        self.clients_dropped = 0
        # Every HTTP request as "METHOD /path" (the websocket upgrade included).
        self.http_requests: list[str] = []
        self.service_hooks: list[Callable[[RecordedCall], Awaitable[None] | None]] = []
        # Called with each well-formed command before it is handled.
        self.command_hooks: list[Callable[[dict[str, Any]], None]] = []
        self._clients: set[_Client] = set()
        self._services: dict[tuple[str, str], _Service] = {}
        self._histories: dict[str, list[str]] = {}
        self._last_said: dict[str, float] = {}
        self._writes_allowed = asyncio.Event()
        self._writes_allowed.set()
        self._runner: web.AppRunner | None = None
        self._call_added = asyncio.Event()
        self._command_received = asyncio.Event()
        # Set after every command handled and every event fired, for `wait_until`.
        self._happened = asyncio.Event()
        # state_changed and subscribe_entities messages sent, per entity id.
        self.entity_messages_sent: Counter[str] = Counter()
        self._closing: set[asyncio.Task[None]] = set()
        self.house = FakeHouse(self)
        self._register_default_services()

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Base URL, as a user would configure it."""
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The websocket API URL."""
        return f"ws://{HOST}:{self.port}{WEBSOCKET_PATH}"

    @property
    def client_count(self) -> int:
        """Authenticated clients connected right now."""
        return sum(1 for client in self._clients if client.authenticated)

    async def start(self) -> None:
        """Listen on 127.0.0.1 (a free port first, the same port after a restart)."""
        app = web.Application(middlewares=[self._record_request])
        app.router.add_get(WEBSOCKET_PATH, self._handle)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, HOST, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(runner.addresses[0][1])
        self._runner = runner

    @web.middleware
    async def _record_request(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.http_requests.append(f"{request.method} {request.path}")
        return await handler(request)

    async def stop(self) -> None:
        """Drop every client and stop listening."""
        await self.drop_clients()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Simulate an HA restart: all clients dropped, back on the same port."""
        await self.stop()
        await self.start()

    @contextlib.asynccontextmanager
    async def down(self) -> AsyncIterator[None]:
        """HA is down (connections refused) inside the block, back up afterwards."""
        await self.stop()
        try:
            yield
        finally:
            await self.start()

    async def drop_clients(self) -> None:
        """Close every client connection, as HA does on shutdown."""
        for client in list(self._clients):
            await self._drop(client)

    async def send_raw(self, frame: str | bytes, *, binary: bool = False) -> None:
        """Send one frame as is to every authenticated client (hostile-input tests).

        Bytes go out as a text frame unless `binary`, so invalid UTF-8 can be sent as text.
        """
        for client in list(self._clients):
            if not client.authenticated or client.dropped:
                continue
            with contextlib.suppress(ConnectionError):
                if binary:
                    await client.ws.send_bytes(
                        bytes(frame, "utf-8") if isinstance(frame, str) else frame
                    )
                elif isinstance(frame, bytes):
                    await client.ws.send_frame(frame, WSMsgType.TEXT)
                else:
                    await client.ws.send_str(frame)

    async def send_entity_event(self, event_json: str) -> None:
        """Send `event_json` (any text, valid or not) as an event on every entity subscription."""
        for client in list(self._clients):
            for sub_id in list(client.entity_subscriptions):
                with contextlib.suppress(ConnectionError):
                    await client.ws.send_str(
                        f'{{"id": {sub_id}, "type": "event", "event": {event_json}}}'
                    )

    def pause_writes(self) -> None:
        """Stop delivering messages, as if clients stopped reading (to test slow clients)."""
        self._writes_allowed.clear()

    def resume_writes(self) -> None:
        """Deliver messages again."""
        self._writes_allowed.set()

    # -- state machine -----------------------------------------------------------------

    def set_state(
        self,
        entity_id: str,
        state: str,
        attributes: Mapping[str, Any] | None = None,
        *,
        force_update: bool = False,
    ) -> dict[str, Any]:
        """Set a state like `hass.states.async_set`; fires state_changed when it changed."""
        attrs = copy.deepcopy(dict(attributes or {}))
        old = self.states.get(entity_id)
        if (
            old is not None
            and old["state"] == state
            and old["attributes"] == attrs
            and not force_update
        ):
            return old
        now = _now_iso()
        last_changed = old["last_changed"] if old is not None and old["state"] == state else now
        context = _context()
        new = {
            "entity_id": entity_id,
            "state": state,
            "attributes": attrs,
            "last_changed": last_changed,
            "last_reported": now,
            "last_updated": now,
            "context": context,
        }
        self.states[entity_id] = new
        self.fire_event(
            "state_changed",
            {"entity_id": entity_id, "old_state": old, "new_state": new},
            context=context,
        )
        return new

    def fire_event(
        self, event_type: str, data: Mapping[str, Any], *, context: Mapping[str, Any] | None = None
    ) -> None:
        """Fire an event on the bus to every subscriber."""
        copied = copy.deepcopy(dict(data))
        event = {
            "event_type": event_type,
            "data": copied,
            "origin": "LOCAL",
            "time_fired": _now_iso(),
            "context": dict(context) if context is not None else _context(),
        }
        entity_id = copied.get("entity_id") if event_type == "state_changed" else None
        for client in list(self._clients):
            for sub_id, sub_type in client.subscriptions.items():
                if sub_type is None or sub_type == event_type:
                    self._send(client, {"id": sub_id, "type": "event", "event": event})
                    if isinstance(entity_id, str):
                        self.entity_messages_sent[entity_id] += 1
        if event_type == "state_changed":
            self._forward_entity_changes(copied)
        self._happened.set()

    def _forward_entity_changes(self, data: Mapping[str, Any]) -> None:
        entity_id, old, new = data.get("entity_id"), data.get("old_state"), data.get("new_state")
        if new is None:
            change: dict[str, Any] = {"r": [entity_id]}
        elif old is None:
            change = {"a": {entity_id: compressed_state(new)}}
        else:
            change = {"c": {entity_id: state_diff(old, new)}}
        for client in list(self._clients):
            for sub_id, wanted in client.entity_subscriptions.items():
                if wanted is None or entity_id in wanted:
                    self._send(client, {"id": sub_id, "type": "event", "event": change})
                    self.entity_messages_sent[str(entity_id)] += 1

    @property
    def watched(self) -> frozenset[str]:
        """Entities some client subscribed to by id with `subscribe_entities`."""
        return frozenset(
            entity_id
            for client in self._clients
            for wanted in client.entity_subscriptions.values()
            if wanted is not None
            for entity_id in wanted
        )

    async def wait_until(self, predicate: Callable[[], bool], *, within_s: float = 2.0) -> None:
        """Wait until `predicate()` holds, re-checked after every command and every event."""
        async with asyncio.timeout(within_s):
            while not predicate():
                self._happened.clear()
                await self._happened.wait()

    async def wait_watching(self, entity_ids: Iterable[str], *, within_s: float = 2.0) -> None:
        """Wait until a client watches all these entities (its changes then reach it)."""
        wanted = frozenset(entity_ids)
        await self.wait_until(lambda: wanted <= self.watched, within_s=within_s)

    def add_speaker(
        self,
        suffix: str = "dea6",
        *,
        model: str = "lx06",
        name: str | None = None,
        registered: bool = False,
    ) -> FakeSpeaker:
        """A hass-xiaomi-miot speaker: its media_player and its conversation sensor.

        `registered`: its entities were in the entity registry already (an HA restart),
        so no `entity_registry_updated` is fired for them.
        """
        prefix = f"xiaomi_{model}_{suffix}"
        media_player = f"media_player.{prefix}_play_control"
        sensor = f"sensor.{prefix}_conversation"
        name = name or f"Xiaomi {model.upper()} {suffix} Play Control"
        # New entities enter the entity registry first, then the state machine.
        for entity_id in () if registered else (media_player, sensor):
            self.fire_event("entity_registry_updated", {"action": "create", "entity_id": entity_id})
        self.set_state(
            media_player,
            "idle",
            {
                "volume_level": 0.3,
                "is_volume_muted": False,
                "friendly_name": name,
                "supported_features": 152463,
            },
        )
        self.set_state(
            sensor,
            "unknown",
            self._conversation_attributes(
                media_player, name, text=None, timestamp=None, history=[]
            ),
        )
        return FakeSpeaker(sensor=sensor, media_player=media_player, name=name)

    def set_conversation(
        self,
        sensor: str,
        text: str,
        *,
        timestamp: datetime | float | None = None,
        answer: str | None = "好的",
        answers: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The sensor polled a new record: `text` said at `timestamp` (default: now)."""
        old = self.states.get(sensor)
        if old is None:
            raise KeyError(f"no such sensor {sensor}; call add_speaker first")
        media_player = str(old["attributes"].get("parent_entity_id") or "")
        name = str(old["attributes"].get("friendly_name", "")).removesuffix(" conversation")
        history = self._histories.setdefault(sensor, [])
        if timestamp is None:
            # "Now", but never the same millisecond as this sensor's previous record: real
            # utterances are seconds apart.
            timestamp = max(time.time(), self._last_said.get(sensor, 0.0) + 0.001)
        if not isinstance(timestamp, datetime):
            self._last_said[sensor] = max(timestamp, self._last_said.get(sensor, 0.0))
        if answers is None:
            answers = [] if answer is None else [{"type": "TTS", "tts": {"text": answer}}]
        attrs = self._conversation_attributes(
            media_player,
            name,
            text=text,
            timestamp=conversation_timestamp(timestamp),
            history=list(history[:2]),
            answers=answers,
        )
        history.insert(0, text)
        del history[3:]
        return self.set_state(sensor, text, attrs)

    def set_unavailable(self, entity_id: str) -> dict[str, Any]:
        """The entity became unavailable (its extra attributes are gone, as in HA)."""
        old = self.states.get(entity_id, {})
        keep = {
            k: v
            for k, v in old.get("attributes", {}).items()
            if k in ("friendly_name", "icon", "supported_features")
        }
        return self.set_state(entity_id, "unavailable", keep)

    def set_player_state(self, media_player: str, state: str) -> dict[str, Any]:
        """Change a media_player's state (playing, paused, idle...) keeping its attributes."""
        old = self.states.get(media_player, {})
        return self.set_state(media_player, state, old.get("attributes", {}))

    @staticmethod
    def _conversation_attributes(
        media_player: str,
        name: str,
        *,
        text: str | None,
        timestamp: str | None,
        history: list[str],
        answers: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        return {
            "content": text,
            "answers": answers or [],
            "history": history,
            "timestamp": timestamp,
            "entity_class": CONVERSATION_ENTITY_CLASS,
            "parent_entity_id": media_player,
            "icon": "mdi:account-voice",
            "friendly_name": f"{name} conversation",
        }

    # -- services ----------------------------------------------------------------------

    def register_service(
        self,
        domain: str,
        service: str,
        *,
        supports_response: ResponseMode = "none",
        handler: ServiceHandler | None = None,
        fields: Mapping[str, Any] | None = None,
        target: Mapping[str, Any] | None = None,
    ) -> None:
        """Make a service callable; `handler` computes its response (and side effects).

        `fields` and `target` are its services.yaml description, listed by `get_services`.
        """
        self._services[(domain, service)] = _Service(
            supports_response,
            handler,
            fields=dict(fields or {}),
            target=dict(target) if target is not None else None,
        )

    def fail_service(
        self,
        domain: str,
        service: str,
        *,
        code: str = "home_assistant_error",
        message: str = "Cloud request failed",
    ) -> None:
        """Make a service answer with an error result until `heal_service`."""
        self._services[(domain, service)].error = (code, message)

    def heal_service(self, domain: str, service: str) -> None:
        """Undo `fail_service`."""
        self._services[(domain, service)].error = None

    def calls_to(self, domain: str, service: str) -> list[RecordedCall]:
        """Recorded calls of one service, in arrival order."""
        return [c for c in self.calls if (c.domain, c.service) == (domain, service)]

    async def wait_for_calls(
        self, count: int, *, domain: str | None = None, within_s: float = 2.0
    ) -> list[RecordedCall]:
        """Wait until at least `count` calls (of `domain`, if given) were recorded."""

        def matching() -> list[RecordedCall]:
            return [c for c in self.calls if domain is None or c.domain == domain]

        async with asyncio.timeout(within_s):
            while len(matching()) < count:
                self._call_added.clear()
                await self._call_added.wait()
        return matching()

    def commands_of(self, kind: str) -> int:
        """How many commands of one type (e.g. "get_states") were received."""
        return sum(1 for msg in self.received if msg.get("type") == kind)

    async def wait_for_commands(self, kind: str, count: int, *, within_s: float = 2.0) -> None:
        """Wait until `count` commands of type `kind` were received (and answered)."""
        async with asyncio.timeout(within_s):
            while self.commands_of(kind) < count:
                self._command_received.clear()
                await self._command_received.wait()

    def _register_default_services(self) -> None:
        def speaker_response(call: RecordedCall) -> dict[str, Any]:
            # A MIoT action result, as hass-xiaomi-miot returns it.
            return {"code": 0, "siid": 5, "aiid": 1, "did": "123456789", "exe_time": 0}

        def player_service(state: str) -> ServiceHandler:
            def handle(call: RecordedCall) -> None:
                if call.entity_id in self.states:
                    self.set_player_state(call.entity_id, state)

            return handle

        self.register_service(
            "xiaomi_miot",
            "intelligent_speaker",
            supports_response="optional",
            handler=speaker_response,
            fields=SPEAKER_FIELDS,
        )
        self.register_service(
            "xiaomi_miot",
            "xiaoai_wakeup",
            supports_response="optional",
            fields={key: SPEAKER_FIELDS[key] for key in ("entity_id", "text")},
        )
        for service, state in (
            ("media_pause", "paused"),
            ("media_stop", "idle"),
            ("media_play", "playing"),
        ):
            self.register_service(
                "media_player", service, handler=player_service(state), target=PLAYER_TARGET
            )
        self.register_service("notify", "send_message")
        for domain, service in HOUSE_SERVICES:
            self.register_service(domain, service, handler=self.house.apply)
        self.register_service("text", "set_value")

    # -- websocket protocol ------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        client = _Client(ws=ws, outbox=asyncio.Queue(maxsize=self.max_pending))
        self._clients.add(client)
        client.writer = asyncio.create_task(self._writer(client))
        try:
            self._send(client, {"type": "auth_required", "ha_version": self.ha_version})
            if await self._auth_phase(client):
                await self._command_phase(client)
        finally:
            self._clients.discard(client)
            if not client.dropped:
                # Let queued replies (e.g. auth_invalid) go out before closing, as HA does.
                with contextlib.suppress(asyncio.QueueFull):
                    client.outbox.put_nowait(None)
                if client.writer is not None:
                    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                        async with asyncio.timeout(1.0):
                            await client.writer
            if client.writer is not None:
                client.writer.cancel()
            await ws.close()
        return ws

    async def _auth_phase(self, client: _Client) -> bool:
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                msg = await client.ws.receive()
        except TimeoutError:
            return False
        if msg.type is not WSMsgType.TEXT:
            return False
        try:
            data = json.loads(msg.data)
        except ValueError:
            return False
        self.auth_attempts += 1
        if (
            not isinstance(data, dict)
            or data.get("type") != "auth"
            or not isinstance(data.get("access_token"), str)
        ):
            self.auth_failures += 1
            self._send(
                client,
                {
                    "type": "auth_invalid",
                    "message": "Auth message incorrectly formatted: expected access_token",
                },
            )
            return False
        if data["access_token"] != self.token:
            self.auth_failures += 1
            self._send(
                client, {"type": "auth_invalid", "message": "Invalid access token or password"}
            )
            return False
        client.authenticated = True
        self.connections += 1
        self._send(client, {"type": "auth_ok", "ha_version": self.ha_version})
        return True

    async def _command_phase(self, client: _Client) -> None:
        ws = client.ws
        while not ws.closed:
            msg = await ws.receive()
            if msg.type is not WSMsgType.TEXT:
                break
            try:
                data = json.loads(msg.data)
            except ValueError:
                break
            # HA also accepts a JSON array of commands in one frame.
            for item in data if isinstance(data, list) else [data]:
                await self._handle_command(client, item)

    async def _handle_command(self, client: _Client, msg: Any) -> None:
        if isinstance(msg, dict):
            self.received.append(msg)
            self._command_received.set()
        cur_id = msg.get("id") if isinstance(msg, dict) else None
        kind = msg.get("type") if isinstance(msg, dict) else None
        if (
            not isinstance(msg, dict)
            or type(cur_id) is not int
            or not cur_id
            or not isinstance(kind, str)
            or not kind
        ):
            self._send_error(
                client, cur_id or 0, "invalid_format", "Message incorrectly formatted."
            )
            return
        if cur_id <= client.last_id:
            self._send_error(client, cur_id, "id_reuse", "Identifier values have to increase.")
            return
        client.last_id = cur_id
        for hook in list(self.command_hooks):
            hook(msg)
        handler = {
            "ping": self._cmd_ping,
            "supported_features": self._cmd_supported_features,
            "subscribe_events": self._cmd_subscribe_events,
            "unsubscribe_events": self._cmd_unsubscribe_events,
            "get_states": self._cmd_get_states,
            "call_service": self._cmd_call_service,
            "auth/current_user": self._cmd_current_user,
            "get_config": self._cmd_get_config,
            "get_services": self._cmd_get_services,
            "subscribe_entities": self._cmd_subscribe_entities,
        }.get(kind)
        if handler is None and self.house.handles(kind):
            handler = self._cmd_house
        if handler is None and kind in REGISTRY_LISTS:
            handler = self._cmd_registry_list
        if handler is None:
            self._send_error(client, cur_id, "unknown_command", "Unknown command.")
            return
        await handler(client, cur_id, msg)
        self._happened.set()

    async def _cmd_ping(self, client: _Client, msg_id: int, msg: dict[str, Any]) -> None:
        if self.respond_to_pings:
            self._send(client, {"id": msg_id, "type": "pong"})

    async def _cmd_supported_features(
        self, client: _Client, msg_id: int, msg: dict[str, Any]
    ) -> None:
        features = msg.get("features")
        if not isinstance(features, dict):
            self._send_error(client, msg_id, "invalid_format", "required key not provided")
            return
        client.coalesce = self.supports_coalescing and bool(features.get("coalesce_messages"))
        self._send(client, _result(msg_id))

    async def _cmd_subscribe_events(
        self, client: _Client, msg_id: int, msg: dict[str, Any]
    ) -> None:
        event_type = msg.get("event_type")
        client.subscriptions[msg_id] = event_type if isinstance(event_type, str) else None
        self._send(client, _result(msg_id))

    async def _cmd_unsubscribe_events(
        self, client: _Client, msg_id: int, msg: dict[str, Any]
    ) -> None:
        subscription = msg.get("subscription")
        if subscription in client.subscriptions:
            del client.subscriptions[subscription]
            self._send(client, _result(msg_id))
        elif subscription in client.entity_subscriptions:
            del client.entity_subscriptions[subscription]
            self._send(client, _result(msg_id))
        else:
            self._send_error(client, msg_id, "not_found", "Subscription not found.")

    async def _cmd_get_states(self, client: _Client, msg_id: int, msg: dict[str, Any]) -> None:
        self._send(client, _result(msg_id, list(self.states.values())))

    async def _cmd_current_user(self, client: _Client, msg_id: int, msg: dict[str, Any]) -> None:
        # A long-lived token of the owner (an admin) unless the fake says otherwise; Node-RED's
        # HA nodes refuse non-admins.
        user = {
            "id": "0d2d7c3b5e6f4a1b9c8d7e6f5a4b3c2d",
            "name": "Owner",
            "is_owner": self.admin,
            "is_admin": self.admin,
            "credentials": [{"auth_provider_type": "homeassistant", "auth_provider_id": None}],
            "mfa_modules": [{"id": "totp", "name": "Authenticator app", "enabled": False}],
        }
        self._send(client, _result(msg_id, user))

    async def _cmd_get_config(self, client: _Client, msg_id: int, msg: dict[str, Any]) -> None:
        config = {
            "latitude": 31.23,
            "longitude": 121.47,
            "elevation": 4,
            "radius": 100,
            "unit_system": {
                "length": "km",
                "accumulated_precipitation": "mm",
                "area": "m²",
                "mass": "g",
                "pressure": "Pa",
                "temperature": "°C",
                "volume": "L",
                "wind_speed": "m/s",
            },
            "location_name": "Home",
            "time_zone": "Asia/Shanghai",
            "components": list(COMPONENTS),
            "config_dir": "/config",
            "allowlist_external_dirs": ["/config/www", "/media"],
            "allowlist_external_urls": [],
            "version": self.ha_version,
            "config_source": "storage",
            "recovery_mode": False,
            "state": "RUNNING",
            "external_url": None,
            "internal_url": None,
            "currency": "CNY",
            "country": "CN",
            "language": "zh-Hans",
            "safe_mode": False,
            "debug": False,
        }
        self._send(client, _result(msg_id, config))

    async def _cmd_get_services(self, client: _Client, msg_id: int, msg: dict[str, Any]) -> None:
        described: dict[str, dict[str, Any]] = {}
        for (domain, service), registered in sorted(self._services.items()):
            described.setdefault(domain, {})[service] = registered.description()
        self._send(client, _result(msg_id, described))

    async def _cmd_registry_list(self, client: _Client, msg_id: int, msg: dict[str, Any]) -> None:
        self._send(client, _result(msg_id, []))

    async def _cmd_house(self, client: _Client, msg_id: int, msg: dict[str, Any]) -> None:
        kind = str(msg["type"])
        if kind in ADMIN_ONLY and not self.admin:
            # core connection.async_handle_exception for `Unauthorized`.
            self._send_error(client, msg_id, "unauthorized", "Unauthorized")
            return
        try:
            result = self.house.command(kind, msg)
        except CommandFailed as err:
            self._send_error(client, msg_id, err.code, err.message)
            return
        self._send(client, _result(msg_id, result))

    async def _cmd_subscribe_entities(
        self, client: _Client, msg_id: int, msg: dict[str, Any]
    ) -> None:
        entity_ids = msg.get("entity_ids")
        if isinstance(entity_ids, str):
            entity_ids = [part.strip() for part in entity_ids.split(",")]
        wanted = frozenset(entity_ids) if isinstance(entity_ids, list) and entity_ids else None
        client.entity_subscriptions[msg_id] = wanted
        self._send(client, _result(msg_id))
        # Then every current state at once, as additions.
        initial = {
            entity_id: compressed_state(state)
            for entity_id, state in self.states.items()
            if wanted is None or entity_id in wanted
        }
        self._send(client, {"id": msg_id, "type": "event", "event": {"a": initial}})

    async def _cmd_call_service(self, client: _Client, msg_id: int, msg: dict[str, Any]) -> None:
        domain, service = msg.get("domain"), msg.get("service")
        service_data = msg.get("service_data", {})
        target = msg.get("target")
        return_response = msg.get("return_response", False)
        if not isinstance(domain, str) or not isinstance(service, str):
            key = "domain" if not isinstance(domain, str) else "service"
            self._send_error(
                client, msg_id, "invalid_format", f"required key not provided @ data['{key}']"
            )
            return
        if not isinstance(service_data, dict) or not isinstance(return_response, bool):
            self._send_error(client, msg_id, "invalid_format", "expected dict for service_data")
            return
        call = RecordedCall(
            domain=domain,
            service=service,
            service_data=service_data,
            target=target if isinstance(target, dict) else None,
            return_response=return_response,
            at=time.monotonic(),
            msg_id=msg_id,
        )
        self.calls.append(call)
        self._call_added.set()
        for hook in list(self.service_hooks):
            outcome = hook(call)
            if outcome is not None:
                await outcome
        registered = self._services.get((domain, service))
        if registered is None:
            self._send_error(client, msg_id, "not_found", f"Service {domain}.{service} not found.")
            return
        if registered.error is not None:
            self._send_error(client, msg_id, *registered.error)
            return
        if return_response and registered.supports_response == "none":
            self._send_error(
                client,
                msg_id,
                "service_validation_error",
                "Validation error: An action which does not return responses can't be called "
                "with return_response=True",
                translation_key="service_does_not_support_response",
            )
            return
        if not return_response and registered.supports_response == "only":
            self._send_error(
                client,
                msg_id,
                "service_validation_error",
                "Validation error: An action which only supports responses must be called "
                "with return_response=True",
                translation_key="service_lacks_response_request",
            )
            return
        response = registered.handler(call) if registered.handler is not None else None
        result: dict[str, Any] = {"context": _context()}
        if return_response:
            result["response"] = response
        self._send(client, _result(msg_id, result))

    # -- writing -----------------------------------------------------------------------

    def _send_error(
        self,
        client: _Client,
        msg_id: Any,
        code: str,
        message: str,
        *,
        translation_key: str | None = None,
    ) -> None:
        error = _error(msg_id, code, message, translation_key)
        self.errors_sent.append(error)
        self._send(client, error)

    def _send(self, client: _Client, message: dict[str, Any]) -> None:
        if client.dropped:
            return
        try:
            client.outbox.put_nowait(json.dumps(message, ensure_ascii=False))
        except asyncio.QueueFull:
            # HA: "Client exceeded max pending messages" -> the connection is cancelled.
            self.clients_dropped += 1
            self._mark_dropped(client)
            task = asyncio.get_running_loop().create_task(self._close(client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _mark_dropped(self, client: _Client) -> None:
        client.dropped = True
        self._clients.discard(client)
        if client.writer is not None:
            client.writer.cancel()

    async def _drop(self, client: _Client) -> None:
        if not client.dropped:
            self._mark_dropped(client)
            await self._close(client)

    @staticmethod
    async def _close(client: _Client) -> None:
        with contextlib.suppress(Exception):
            await client.ws.close(code=WSCloseCode.GOING_AWAY)

    async def _writer(self, client: _Client) -> None:
        outbox = client.outbox
        while not client.ws.closed:
            message = await outbox.get()
            await self._writes_allowed.wait()
            if message is None:
                return
            if not client.coalesce or outbox.empty():
                await self._write(client, message)
                continue
            # Like HA's writer: everything already queued goes out as one JSON array.
            batch = [message]
            done = False
            while not outbox.empty():
                queued = outbox.get_nowait()
                if queued is None:
                    done = True
                    break
                batch.append(queued)
            if len(batch) == 1:
                await self._write(client, batch[0])
            else:
                self.array_frames_sent += 1
                await self._write(client, "[" + ",".join(batch) + "]")
            if done:
                return

    async def _write(self, client: _Client, frame: str) -> None:
        self.frames_sent += 1
        with contextlib.suppress(ConnectionError):
            await client.ws.send_str(frame)
