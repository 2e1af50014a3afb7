"""Home Assistant tools: read and control the entities the user exposed to Assist."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xiaoai_bridge.clients.homeassistant import (
    HomeAssistantAuthError,
    HomeAssistantClient,
    HomeAssistantCommandError,
    HomeAssistantConnection,
    HomeAssistantConnectionError,
    HomeAssistantError,
)
from xiaoai_bridge.clients.homeassistant_entities import EntityMirror, valid_entity_id
from xiaoai_bridge.llm.base import ToolSpec
from xiaoai_bridge.models import SpeakerId
from xiaoai_bridge.pipeline.tool_ports import (
    NeedsConfirmation,
    SourceHealth,
    Tool,
    ToolContext,
    ToolError,
    ToolOutput,
)

_LOGGER = logging.getLogger(__name__)

SOURCE_NAME = "homeassistant"
GET_STATE = "ha_get_state"
CONTROL = "ha_control"
ASSIST = "ha_assist"
# Exposure is per assistant; Assist (HA's own conversation agent) is the one we stand in for.
ASSISTANT = "conversation"

# Registry events that can change what is exposed or how it is named. Exposure set on a
# registered entity lives in its registry options, so toggling it fires the first one.
REGISTRY_EVENTS = ("entity_registry_updated", "area_registry_updated", "device_registry_updated")
# Backstop for changes that fire no event: exposing a legacy entity (one without a unique
# id) and the expose-new-entities switch. Everything else is caught by the events above.
DEFAULT_REFRESH_S = 300.0
# Registry events come in bursts (an integration loading its entities): one refresh per burst.
DEFAULT_DEBOUNCE_S = 1.0
# Between attempts when HA is unreachable or a refresh failed.
DEFAULT_RETRY_S = 5.0
MAX_RESULT_CHARS = 2000
# The entity list offered in the schema: large houses get the first ones and a note.
MAX_LISTED_CHARS = 6000
MAX_CANDIDATES = 8
# Per-speaker conversation ids kept for ha_assist follow-ups.
MAX_ASSIST_CONVERSATIONS = 64

ADMIN_NEEDED = (
    "Home Assistant refused to list the entities exposed to Assist (unauthorized): the access "
    "token must belong to an administrator user; no Home Assistant entity tools are offered"
)

# core homeassistant/exposed_entities.py: the lazy default for entities without a setting.
DEFAULT_EXPOSED_DOMAINS = frozenset(
    {
        "climate",
        "cover",
        "fan",
        "humidifier",
        "light",
        "lock",
        "scene",
        "script",
        "switch",
        "todo",
        "vacuum",
        "water_heater",
    }
)
DEFAULT_EXPOSED_BINARY_SENSOR_CLASSES = frozenset(
    {"door", "garage_door", "lock", "motion", "opening", "presence", "window"}
)
DEFAULT_EXPOSED_SENSOR_CLASSES = frozenset(
    {"aqi", "co", "co2", "humidity", "pm10", "pm25", "temperature", "volatile_organic_compounds"}
)
NEVER_EXPOSED = frozenset({"group.all_locks"})

# The services ha_control may call, per domain, with the data fields each accepts. Anything
# else (restarts, automations, shell commands, ...) is refused whatever the model asks.
_ON_OFF: dict[str, frozenset[str]] = {
    "turn_on": frozenset(),
    "turn_off": frozenset(),
    "toggle": frozenset(),
}
ALLOWED_SERVICES: dict[str, dict[str, frozenset[str]]] = {
    "light": {**_ON_OFF, "turn_on": frozenset({"brightness_pct", "color_temp_kelvin"})},
    "switch": _ON_OFF,
    "input_boolean": _ON_OFF,
    "fan": {**_ON_OFF, "set_percentage": frozenset({"percentage"})},
    "humidifier": {**_ON_OFF, "set_humidity": frozenset({"humidity"})},
    "climate": {
        "turn_on": frozenset(),
        "turn_off": frozenset(),
        "set_temperature": frozenset({"temperature", "hvac_mode"}),
        "set_hvac_mode": frozenset({"hvac_mode"}),
    },
    "water_heater": {
        "turn_on": frozenset(),
        "turn_off": frozenset(),
        "set_temperature": frozenset({"temperature"}),
    },
    "cover": {
        "open_cover": frozenset(),
        "close_cover": frozenset(),
        "stop_cover": frozenset(),
        "set_cover_position": frozenset({"position"}),
    },
    "valve": {"open_valve": frozenset(), "close_valve": frozenset()},
    "media_player": {
        "turn_on": frozenset(),
        "turn_off": frozenset(),
        "volume_set": frozenset({"volume_level"}),
        "volume_mute": frozenset({"is_volume_muted"}),
        "media_play": frozenset(),
        "media_pause": frozenset(),
        "media_stop": frozenset(),
        "media_next_track": frozenset(),
        "media_previous_track": frozenset(),
    },
    "scene": {"turn_on": frozenset()},
    "script": {"turn_on": frozenset()},
    "vacuum": {
        "start": frozenset(),
        "stop": frozenset(),
        "pause": frozenset(),
        "return_to_base": frozenset(),
    },
    # No `code` field: a spoken code would pass through the model, the log and the status
    # page; a lock or panel that needs one answers with HA's own error instead.
    "lock": {"lock": frozenset(), "unlock": frozenset()},
    "alarm_control_panel": {
        "alarm_arm_home": frozenset(),
        "alarm_arm_away": frozenset(),
        "alarm_arm_night": frozenset(),
        "alarm_disarm": frozenset(),
    },
    "button": {"press": frozenset()},
    "input_button": {"press": frozenset()},
}
# Plain words a model tends to use, per domain.
SERVICE_ALIASES: dict[tuple[str, str], str] = {
    ("cover", "open"): "open_cover",
    ("cover", "close"): "close_cover",
    ("cover", "stop"): "stop_cover",
    ("cover", "turn_on"): "open_cover",
    ("cover", "turn_off"): "close_cover",
    ("valve", "open"): "open_valve",
    ("valve", "close"): "close_valve",
    ("scene", "activate"): "turn_on",
    ("scene", "run"): "turn_on",
    ("script", "run"): "turn_on",
    ("lock", "open"): "unlock",
    ("button", "turn_on"): "press",
    ("input_button", "turn_on"): "press",
}
SERVICE_NAMES = sorted(
    {service for services in ALLOWED_SERVICES.values() for service in services}
    | {alias for _, alias in SERVICE_ALIASES}
)
HVAC_MODES = ("off", "heat", "cool", "heat_cool", "auto", "dry", "fan_only")
# Covers that let someone in: acting on them needs a spoken yes, like locks and alarms.
GUARDED_COVER_CLASSES = frozenset({"garage", "gate", "door"})
# Attributes that tell the model nothing about the device.
_QUIET_ATTRIBUTES = frozenset(
    {
        "friendly_name",
        "icon",
        "entity_picture",
        "supported_features",
        "attribution",
        "restored",
        "editable",
        "id",
    }
)
_NOT_NAME = re.compile(r"[\W_的]+")

# (prompt, done, failed) spoken around a guarded action; {name} is the entity, {position} %.
_SPOKEN: dict[str, tuple[str, str, str]] = {
    "unlock": ("确定要打开{name}吗？", "好的，{name}已打开。", "抱歉，{name}没能打开。"),
    "lock": ("确定要锁上{name}吗？", "好的，{name}已锁上。", "抱歉，{name}没能锁上。"),
    "alarm_disarm": ("确定要撤防{name}吗？", "好的，{name}已撤防。", "抱歉，{name}没能撤防。"),
    "alarm_arm_home": (
        "确定要把{name}设为在家布防吗？",
        "好的，{name}已设为在家布防。",
        "抱歉，{name}没能布防。",
    ),
    "alarm_arm_away": (
        "确定要把{name}设为离家布防吗？",
        "好的，{name}已设为离家布防。",
        "抱歉，{name}没能布防。",
    ),
    "alarm_arm_night": (
        "确定要把{name}设为夜间布防吗？",
        "好的，{name}已设为夜间布防。",
        "抱歉，{name}没能布防。",
    ),
    "open_cover": ("确定要打开{name}吗？", "好的，{name}已打开。", "抱歉，{name}没能打开。"),
    "close_cover": ("确定要关上{name}吗？", "好的，{name}已关上。", "抱歉，{name}没能关上。"),
    "set_cover_position": (
        "确定要把{name}调到{position}%吗？",
        "好的，{name}已调到{position}%。",
        "抱歉，{name}没能调整。",
    ),
}


@dataclass(frozen=True, slots=True)
class ExposedEntity:
    """One entity Assist may use, with the names people call it by."""

    entity_id: str
    name: str
    aliases: tuple[str, ...] = ()
    area: str | None = None
    area_aliases: tuple[str, ...] = ()
    device_class: str | None = None

    @property
    def domain(self) -> str:
        """The entity's domain (light, lock, ...)."""
        return self.entity_id.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class _House:
    """One refresh's view: what is exposed, and every entity's name (to refuse the others)."""

    exposed: dict[str, ExposedEntity]
    names: dict[str, str]


def default_exposed(
    entity_id: str, entry: Mapping[str, Any] | None, attributes: Mapping[str, Any]
) -> bool:
    """HA's default for an entity without a stored setting, when new entities are exposed."""
    if entry is not None and (entry.get("entity_category") or entry.get("hidden_by")):
        return False
    domain = entity_id.split(".", 1)[0]
    if domain in DEFAULT_EXPOSED_DOMAINS:
        return True
    device_class = attributes.get("device_class")
    if entry is not None:
        device_class = entry.get("device_class") or entry.get("original_device_class")
    if domain == "binary_sensor":
        return device_class in DEFAULT_EXPOSED_BINARY_SENSOR_CLASSES
    if domain == "sensor":
        return device_class in DEFAULT_EXPOSED_SENSOR_CLASSES
    return False


def _might_default(entity_id: str, attributes: Mapping[str, Any]) -> bool:
    """Whether the default could expose it (its registry entry decides the rest)."""
    domain = entity_id.split(".", 1)[0]
    if domain in DEFAULT_EXPOSED_DOMAINS:
        return True
    device_class = attributes.get("device_class")
    return (
        domain == "binary_sensor" and device_class in DEFAULT_EXPOSED_BINARY_SENSOR_CLASSES
    ) or (domain == "sensor" and device_class in DEFAULT_EXPOSED_SENSOR_CLASSES)


def _setting(listed: Mapping[str, Any], entity_id: str) -> bool | None:
    settings = listed.get(entity_id)
    value = settings.get(ASSISTANT) if isinstance(settings, Mapping) else None
    return value if isinstance(value, bool) else None


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(item.strip() for item in value if isinstance(item, str) and item.strip())


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def normalized(name: str) -> str:
    """A name as compared with what people say: no case, spaces, punctuation or 的."""
    return _NOT_NAME.sub("", name.casefold())


def _by_id(items: Any, key: str) -> dict[str, Mapping[str, Any]]:
    if not isinstance(items, list):
        return {}
    return {
        item[key]: item
        for item in items
        if isinstance(item, Mapping) and isinstance(item.get(key), str)
    }


def _attributes(state: Mapping[str, Any]) -> Mapping[str, Any]:
    attributes = state.get("attributes")
    return attributes if isinstance(attributes, Mapping) else {}


def brief_state(state: Mapping[str, Any] | None) -> str:
    """The state in a few words: 'on, 80%', '23.5 °C', 'heat, set to 24'."""
    if state is None:
        return "unknown"
    value = str(state.get("state", "unknown"))
    attributes = _attributes(state)
    parts = [value]
    if unit := _text(attributes.get("unit_of_measurement")):
        parts = [f"{value} {unit}"]
    brightness = attributes.get("brightness")
    if isinstance(brightness, int | float) and not isinstance(brightness, bool) and value == "on":
        parts.append(f"brightness {round(brightness * 100 / 255)}%")
    for key, label in (
        ("current_temperature", "now"),
        ("temperature", "set to"),
        ("current_position", "position"),
        ("percentage", "speed"),
    ):
        item = attributes.get(key)
        if isinstance(item, int | float) and not isinstance(item, bool):
            parts.append(f"{label} {item:g}")
    return ", ".join(parts)


def _truncated(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    if len(text) <= limit:
        return text
    note = " … (truncated)"
    return text[: limit - len(note)] + note


class HomeAssistantTools:
    """Tool source over a HomeAssistantClient: what the user exposed to Assist, and acting on it.

    HA's exposure settings are the boundary: only exposed entities are described, read or
    controlled, and only through the services in ALLOWED_SERVICES. Locks, alarm panels and
    garage-type covers ask the user first. `run()` keeps the view fresh while connected.
    """

    def __init__(
        self,
        client: HomeAssistantClient,
        *,
        assist: bool = False,
        assist_agent_id: str | None = None,
        assist_language: str | None = None,
        refresh_s: float = DEFAULT_REFRESH_S,
        debounce_s: float = DEFAULT_DEBOUNCE_S,
        retry_s: float = DEFAULT_RETRY_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._assist = assist
        self._assist_agent_id = assist_agent_id
        self._assist_language = assist_language
        self._refresh_s = refresh_s
        self._debounce_s = debounce_s
        self._retry_s = retry_s
        self._sleep = sleep
        self._house: _House | None = None
        # Current states of the exposed entities, kept by a subscribe_entities subscription.
        self._states: dict[str, dict[str, Any]] = {}
        self._not_admin = False
        self._fatal: str | None = None
        self._last_error: str | None = None
        self._conversations: OrderedDict[SpeakerId, str] = OrderedDict()
        self._tools: dict[str, Tool] = {
            GET_STATE: _Tool(self._get_state_spec, self._get_state, self._changes),
            CONTROL: _Tool(self._control_spec, self._control, self._changes),
            ASSIST: _Tool(self._assist_spec, self._assist_call, self._changes),
        }
        self.refreshes = 0
        # Counts every change a spec could show (refreshes, states), so specs are rebuilt
        # only when one happened, not each time the loop looks at a tool.
        self.changes = 0

    @property
    def name(self) -> str:
        """Shown with each tool."""
        return SOURCE_NAME

    @property
    def exposed(self) -> Mapping[str, ExposedEntity]:
        """The entities exposed to Assist as last read (empty before the first read)."""
        return dict(self._house.exposed) if self._house is not None else {}

    def _changes(self) -> int:
        return self.changes

    def tools(self) -> Sequence[Tool]:
        """The entity tools while HA is connected and something is exposed; ha_assist if on."""
        if not self._client.connected:
            return []
        offered: list[Tool] = []
        if self._house is not None and self._house.exposed and not self._not_admin:
            offered += [self._tools[GET_STATE], self._tools[CONTROL]]
        if self._assist:
            offered.append(self._tools[ASSIST])
        return offered

    def health(self) -> SourceHealth:
        """Exposed entity count, or why there are no entity tools."""
        if self._fatal is not None:
            return SourceHealth(False, self._fatal)
        if self._not_admin:
            return SourceHealth(False, ADMIN_NEEDED)
        if not self._client.connected:
            return SourceHealth(False, "not connected to Home Assistant")
        if self._house is None:
            return SourceHealth(False, self._last_error or "reading the exposed entities")
        count = len(self._house.exposed)
        detail = f"{count} {'entity' if count == 1 else 'entities'} exposed to Assist"
        if self._assist:
            detail += "; ha_assist hands commands to Home Assistant's agent"
        return SourceHealth(True, detail)

    # -- keeping the view fresh ----------------------------------------------------------

    async def run(self) -> None:
        """Read what is exposed on every connection and keep it fresh; never returns."""
        failures = 0
        while True:
            try:
                connection = await self._client.wait_connected()
            except HomeAssistantAuthError as err:
                self._fatal = f"Home Assistant rejected the token: {err}"
                await asyncio.Event().wait()  # the client gave up; so do the tools, quietly
                continue
            except HomeAssistantConnectionError:
                await self._sleep(self._retry_s)
                continue
            refreshes = self.refreshes
            try:
                await self._serve(connection)
                failures = 0
            except HomeAssistantError as err:
                if self.refreshes != refreshes:
                    failures = 0  # it worked for a while: start the backoff again
                error = f"cannot read the exposed entities: {err}"
                # An HA too old for a command fails the same way each time: said once.
                log = _LOGGER.warning if error != self._last_error else _LOGGER.debug
                log("%s tools: %s", SOURCE_NAME, error)
                self._last_error = error
                failures += 1
            if not connection.closed:
                await self._sleep(min(self._retry_s * 2 ** min(failures, 16), self._refresh_s))

    async def _serve(self, connection: HomeAssistantConnection) -> None:
        """Refresh on this connection whenever a registry changes or the backstop is due."""
        wake = asyncio.Event()
        subscriptions: list[int] = []
        try:
            for event_type in REGISTRY_EVENTS:
                subscriptions.append(
                    await connection.subscribe_events(event_type, lambda _event: wake.set())
                )
            while True:
                wake.clear()
                await self._refresh(connection, subscriptions)
                closed = asyncio.ensure_future(connection.wait_closed())
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait(
                        (closed, woken),
                        timeout=self._refresh_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    closed.cancel()
                    woken.cancel()
                if connection.closed:
                    return
                if wake.is_set():
                    await self._sleep(self._debounce_s)
        finally:
            if not connection.closed:
                for subscription in subscriptions:
                    with contextlib.suppress(HomeAssistantError):
                        await connection.unsubscribe_events(subscription)

    async def _refresh(self, connection: HomeAssistantConnection, subscriptions: list[int]) -> None:
        try:
            listed = await connection.command({"type": "homeassistant/expose_entity/list"})
        except HomeAssistantCommandError as err:
            if err.code != "unauthorized":
                raise
            if not self._not_admin:
                _LOGGER.error("%s tools: %s", SOURCE_NAME, ADMIN_NEEDED)  # noqa: TRY400
            self._not_admin = True
            return
        if self._not_admin:
            _LOGGER.info("%s tools: the token may list exposed entities now", SOURCE_NAME)
        self._not_admin = False
        expose_new = await connection.command(
            {"type": "homeassistant/expose_new_entities/get", "assistant": ASSISTANT}
        )
        states = await connection.get_states()
        house, exposed_states = await self._read_house(
            connection,
            listed.get("exposed_entities", {}) if isinstance(listed, Mapping) else {},
            isinstance(expose_new, Mapping) and expose_new.get("expose_new") is True,
            states,
        )
        previous = self._house
        self._house = house
        self._states = exposed_states
        self._last_error = None
        self.refreshes += 1
        self.changes += 1
        changed = previous is None or set(previous.exposed) != set(house.exposed)
        if changed:
            _LOGGER.info("%s tools: %d entities exposed to Assist", SOURCE_NAME, len(house.exposed))
        # A new connection has no state subscription yet, even when nothing changed.
        if changed or len(subscriptions) == len(REGISTRY_EVENTS):
            await self._watch(connection, subscriptions, house)

    async def _read_house(
        self,
        connection: HomeAssistantConnection,
        listed: Mapping[str, Any],
        expose_new: bool,
        states: list[dict[str, Any]],
    ) -> tuple[_House, dict[str, dict[str, Any]]]:
        by_id = {
            state["entity_id"]: state
            for state in states
            if isinstance(state.get("entity_id"), str) and valid_entity_id(state["entity_id"])
        }
        names = {
            entity_id: _text(_attributes(state).get("friendly_name")) or entity_id
            for entity_id, state in by_id.items()
        }
        candidates = sorted(
            entity_id
            for entity_id, state in by_id.items()
            if entity_id not in NEVER_EXPOSED
            and (
                _setting(listed, entity_id) is True
                or (
                    _setting(listed, entity_id) is None
                    and expose_new
                    and _might_default(entity_id, _attributes(state))
                )
            )
        )
        if not candidates:
            return _House({}, names), {}
        entries = await connection.command(
            {"type": "config/entity_registry/get_entries", "entity_ids": candidates}
        )
        entries = entries if isinstance(entries, Mapping) else {}
        areas = _by_id(await connection.command({"type": "config/area_registry/list"}), "area_id")
        devices: dict[str, Mapping[str, Any]] = {}
        if any(isinstance(e, Mapping) and e.get("device_id") for e in entries.values()):
            devices = _by_id(
                await connection.command({"type": "config/device_registry/list"}), "id"
            )
        exposed: dict[str, ExposedEntity] = {}
        for entity_id in candidates:
            entry = entries.get(entity_id)
            entry = entry if isinstance(entry, Mapping) else None
            attributes = _attributes(by_id[entity_id])
            if _setting(listed, entity_id) is None and not default_exposed(
                entity_id, entry, attributes
            ):
                continue
            exposed[entity_id] = self._describe(entity_id, entry, attributes, areas, devices)
        return _House(exposed, names), {entity_id: by_id[entity_id] for entity_id in exposed}

    @staticmethod
    def _describe(
        entity_id: str,
        entry: Mapping[str, Any] | None,
        attributes: Mapping[str, Any],
        areas: Mapping[str, Mapping[str, Any]],
        devices: Mapping[str, Mapping[str, Any]],
    ) -> ExposedEntity:
        entry = entry or {}
        name = (
            _text(attributes.get("friendly_name"))
            or _text(entry.get("name"))
            or _text(entry.get("original_name"))
            or entity_id.split(".", 1)[1].replace("_", " ")
        )
        area_id = entry.get("area_id")
        device = devices.get(str(entry.get("device_id")))
        if not isinstance(area_id, str) and device is not None:
            area_id = device.get("area_id")
        area = areas.get(area_id) if isinstance(area_id, str) else None
        device_class = entry.get("device_class") or entry.get("original_device_class")
        device_class = device_class or attributes.get("device_class")
        return ExposedEntity(
            entity_id=entity_id,
            name=name,
            aliases=_strings(entry.get("aliases")),
            area=_text(area.get("name")) if area is not None else None,
            area_aliases=_strings(area.get("aliases")) if area is not None else (),
            device_class=device_class if isinstance(device_class, str) else None,
        )

    async def _watch(
        self, connection: HomeAssistantConnection, subscriptions: list[int], house: _House
    ) -> None:
        """Follow the exposed entities' states (HA filters by id; the rest stays quiet)."""
        if len(subscriptions) > len(REGISTRY_EVENTS):
            with contextlib.suppress(HomeAssistantCommandError):
                await connection.unsubscribe_events(subscriptions.pop())
        if not house.exposed:
            return
        mirror = EntityMirror()

        def on_states(event: Mapping[str, Any]) -> None:
            # Each refresh replaces the dict; changes go to the current one.
            for change in mirror.apply(event):
                if change.new_state is None:
                    self._states.pop(change.entity_id, None)
                else:
                    self._states[change.entity_id] = change.new_state
                self.changes += 1

        subscriptions.append(await connection.subscribe_entities(house.exposed, on_states))

    # -- resolving what the model named ---------------------------------------------------

    def resolve(self, entity: str, area: str | None = None) -> ExposedEntity:
        """The exposed entity meant by an entity id or a spoken name (and area); else ToolError."""
        house = self._house
        if house is None or self._not_admin:
            raise ToolError("the exposed Home Assistant entities are not known yet")
        wanted = entity.strip()
        if wanted in house.exposed:
            return house.exposed[wanted]
        if valid_entity_id(wanted):
            if wanted in house.names:
                raise ToolError(_not_exposed(wanted, house.names[wanted]))
            raise ToolError(f"there is no entity {wanted} in Home Assistant")
        query, place = normalized(wanted), normalized(area) if area else ""
        if not query:
            raise ToolError("name the entity (an entity_id, or its name or alias)")
        rank, found = _best_matches(query, place, house.exposed.values())
        if rank == _PARTIAL or not found:
            # An entity called exactly that, but not exposed, beats a partial match.
            for entity_id, name in house.names.items():
                if normalized(name) == query and entity_id not in house.exposed:
                    raise ToolError(_not_exposed(entity_id, name))
        if len(found) == 1:
            return found[0]
        if found:
            listed = "; ".join(_label(item) for item in found[:MAX_CANDIDATES])
            raise ToolError(f"{entity!r} could mean several entities, ask which: {listed}")
        where = f" in area {area!r}" if area else ""
        raise ToolError(f"no entity exposed to Assist is called {entity!r}{where}")

    # -- the tools ---------------------------------------------------------------------

    def _entity_list(self) -> str:
        house = self._house
        if house is None:
            return ""
        lines: list[str] = []
        size = 0
        entities = sorted(house.exposed.values(), key=lambda e: (e.area or "", e.entity_id))
        for index, item in enumerate(entities):
            line = f"- {_label(item)}: {brief_state(self._states.get(item.entity_id))}"
            if size + len(line) > MAX_LISTED_CHARS:
                lines.append(f"- … {len(entities) - index} more (name them; they still work)")
                break
            lines.append(line)
            size += len(line) + 1
        return "\n".join(lines)

    def _entity_parameters(self) -> dict[str, object]:
        return {
            "entity": {
                "type": "string",
                "description": (
                    "The entity_id, or its name or alias as the user said it. Entities "
                    'exposed to Assist (entity_id "name" aliases [area]: state):\n'
                    + self._entity_list()
                ),
            },
            "area": {
                "type": "string",
                "description": "The area (room) the user named, when names repeat across rooms.",
            },
        }

    def _get_state_spec(self) -> ToolSpec:
        return ToolSpec(
            name=GET_STATE,
            description=(
                "Read the current state and attributes of one Home Assistant entity the user "
                "exposed to Assist (lights, switches, sensors, climate, covers, locks, ...)."
            ),
            parameters={
                "type": "object",
                "properties": self._entity_parameters(),
                "required": ["entity"],
            },
        )

    def _control_spec(self) -> ToolSpec:
        properties = {
            "entity": {
                "type": "string",
                "description": "The entity_id or spoken name, as listed in ha_get_state.",
            },
            "area": {"type": "string", "description": "The area (room), when names repeat."},
            "service": {
                "type": "string",
                "enum": SERVICE_NAMES,
                "description": (
                    "What to do; it must suit the entity's domain: turn_on/turn_off/toggle, "
                    "open_cover/close_cover/stop_cover/set_cover_position, set_temperature, "
                    "set_hvac_mode, set_percentage (fans), set_humidity, volume_set, "
                    "volume_mute, media_play/media_pause/media_stop/media_next_track/"
                    "media_previous_track, turn_on for scenes and scripts, lock/unlock, "
                    "alarm_arm_home/alarm_arm_away/alarm_arm_night/alarm_disarm, "
                    "start/stop/pause/return_to_base (vacuums), press (buttons)."
                ),
            },
            "brightness_pct": {"type": "integer", "minimum": 0, "maximum": 100},
            "color_temp_kelvin": {"type": "integer", "minimum": 1000, "maximum": 12000},
            "temperature": {"type": "number", "description": "Target temperature."},
            "hvac_mode": {"type": "string", "enum": list(HVAC_MODES)},
            "position": {"type": "integer", "minimum": 0, "maximum": 100},
            "percentage": {"type": "integer", "minimum": 0, "maximum": 100},
            "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
            "volume_level": {"type": "number", "minimum": 0, "maximum": 1},
            "is_volume_muted": {"type": "boolean"},
        }
        return ToolSpec(
            name=CONTROL,
            description=(
                "Act on one Home Assistant entity the user exposed to Assist: switch it, dim "
                "it, set a temperature or position, run a scene or script, and so on. Locks, "
                "alarm panels and garage doors ask the user to confirm first."
            ),
            parameters={
                "type": "object",
                "properties": properties,
                "required": ["entity", "service"],
            },
        )

    def _assist_spec(self) -> ToolSpec:
        return ToolSpec(
            name=ASSIST,
            description=(
                "Hand a smart-home command or question to Home Assistant's own Assist agent, "
                "in the user's words (e.g. '把客厅灯关了'); returns what it answered."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "text": {"type": "string", "description": "The command, in the user's words."}
                },
                "required": ["text"],
            },
        )

    async def _get_state(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        item = self.resolve(_required(arguments, "entity"), _optional_text(arguments, "area"))
        state = self._states.get(item.entity_id)
        if state is None:
            raise ToolError(f"{item.entity_id} has no state in Home Assistant right now")
        attributes = {
            key: value
            for key, value in _attributes(state).items()
            if key not in _QUIET_ATTRIBUTES and value is not None
        }
        where = f", area {item.area}" if item.area else ""
        text = (
            f"{item.name} ({item.entity_id}{where}): {state.get('state')}; last changed "
            f"{state.get('last_changed')}; attributes: "
            + json.dumps(attributes, ensure_ascii=False, default=str)
        )
        return _truncated(text)

    async def _control(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        item = self.resolve(_required(arguments, "entity"), _optional_text(arguments, "area"))
        asked = _required(arguments, "service")
        service = SERVICE_ALIASES.get((item.domain, asked), asked)
        allowed = ALLOWED_SERVICES.get(item.domain)
        if allowed is None:
            raise ToolError(f"{item.entity_id} can only be read, not controlled")
        if service not in allowed:
            raise ToolError(
                f"{asked} is not allowed for {item.domain} entities; allowed: "
                + ", ".join(sorted(allowed))
            )
        data = _service_data(arguments, allowed[service], item, service)
        if _guarded(item, service):
            prompt, done, failed = _spoken(service, item, data)
            return NeedsConfirmation(
                prompt=prompt, action=lambda: self._confirmed(item, service, data, done, failed)
            )
        await self._call(item, service, data)
        return f"done: {item.domain}.{service} on {item.name} ({item.entity_id})"

    async def _call(self, item: ExposedEntity, service: str, data: Mapping[str, Any]) -> None:
        try:
            await self._client.call_service(
                item.domain, service, data, target={"entity_id": [item.entity_id]}
            )
        except HomeAssistantCommandError as err:
            raise ToolError(
                f"Home Assistant refused {item.domain}.{service} on {item.entity_id}: "
                f"{err.message or err.code}"
            ) from err
        except HomeAssistantError as err:
            raise ToolError(f"Home Assistant is not reachable right now: {err}") from err

    async def _confirmed(
        self, item: ExposedEntity, service: str, data: Mapping[str, Any], done: str, failed: str
    ) -> str:
        """The guarded action after the user said yes; a sentence to speak either way."""
        house = self._house
        if house is None or item.entity_id not in house.exposed:
            _LOGGER.warning("%s tools: %s is no longer exposed", SOURCE_NAME, item.entity_id)
            return failed
        try:
            await self._call(item, service, data)
        except ToolError as err:
            _LOGGER.warning("%s tools: confirmed action failed: %s", SOURCE_NAME, err)
            return failed
        return done

    async def _assist_call(
        self, arguments: Mapping[str, object], context: ToolContext
    ) -> ToolOutput:
        message: dict[str, Any] = {
            "type": "conversation/process",
            "text": _required(arguments, "text"),
        }
        if self._assist_language:
            message["language"] = self._assist_language
        if self._assist_agent_id:
            message["agent_id"] = self._assist_agent_id
        if (conversation_id := self._conversations.get(context.speaker)) is not None:
            message["conversation_id"] = conversation_id
        try:
            result = await self._client.command(message)
        except HomeAssistantCommandError as err:
            raise ToolError(f"Home Assistant's agent refused: {err.message or err.code}") from err
        except HomeAssistantError as err:
            raise ToolError(f"Home Assistant is not reachable right now: {err}") from err
        response = result.get("response") if isinstance(result, Mapping) else None
        if not isinstance(response, Mapping):
            raise ToolError("Home Assistant's agent gave no response")
        if isinstance(conversation_id := result.get("conversation_id"), str):
            self._conversations[context.speaker] = conversation_id
            self._conversations.move_to_end(context.speaker)
            while len(self._conversations) > MAX_ASSIST_CONVERSATIONS:
                self._conversations.popitem(last=False)
        speech = response.get("speech")
        plain = speech.get("plain") if isinstance(speech, Mapping) else None
        said = _text(plain.get("speech")) if isinstance(plain, Mapping) else None
        if response.get("response_type") == "error":
            raise ToolError(f"Home Assistant's agent could not do it: {said or 'no reason'}")
        return _truncated(f"Home Assistant's agent answered: {said or '(nothing)'}")


class _Tool:
    """One of the source's tools; its spec shows the current states, rebuilt after changes."""

    def __init__(
        self,
        spec: Callable[[], ToolSpec],
        run: Callable[[Mapping[str, object], ToolContext], Awaitable[ToolOutput]],
        changes: Callable[[], int],
    ) -> None:
        self._build = spec
        self._run = run
        self._changes = changes
        self._built: tuple[int, ToolSpec] | None = None

    def __repr__(self) -> str:
        return f"<HomeAssistant tool {self.spec.name}>"

    @property
    def spec(self) -> ToolSpec:
        """Name, description and schema (with the exposed entities and their states)."""
        changes = self._changes()
        if self._built is None or self._built[0] != changes:
            self._built = (changes, self._build())
        return self._built[1]

    def offered_to(self, context: ToolContext) -> bool:
        """Any speaker may use Home Assistant."""
        return True

    async def call(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        """Run it; ToolError for anything refused."""
        return await self._run(arguments, context)


def _label(item: ExposedEntity) -> str:
    label = f'{item.entity_id} "{item.name}"'
    if item.aliases:
        label += " aliases " + ", ".join(item.aliases)
    if item.area:
        label += f" [{item.area}]"
    return label


def _not_exposed(entity_id: str, name: str) -> str:
    return (
        f"{name} ({entity_id}) is not exposed to Assist, so it may not be used; the user can "
        "expose it in Home Assistant under Settings > Voice assistants > Expose"
    )


_EXACT, _AREA_AND_NAME, _PARTIAL = 0, 1, 2


def _best_matches(
    query: str, place: str, entities: Iterable[ExposedEntity]
) -> tuple[int, list[ExposedEntity]]:
    """The entities a spoken name (and area) fits best, and how: exact, area + name, partial."""
    ranked: dict[int, list[ExposedEntity]] = {}
    for item in entities:
        names = {normalized(name) for name in (item.name, *item.aliases)} - {""}
        areas = {normalized(area) for area in (item.area or "", *item.area_aliases)} - {""}
        if place and place not in areas:
            continue
        if query in names:
            rank = _EXACT
        elif any(query in (area + name, name + area) for area in areas for name in names):
            rank = _AREA_AND_NAME
        elif len(query) >= 2 and any(
            query in name or (len(name) >= 2 and name in query) for name in names
        ):
            rank = _PARTIAL
        else:
            continue
        ranked.setdefault(rank, []).append(item)
    if not ranked:
        return _PARTIAL, []
    best = min(ranked)
    return best, ranked[best]


def _guarded(item: ExposedEntity, service: str) -> bool:
    if item.domain in ("lock", "alarm_control_panel"):
        return True
    # Stopping a moving door is the safe direction: it never waits for a yes.
    return (
        item.domain == "cover"
        and item.device_class in GUARDED_COVER_CLASSES
        and service != "stop_cover"
    )


def _spoken(service: str, item: ExposedEntity, data: Mapping[str, Any]) -> tuple[str, str, str]:
    prompt, done, failed = _SPOKEN.get(
        service, ("确定要操作{name}吗？", "好的，{name}已完成操作。", "抱歉，{name}没能操作。")
    )
    values = {"name": item.name, "position": data.get("position", "")}
    return prompt.format(**values), done.format(**values), failed.format(**values)


def _required(arguments: Mapping[str, object], key: str) -> str:
    value = arguments.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ToolError(f"{key} is required (a string)")
    return value.strip()


def _optional_text(arguments: Mapping[str, object], key: str) -> str | None:
    value = arguments.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ToolError(f"{key} must be a string")
    return value.strip() or None


def _number(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ToolError(f"{key} must be a number")
    if not low <= value <= high:
        raise ToolError(f"{key} must be between {low:g} and {high:g}")
    return float(value)


def _percent(key: str, value: object) -> int:
    return round(_number(key, value, 0, 100))


def _kelvin(key: str, value: object) -> int:
    return round(_number(key, value, 1000, 12000))


def _temperature(key: str, value: object) -> float:
    return _number(key, value, -50, 150)


def _volume(key: str, value: object) -> float:
    level = _number(key, value, 0, 100)
    return level / 100 if level > 1 else level  # a model that says 30 for "30%" means 0.3


def _hvac_mode(key: str, value: object) -> str:
    if not isinstance(value, str) or value not in HVAC_MODES:
        raise ToolError(f"{key} must be one of {', '.join(HVAC_MODES)}")
    return value


def _flag(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ToolError(f"{key} must be true or false")
    return value


_FIELDS: dict[str, Callable[[str, object], object]] = {
    "brightness_pct": _percent,
    "position": _percent,
    "percentage": _percent,
    "humidity": _percent,
    "color_temp_kelvin": _kelvin,
    "temperature": _temperature,
    "volume_level": _volume,
    "hvac_mode": _hvac_mode,
    "is_volume_muted": _flag,
}
# Services that do nothing without their value.
_NEEDS: dict[str, str] = {
    "set_cover_position": "position",
    "set_temperature": "temperature",
    "set_hvac_mode": "hvac_mode",
    "volume_set": "volume_level",
    "volume_mute": "is_volume_muted",
    "set_percentage": "percentage",
    "set_humidity": "humidity",
}


def _service_data(
    arguments: Mapping[str, object], accepted: frozenset[str], item: ExposedEntity, service: str
) -> dict[str, Any]:
    """The service data from the arguments, each field checked; others are refused."""
    given = {
        key: value
        for key, value in arguments.items()
        if key not in ("entity", "area", "service") and value is not None
    }
    if extra := sorted(set(given) - accepted):
        raise ToolError(
            f"{', '.join(extra)} does not apply to {item.domain}.{service}"
            + (f"; it takes {', '.join(sorted(accepted))}" if accepted else "")
        )
    data = {key: _FIELDS[key](key, value) for key, value in given.items()}
    if (needed := _NEEDS.get(service)) is not None and needed not in data:
        raise ToolError(f"{service} needs {needed}")
    return data
