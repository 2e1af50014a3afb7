"""Home Assistant websocket API client: one connection, and a reconnecting client around it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
import yarl

from xiaoai_bridge.clients.homeassistant_entities import EntityChange, EntityMirror, valid_entity_id
from xiaoai_bridge.errors import BridgeError, ConfigError
from xiaoai_bridge.jsonwire import parse_json
from xiaoai_bridge.reconnect import (
    ConnectionState,
    ReconnectPolicy,
    ReconnectRunner,
    Retry,
    classify_by_type,
)

_LOGGER = logging.getLogger(__name__)

WEBSOCKET_PATH = "/api/websocket"
STATE_CHANGED = "state_changed"
# Fired when an entity is created, renamed or removed; non-admin users may subscribe to it.
ENTITY_REGISTRY_UPDATED = "entity_registry_updated"
CONVERSATION_ENTITY_CLASS = "XiaoaiConversationSensor"

DEFAULT_CONNECT_TIMEOUT_S = 10.0
# intelligent_speaker goes through Xiaomi's cloud and refreshes the media_player before
# answering, so a result can take seconds.
DEFAULT_COMMAND_TIMEOUT_S = 20.0
# Node-RED's HA nodes ping every >= 10 s and give up after 5 s without a pong.
DEFAULT_HEARTBEAT_INTERVAL_S = 20.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
# How long a service call waits for a (re)connection before giving up.
DEFAULT_CONNECT_WAIT_S = 10.0
# get_states on a large install is several MB; aiohttp's default limit is 4 MB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Events a consumer has not taken yet. Beyond this the oldest is dropped: stalling the reader
# instead would stop pongs and make HA drop the whole connection.
MAX_QUEUED_EVENTS = 1024
_CLOSE_TIMEOUT_S = 2.0


class HomeAssistantError(BridgeError):
    """Root of the Home Assistant client's errors."""


class HomeAssistantConnectionError(HomeAssistantError):
    """Home Assistant cannot be reached, or the connection was lost."""


class HomeAssistantAuthError(HomeAssistantError):
    """Home Assistant rejected the access token; retrying will not help."""


class HomeAssistantCommandError(HomeAssistantError):
    """A command got an error result (or none in time); `code` is HA's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def refuses_responses(err: HomeAssistantCommandError) -> bool:
    """Whether Home Assistant refused `return_response` because the service gives none."""
    # No translation_key before 2024.1 (a plain ValueError, "unknown_error"), so the
    # message is what every version shares.
    message = err.message.lower()
    return "return_response" in message and (
        "does not support responses" in message or "does not return responses" in message
    )


def websocket_url(url: str) -> yarl.URL:
    """Turn a base URL (http://host:8123) or a websocket URL into the websocket API URL."""
    parsed = yarl.URL(url)
    scheme = {"http": "ws", "https": "wss"}.get(parsed.scheme, parsed.scheme)
    if scheme not in ("ws", "wss") or not parsed.host:
        raise ConfigError(
            f"homeassistant.url: {url!r} is not an http(s):// or ws(s):// URL, "
            "e.g. http://homeassistant.local:8123"
        )
    path = parsed.path.rstrip("/")
    if not path.endswith(WEBSOCKET_PATH):
        path += WEBSOCKET_PATH
    return parsed.with_scheme(scheme).with_path(path).with_query(None).with_fragment(None)


@dataclass(frozen=True, slots=True)
class HassEvent:
    """One event from the bus, as delivered to a `subscribe_events` subscription."""

    event_type: str
    data: dict[str, Any]
    time_fired: str = ""
    origin: str = ""

    @classmethod
    def from_wire(cls, event: Mapping[str, Any]) -> HassEvent:
        """Build from the `event` object of an `{"type": "event"}` message."""
        data = event.get("data")
        return cls(
            event_type=_text(event.get("event_type")),
            data=dict(data) if isinstance(data, Mapping) else {},
            time_fired=_text(event.get("time_fired")),
            origin=_text(event.get("origin")),
        )

    @classmethod
    def from_change(cls, change: EntityChange) -> HassEvent:
        """A `state_changed` event rebuilt from one `subscribe_entities` change."""
        return cls(
            event_type=STATE_CHANGED,
            data={
                "entity_id": change.entity_id,
                "old_state": change.old_state,
                "new_state": change.new_state,
            },
        )


def _text(value: Any) -> str:
    # Only strings are taken: str() of a hostile nested value could recurse or be huge.
    return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The subscription (re)started on a fresh connection.

    `reconnected` is true when this stream was subscribed before: events in between were
    missed, so a consumer that cares should compare against `get_states()`.
    """

    reconnected: bool


StreamItem = HassEvent | Subscribed


@dataclass(frozen=True, slots=True)
class ConversationSensor:
    """A hass-xiaomi-miot conversation sensor and the speaker it belongs to."""

    entity_id: str
    media_player: str
    friendly_name: str = ""


def is_conversation_sensor(state: Mapping[str, Any]) -> bool:
    """Whether a state object is a hass-xiaomi-miot `XiaoaiConversationSensor`."""
    attributes, entity_id = state.get("attributes"), state.get("entity_id")
    return (
        isinstance(attributes, Mapping)
        and attributes.get("entity_class") == CONVERSATION_ENTITY_CLASS
        and isinstance(entity_id, str)
        and entity_id.startswith("sensor.")
    )


def conversation_sensor(state: Mapping[str, Any]) -> ConversationSensor | None:
    """The sensor described by a state object, or None when it is not a conversation sensor."""
    if not is_conversation_sensor(state):
        return None
    attributes = state["attributes"]
    return ConversationSensor(
        entity_id=state["entity_id"],
        media_player=_text(attributes.get("parent_entity_id")),
        friendly_name=_text(attributes.get("friendly_name")),
    )


def discover_conversation_sensors(
    states: Iterable[Mapping[str, Any]],
) -> list[ConversationSensor]:
    """All conversation sensors in a `get_states` result, sorted by entity id."""
    found = [sensor for state in states if (sensor := conversation_sensor(state)) is not None]
    return sorted(found, key=lambda sensor: sensor.entity_id)


EventHandler = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What `probe` found: the HA version and the XiaoAi speakers it has."""

    url: str
    ha_version: str
    speakers: list[ConversationSensor]


async def probe(
    url: str,
    token: str,
    *,
    session: aiohttp.ClientSession | None = None,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> ProbeResult:
    """Connect once, list the conversation sensors, disconnect (for `check` and listings).

    Raises HomeAssistantAuthError for a bad token, HomeAssistantConnectionError otherwise.
    """
    async with HomeAssistantConnection(
        url,
        token,
        session=session,
        connect_timeout_s=timeout_s,
        command_timeout_s=timeout_s,
        heartbeat_interval_s=0,
    ) as connection:
        states = await connection.get_states()
        return ProbeResult(
            url=str(connection.url),
            ha_version=connection.ha_version,
            speakers=discover_conversation_sensors(states),
        )


class HomeAssistantConnection:
    """One authenticated websocket connection; `async with` opens and closes it.

    Message ids increase strictly and are allocated and written under one lock, as HA
    rejects any id not above the last one (`id_reuse`).
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        session: aiohttp.ClientSession | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        coalesce_messages: bool = True,
    ) -> None:
        self.url = websocket_url(url)
        self._token = token
        self._session = session
        self._owns_session = False
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._coalesce_messages = coalesce_messages
        self.ha_version = ""
        self.last_id = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._send_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._event_handlers: dict[int, EventHandler] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._close_error: HomeAssistantConnectionError | None = None

    def __repr__(self) -> str:
        return f"<HomeAssistantConnection {self.url}>"

    @property
    def closed(self) -> bool:
        """True once the connection is lost or closed."""
        return self._closed.is_set()

    async def __aenter__(self) -> Self:
        try:
            await self._open()
        except BaseException as err:
            await self.aclose()
            if isinstance(err, TimeoutError):
                raise HomeAssistantConnectionError(
                    f"timed out connecting to {self.url} after {self._connect_timeout_s:g} s"
                ) from err
            if isinstance(err, aiohttp.ClientError | OSError):
                raise HomeAssistantConnectionError(f"cannot connect to {self.url}: {err}") from err
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        async with asyncio.timeout(self._connect_timeout_s):
            self._ws = await self._session.ws_connect(
                self.url, max_msg_size=MAX_MESSAGE_BYTES, autoping=True
            )
            await self._authenticate(self._ws)
        self._tasks.append(asyncio.create_task(self._read_loop(), name="homeassistant:reader"))
        if self._heartbeat_interval_s > 0:
            self._tasks.append(
                asyncio.create_task(self._heartbeat_loop(), name="homeassistant:heartbeat")
            )
        if self._coalesce_messages:
            await self._enable_coalescing()

    async def _authenticate(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        first = await self._receive_auth_message(ws)
        if first.get("type") != "auth_required":
            raise HomeAssistantConnectionError(
                f"unexpected first message from {self.url}: {first.get('type')!r}"
            )
        await ws.send_str(json.dumps({"type": "auth", "access_token": self._token}))
        reply = await self._receive_auth_message(ws)
        if reply.get("type") == "auth_invalid":
            raise HomeAssistantAuthError(
                f"Home Assistant at {self.url} rejected the access token "
                f"({reply.get('message', 'no reason given')}); create a new long-lived "
                "access token in your HA user profile (Security tab)"
            )
        if reply.get("type") != "auth_ok":
            raise HomeAssistantConnectionError(
                f"unexpected auth reply from {self.url}: {reply.get('type')!r}"
            )
        self.ha_version = str(reply.get("ha_version") or first.get("ha_version") or "")
        _LOGGER.debug("authenticated to %s (Home Assistant %s)", self.url, self.ha_version)

    async def _receive_auth_message(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise HomeAssistantConnectionError(
                f"{self.url} closed the connection during authentication ({msg.type.name})"
            )
        try:
            data = parse_json(msg.data)
        except ValueError as err:
            raise HomeAssistantConnectionError(
                f"unreadable message from {self.url}: {err}"
            ) from err
        if not isinstance(data, dict):
            raise HomeAssistantConnectionError(f"unexpected auth frame from {self.url}")
        return data

    async def _enable_coalescing(self) -> None:
        try:
            await self.command({"type": "supported_features", "features": {"coalesce_messages": 1}})
        except HomeAssistantCommandError as err:
            # Cores before the feature phase answer unknown_command; they never coalesce.
            _LOGGER.debug("%s does not support message coalescing: %s", self.url, err)

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        self._mark_closed(HomeAssistantConnectionError("connection closed"))
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks.clear()
        if self._ws is not None:
            # On timeout aiohttp aborts the transport itself.
            with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await self._ws.close()
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_closed(self) -> HomeAssistantConnectionError:
        """Wait until the connection is lost; return why."""
        await self._closed.wait()
        return self._close_error or HomeAssistantConnectionError("connection closed")

    def _mark_closed(self, error: HomeAssistantConnectionError) -> None:
        if self._close_error is None:
            self._close_error = error
        self._closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._close_error)
        self._pending.clear()

    async def _read_loop(self) -> None:
        if self._ws is None:
            return
        error = HomeAssistantConnectionError(f"{self.url} closed the connection")
        try:
            while True:
                msg = await self._ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._handle_frame(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    _LOGGER.warning("ignoring a binary frame from %s", self.url)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    error = HomeAssistantConnectionError(
                        # e.g. a text frame that is not UTF-8: the protocol is broken.
                        f"connection to {self.url} failed: {msg.data or self._ws.exception()}"
                    )
                    break
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                ):
                    break
        finally:
            self._mark_closed(error)

    def _handle_frame(self, raw: str) -> None:
        try:
            data = parse_json(raw)
        except ValueError as err:
            _LOGGER.warning("ignoring a frame from %s: %s", self.url, err)
            return
        try:
            self._handle_messages(data)
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as err:
            # Every field is type-checked before use; this is the last guard that keeps the
            # reader (and with it the connection's heartbeat) alive on a frame we missed.
            _LOGGER.warning("ignoring a frame from %s that could not be handled: %r", self.url, err)

    def _handle_messages(self, data: Any) -> None:
        # With coalesce_messages enabled HA packs queued messages into one JSON array.
        messages = data if isinstance(data, list) else [data]
        for message in messages:
            if isinstance(message, dict):
                self._handle_message(message)
            else:
                _LOGGER.warning(
                    "ignoring a %s from %s where a message object belongs",
                    type(message).__name__,
                    self.url,
                )

    def _handle_message(self, message: dict[str, Any]) -> None:
        msg_id = message.get("id")
        kind = message.get("type")
        # `type(...) is int`: JSON true would otherwise match id 1.
        if kind == "event" and type(msg_id) is int:
            handler = self._event_handlers.get(msg_id)
            event = message.get("event")
            if handler is not None and isinstance(event, Mapping):
                handler(event)
            elif handler is not None:
                _LOGGER.warning("ignoring an event from %s without an event object", self.url)
        elif kind in ("result", "pong") and type(msg_id) is int:
            future = self._pending.get(msg_id)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            _LOGGER.debug("ignoring message of type %r from %s", kind, self.url)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            try:
                await self.command({"type": "ping"}, timeout_s=self._heartbeat_timeout_s)
            except HomeAssistantCommandError:
                error = HomeAssistantConnectionError(
                    f"no pong from {self.url} within {self._heartbeat_timeout_s:g} s"
                )
                self._mark_closed(error)
                for task in self._tasks:
                    if task is not asyncio.current_task():
                        task.cancel()
                return
            except HomeAssistantConnectionError:
                return

    async def command(
        self,
        message: Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        on_event: EventHandler | None = None,
    ) -> Any:
        """Send one command with the next id and return its `result` (None for a pong).

        `on_event` receives the `event` objects sent for this id (subscriptions); it is
        registered before the command is written, so no event can slip past it.
        """
        _, result = await self._command(message, timeout_s=timeout_s, on_event=on_event)
        return result

    async def _command(
        self,
        message: Mapping[str, Any],
        *,
        timeout_s: float | None,
        on_event: EventHandler | None,
    ) -> tuple[int, Any]:
        if self._ws is None or self.closed:
            raise self._close_error or HomeAssistantConnectionError("not connected")
        timeout_s = timeout_s or self._command_timeout_s
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        async with self._send_lock:
            if self.closed:
                raise self._close_error or HomeAssistantConnectionError("not connected")
            self.last_id += 1
            msg_id = self.last_id
            self._pending[msg_id] = future
            if on_event is not None:
                self._event_handlers[msg_id] = on_event
            try:
                await self._ws.send_str(json.dumps({**message, "id": msg_id}, ensure_ascii=False))
            except (aiohttp.ClientError, OSError) as err:
                self._pending.pop(msg_id, None)
                self._event_handlers.pop(msg_id, None)
                raise HomeAssistantConnectionError(f"cannot send to {self.url}: {err}") from err
        try:
            async with asyncio.timeout(timeout_s):
                reply = await future
        except TimeoutError as err:
            self._event_handlers.pop(msg_id, None)
            raise HomeAssistantCommandError(
                "timeout", f"no reply to {message.get('type')!r} within {timeout_s:g} s"
            ) from err
        except BaseException:
            self._event_handlers.pop(msg_id, None)
            raise
        finally:
            self._pending.pop(msg_id, None)
        if reply.get("type") == "pong":
            return msg_id, None
        if not reply.get("success", False):
            self._event_handlers.pop(msg_id, None)
            error = reply.get("error")
            details: Mapping[str, Any] = error if isinstance(error, Mapping) else {}
            raise HomeAssistantCommandError(
                _text(details.get("code")) or "unknown_error", _text(details.get("message"))
            )
        return msg_id, reply.get("result")

    async def ping(self) -> None:
        """Round-trip a ping (raises on timeout or a lost connection)."""
        await self.command({"type": "ping"}, timeout_s=self._heartbeat_timeout_s)

    async def get_states(self) -> list[dict[str, Any]]:
        """Every entity's current state object."""
        result = await self.command({"type": "get_states"})
        if not isinstance(result, list):
            raise HomeAssistantCommandError(
                "invalid_result", f"get_states returned a {type(result).__name__}, not a list"
            )
        return [state for state in result if isinstance(state, dict)]

    async def call_service(
        self,
        domain: str,
        service: str,
        service_data: Mapping[str, Any] | None = None,
        target: Mapping[str, Any] | None = None,
        *,
        return_response: bool = False,
        timeout_s: float | None = None,
    ) -> Any:
        """Call a service and wait for its result; returns the service response, if asked."""
        message: dict[str, Any] = {"type": "call_service", "domain": domain, "service": service}
        if service_data:
            message["service_data"] = dict(service_data)
        if target:
            message["target"] = dict(target)
        if return_response:
            message["return_response"] = True
        result = await self.command(message, timeout_s=timeout_s)
        if return_response and isinstance(result, Mapping):
            return result.get("response")
        return None

    async def subscribe_events(self, event_type: str | None, handler: EventHandler) -> int:
        """Subscribe `handler` to an event type (None: all events); returns the subscription id."""
        message: dict[str, Any] = {"type": "subscribe_events"}
        if event_type is not None:
            message["event_type"] = event_type
        msg_id, _ = await self._command(message, timeout_s=None, on_event=handler)
        return msg_id

    async def subscribe_entities(self, entity_ids: Collection[str], handler: EventHandler) -> int:
        """Subscribe `handler` to these entities' compressed states; returns the subscription id.

        HA filters server-side. Its first event is `{"a": {...}}` with the current states,
        then `a`/`c`/`r` changes (see `EntityMirror`). An empty list would mean every entity,
        so it is refused here.
        """
        if not entity_ids:
            raise ValueError("subscribe_entities needs at least one entity id")
        message = {"type": "subscribe_entities", "entity_ids": sorted(entity_ids)}
        msg_id, _ = await self._command(message, timeout_s=None, on_event=handler)
        return msg_id

    async def unsubscribe_events(self, subscription: int) -> None:
        """End a subscription made with `subscribe_events`."""
        self._event_handlers.pop(subscription, None)
        await self.command({"type": "unsubscribe_events", "subscription": subscription})


class EventStream:
    """Events of a `HomeAssistantClient`, across reconnects; an async iterator.

    Starts with a `Subscribed` marker once connected, and repeats it after every reconnect.
    Ends when the client closes, or raises `HomeAssistantAuthError` when the token is rejected.
    """

    def __init__(self, client: HomeAssistantClient, maxsize: int = MAX_QUEUED_EVENTS) -> None:
        self._client = client
        self._items: deque[StreamItem] = deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self._end: BaseException | None = None
        self._ended = False
        self._seen_connection = False
        self.dropped = 0

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamItem:
        while not self._items:
            if self._ended:
                if self._end is not None:
                    raise self._end
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving events."""
        self._client._streams.discard(self)
        self._finish(None)

    def _connected(self) -> None:
        self._put(Subscribed(reconnected=self._seen_connection))
        self._seen_connection = True

    def _put(self, item: StreamItem) -> None:
        if self._ended:
            return
        if len(self._items) >= self._maxsize:
            self._items.popleft()
            self.dropped += 1
            if self.dropped == 1:
                _LOGGER.warning(
                    "%s: a consumer is not keeping up; dropping its oldest events (limit %d)",
                    self._client.name,
                    self._maxsize,
                )
        self._items.append(item)
        self._ready.set()

    def _finish(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self._end = error
            self._ready.set()


_CLASSIFY = classify_by_type({HomeAssistantAuthError: Retry.NEVER, HomeAssistantError: Retry.SOON})


class HomeAssistantClient:
    """Long-lived client: reconnects with backoff, resubscribes, fans events out to streams.

    `async with` starts it and waits for the first connection attempt: a rejected token
    raises `HomeAssistantAuthError` there; an unreachable HA is retried in the background.
    A token rejected later ends every stream with that error instead of retrying.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        name: str = "homeassistant",
        policy: ReconnectPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        event_types: Sequence[str] = (STATE_CHANGED,),
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        connect_wait_s: float = DEFAULT_CONNECT_WAIT_S,
        coalesce_messages: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.url = websocket_url(url)
        self._base_url = url
        self._token = token
        self.policy = policy or ReconnectPolicy(name=name, logger=_LOGGER)
        self._session = session
        self._event_types = tuple(event_types)
        self._connection_options: dict[str, Any] = {
            "connect_timeout_s": connect_timeout_s,
            "command_timeout_s": command_timeout_s,
            "heartbeat_interval_s": heartbeat_interval_s,
            "heartbeat_timeout_s": heartbeat_timeout_s,
            "coalesce_messages": coalesce_messages,
        }
        self._connect_wait_s = connect_wait_s
        self._sleep = sleep
        self._connection: HomeAssistantConnection | None = None
        self._connected = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._fatal: HomeAssistantAuthError | None = None
        self._streams: set[EventStream] = set()
        self._task: asyncio.Task[None] | None = None
        # Entities whose changes are streamed (via subscribe_entities), across reconnects.
        self._watched: set[str] = set()
        self._mirror = EntityMirror()
        self.ha_version = ""
        self.connections = 0

    def __repr__(self) -> str:
        return f"<HomeAssistantClient {self.name} {self.url} {self.state.value}>"

    @property
    def state(self) -> ConnectionState:
        """The connection state, for /healthz."""
        return self.policy.state

    @property
    def connected(self) -> bool:
        """Whether a live, authenticated connection exists right now."""
        return self._connection is not None and not self._connection.closed

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start connecting; raises `HomeAssistantAuthError` if the token is rejected."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}:connection")
        await self._first_attempt.wait()
        if self._fatal is not None:
            await self.aclose()
            raise self._fatal

    async def aclose(self) -> None:
        """Disconnect and end every stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.policy.state is not ConnectionState.FAILED:
            self.policy.stopped()
        for stream in list(self._streams):
            stream._finish(self._fatal)
        self._streams.clear()

    def subscribe_events(self, maxsize: int = MAX_QUEUED_EVENTS) -> EventStream:
        """A new stream of this client's events (the `event_types` given at construction)."""
        stream = EventStream(self, maxsize)
        if self._fatal is not None:
            stream._finish(self._fatal)
            return stream
        self._streams.add(stream)
        if self.connected:
            stream._connected()
        return stream

    async def wait_connected(self, timeout_s: float | None = None) -> HomeAssistantConnection:
        """The live connection, waiting up to `timeout_s` (default `connect_wait_s`) for one."""
        deadline = self._connect_wait_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(deadline):
                while True:
                    if self._fatal is not None:
                        raise self._fatal
                    connection = self._connection
                    if connection is not None and not connection.closed:
                        return connection
                    if self._task is None:
                        raise HomeAssistantConnectionError(f"{self.name}: client is not running")
                    await self._connected.wait()
                    # The event may be stale if the connection dropped since; re-check.
                    if not self.connected:
                        self._connected.clear()
        except TimeoutError as err:
            raise HomeAssistantConnectionError(
                f"{self.name}: not connected to {self.url} (last error: "
                f"{self.policy.last_error or 'none'})"
            ) from err

    async def get_states(self) -> list[dict[str, Any]]:
        """Every entity's current state object."""
        connection = await self.wait_connected()
        return await connection.get_states()

    async def command(self, message: Mapping[str, Any], *, timeout_s: float | None = None) -> Any:
        """Send one command on the live connection (waiting briefly for one); its `result`."""
        connection = await self.wait_connected()
        return await connection.command(message, timeout_s=timeout_s)

    async def call_service(
        self,
        domain: str,
        service: str,
        service_data: Mapping[str, Any] | None = None,
        target: Mapping[str, Any] | None = None,
        *,
        return_response: bool = False,
        timeout_s: float | None = None,
    ) -> Any:
        """Call a service on the live connection (waiting briefly for one); see the connection."""
        connection = await self.wait_connected()
        return await connection.call_service(
            domain,
            service,
            service_data,
            target,
            return_response=return_response,
            timeout_s=timeout_s,
        )

    @property
    def watched(self) -> frozenset[str]:
        """The entities whose state changes this client streams."""
        return frozenset(self._watched)

    async def watch_entities(self, entity_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Stream these entities' changes too, as `state_changed` events; returns their states.

        Home Assistant filters server-side, so the rest of the house never reaches us. The
        returned states are those at subscription time of the entities not watched before
        (empty when not connected: the next connection subscribes them). Ids HA would
        reject are left out with a warning, as one of them would fail the whole command.
        """
        new: set[str] = set()
        for entity_id in entity_ids:
            if entity_id in self._watched:
                continue
            if not valid_entity_id(entity_id):
                _LOGGER.warning("%s: not watching %r: not a valid entity id", self.name, entity_id)
                continue
            new.add(entity_id)
        if not new:
            return []
        self._watched |= new
        connection = self._connection
        if connection is None or connection.closed:
            return []
        try:
            return await self._subscribe_entities(connection, new)
        except HomeAssistantError as err:
            # The reconnect that follows a lost connection subscribes every watched entity.
            _LOGGER.warning("%s: cannot watch %s yet: %s", self.name, ", ".join(sorted(new)), err)
            return []

    async def _subscribe_entities(
        self, connection: HomeAssistantConnection, entity_ids: Collection[str]
    ) -> list[dict[str, Any]]:
        initial: asyncio.Future[list[EntityChange]] = asyncio.get_running_loop().create_future()

        def on_event(event: Mapping[str, Any]) -> None:
            # HA sends the current states as the first event, right after the result; they
            # enter the mirror at once, as the changes that follow are diffs against them.
            if not initial.done():
                initial.set_result(self._mirror.apply(event))
            else:
                self._dispatch_changes(event)

        await connection.subscribe_entities(entity_ids, on_event)
        closed = asyncio.ensure_future(connection.wait_closed())
        try:
            await asyncio.wait(
                (initial, closed),
                timeout=self._connection_options["command_timeout_s"],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            closed.cancel()
        if not initial.done():
            initial.cancel()
            if connection.closed:
                raise await connection.wait_closed()
            raise HomeAssistantCommandError("timeout", "no initial states after subscribe_entities")
        return [change.new_state for change in initial.result() if change.new_state is not None]

    def _dispatch_changes(self, event: Mapping[str, Any]) -> None:
        for change in self._mirror.apply(event):
            item = HassEvent.from_change(change)
            for stream in list(self._streams):
                stream._put(item)

    async def discover_speakers(self) -> list[ConversationSensor]:
        """The conversation sensors Home Assistant has right now."""
        return discover_conversation_sensors(await self.get_states())

    async def _run(self) -> None:
        runner = ReconnectRunner(
            self.policy, _CLASSIFY, sleep=self._sleep, on_failure=self._attempt_failed
        )
        try:
            await runner.run(self._attempt)
        except HomeAssistantAuthError as err:
            # The message says what to do; a traceback would only bury it.
            _LOGGER.error("%s: %s", self.name, err)  # noqa: TRY400
            self._fatal = err
            self._first_attempt.set()
            self._connected.set()  # wake waiters so they see the fatal error
            for stream in list(self._streams):
                stream._finish(err)
            self._streams.clear()

    async def _attempt(self) -> None:
        connection = HomeAssistantConnection(
            self._base_url, self._token, session=self._session, **self._connection_options
        )
        try:
            closed = await self._connect_once(connection)
        finally:
            self._connection = None
            self._connected.clear()
        raise closed  # a connection only ends by failing; the runner retries it

    def _attempt_failed(self, error: Exception, delay: float) -> None:
        self._first_attempt.set()  # start() waits for the first outcome, good or bad

    async def _connect_once(self, connection: HomeAssistantConnection) -> HomeAssistantError:
        async with connection:
            for event_type in self._event_types:
                await connection.subscribe_events(event_type, self._dispatch)
            self._mirror = EntityMirror()
            if self._watched:
                # Only the baseline: a consumer compares against it after `Subscribed`.
                await self._subscribe_entities(connection, self._watched)
            self._connection = connection
            self.ha_version = connection.ha_version
            self.connections += 1
            self.policy.connected()
            self._connected.set()
            self._first_attempt.set()
            for stream in list(self._streams):
                stream._connected()
            return await connection.wait_closed()

    def _dispatch(self, event: Mapping[str, Any]) -> None:
        item = HassEvent.from_wire(event)
        for stream in list(self._streams):
            stream._put(item)
