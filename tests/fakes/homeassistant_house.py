"""The fake Home Assistant's house: registries, Assist exposure, devices that obey services."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.homeassistant_server import FakeHomeAssistant, RecordedCall

# core homeassistant/exposed_entities.py: the assistants and the lazy default's rules.
KNOWN_ASSISTANTS = ("cloud.alexa", "cloud.google_assistant", "conversation")
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
CLOUD_NEVER_EXPOSED_ENTITIES = frozenset({"group.all_locks"})
# er.ENTITY_CATEGORY_INDEX_TO_VALUE, as list_for_display sends it (JSON object keys).
ENTITY_CATEGORIES = {"0": "config", "1": "diagnostic"}
# Commands behind core's `@websocket_api.require_admin`.
ADMIN_ONLY = frozenset(
    {
        "homeassistant/expose_entity",
        "homeassistant/expose_entity/list",
        "homeassistant/expose_new_entities/get",
        "homeassistant/expose_new_entities/set",
    }
)


class CommandFailed(Exception):
    """An error result for the command: HA's `code` and `message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _hex() -> str:
    return uuid.uuid4().hex


@dataclass
class FakeEntityEntry:
    """One entity registry entry (core helpers/entity_registry.py RegistryEntry)."""

    entity_id: str
    platform: str = "demo"
    unique_id: str = field(default_factory=_hex)
    id: str = field(default_factory=_hex)
    name: str | None = None
    original_name: str | None = None
    aliases: list[str] = field(default_factory=list)
    area_id: str | None = None
    device_id: str | None = None
    entity_category: str | None = None
    hidden_by: str | None = None
    disabled_by: str | None = None
    device_class: str | None = None
    original_device_class: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: str = field(default_factory=_now_iso)

    def partial(self) -> dict[str, Any]:
        """`as_partial_dict`: what `config/entity_registry/list` sends."""
        return {
            "area_id": self.area_id,
            "categories": {},
            "config_entry_id": None,
            "created_at": datetime.fromisoformat(self.created_at).timestamp(),
            "device_id": self.device_id,
            "disabled_by": self.disabled_by,
            "entity_category": self.entity_category,
            "entity_id": self.entity_id,
            "has_entity_name": False,
            "hidden_by": self.hidden_by,
            "icon": None,
            "id": self.id,
            "labels": [],
            "modified_at": datetime.fromisoformat(self.created_at).timestamp(),
            "name": self.name,
            "options": copy.deepcopy(self.options),
            "original_name": self.original_name,
            "platform": self.platform,
            "translation_key": None,
            "unique_id": self.unique_id,
        }

    def extended(self) -> dict[str, Any]:
        """`extended_dict`: what `config/entity_registry/get` and `get_entries` send."""
        return {
            **self.partial(),
            "aliases": list(self.aliases),
            "capabilities": None,
            "device_class": self.device_class,
            "original_device_class": self.original_device_class,
            "original_icon": None,
        }

    def display(self) -> dict[str, Any]:
        """`_as_display_dict`: a `list_for_display` entry (short keys, unset ones left out)."""
        shown: dict[str, Any] = {"ei": self.entity_id, "pl": self.platform}
        if self.area_id is not None:
            shown["ai"] = self.area_id
        shown["lb"] = []
        if self.device_id is not None:
            shown["di"] = self.device_id
        if self.entity_category is not None:
            shown["ec"] = {"config": 0, "diagnostic": 1}[self.entity_category]
        if self.hidden_by is not None:
            shown["hb"] = True
        return shown


def _entity_ids(call: RecordedCall) -> list[str]:
    found: list[str] = []
    for source in (call.service_data, call.target or {}):
        value = source.get("entity_id")
        if isinstance(value, str):
            found += [part.strip() for part in value.split(",")]
        elif isinstance(value, list):
            found += [item for item in value if isinstance(item, str)]
    return found


# The state an entity takes after a service, for services that simply set one.
_STATE_AFTER: dict[tuple[str, str], str] = {
    ("light", "turn_off"): "off",
    ("switch", "turn_on"): "on",
    ("switch", "turn_off"): "off",
    ("input_boolean", "turn_on"): "on",
    ("input_boolean", "turn_off"): "off",
    ("fan", "turn_on"): "on",
    ("fan", "turn_off"): "off",
    ("humidifier", "turn_on"): "on",
    ("humidifier", "turn_off"): "off",
    ("media_player", "turn_on"): "on",
    ("media_player", "turn_off"): "off",
    ("climate", "turn_off"): "off",
    ("lock", "lock"): "locked",
    ("lock", "unlock"): "unlocked",
    ("lock", "open"): "open",
    ("alarm_control_panel", "alarm_arm_home"): "armed_home",
    ("alarm_control_panel", "alarm_arm_away"): "armed_away",
    ("alarm_control_panel", "alarm_arm_night"): "armed_night",
    ("alarm_control_panel", "alarm_disarm"): "disarmed",
    ("vacuum", "start"): "cleaning",
    ("vacuum", "stop"): "idle",
    ("vacuum", "pause"): "paused",
    ("vacuum", "return_to_base"): "returning",
    ("cover", "open_cover"): "open",
    ("cover", "close_cover"): "closed",
    ("valve", "open_valve"): "open",
    ("valve", "close_valve"): "closed",
}
# Services whose handler is `_apply`: the house's devices.
HOUSE_SERVICES: tuple[tuple[str, str], ...] = (
    *_STATE_AFTER,
    ("light", "turn_on"),
    ("light", "toggle"),
    ("switch", "toggle"),
    ("fan", "toggle"),
    ("fan", "set_percentage"),
    ("input_boolean", "toggle"),
    ("climate", "turn_on"),
    ("climate", "set_temperature"),
    ("climate", "set_hvac_mode"),
    ("cover", "stop_cover"),
    ("cover", "set_cover_position"),
    ("media_player", "volume_set"),
    ("media_player", "volume_mute"),
    ("humidifier", "set_humidity"),
    ("scene", "turn_on"),
    ("script", "turn_on"),
    ("button", "press"),
)
_TOGGLED = {"on": "off", "off": "on"}

ConversationAgent = Callable[[str, str, str | None], tuple[str, str]]


class FakeHouse:
    """What Assist knows of a house: entity, area and device registries and exposure settings.

    Exposure follows core: a registered entity keeps its setting in the registry's options,
    a legacy one (no unique id) in a separate store, and an entity nobody asked about yet
    has no setting at all (the lazy default is for the client to apply).
    """

    def __init__(self, server: FakeHomeAssistant) -> None:
        self._server = server
        self.entities: dict[str, FakeEntityEntry] = {}
        self.areas: dict[str, dict[str, Any]] = {}
        self.devices: dict[str, dict[str, Any]] = {}
        self.legacy_exposure: dict[str, dict[str, dict[str, Any]]] = {}
        self.expose_new: dict[str, bool] = {}
        # Commands this HA does not have yet (an older core answers unknown_command).
        self.missing: set[str] = set()
        # conversation/process: text -> (response_type, speech); `agent` answers the rest.
        self.conversations: list[dict[str, Any]] = []
        self.agent: ConversationAgent = lambda text, language, agent_id: (
            "error",
            "Sorry, I couldn't understand that",
        )

    # -- building a house --------------------------------------------------------------

    def add_area(self, area_id: str, name: str, *, aliases: Iterable[str] = ()) -> str:
        """An area (core's area registry entry); returns its id."""
        now = datetime.now(UTC).timestamp()
        self.areas[area_id] = {
            "aliases": list(aliases),
            "area_id": area_id,
            "floor_id": None,
            "humidity_entity_id": None,
            "icon": None,
            "labels": [],
            "name": name,
            "picture": None,
            "temperature_entity_id": None,
            "created_at": now,
            "modified_at": now,
        }
        self._server.fire_event("area_registry_updated", {"action": "create", "area_id": area_id})
        return area_id

    def add_device(self, name: str, *, area_id: str | None = None) -> str:
        """A device (core's device registry entry) in an area; returns its id."""
        device_id = _hex()
        now = datetime.now(UTC).timestamp()
        self.devices[device_id] = {
            "area_id": area_id,
            "configuration_url": None,
            "config_entries": [],
            "config_entries_subentries": {},
            "connections": [],
            "created_at": now,
            "disabled_by": None,
            "entry_type": None,
            "hw_version": None,
            "id": device_id,
            "identifiers": [["demo", device_id]],
            "labels": [],
            "manufacturer": "Demo",
            "model": None,
            "model_id": None,
            "modified_at": now,
            "name_by_user": None,
            "name": name,
            "primary_config_entry": None,
            "serial_number": None,
            "sw_version": None,
            "via_device_id": None,
        }
        self._server.fire_event(
            "device_registry_updated", {"action": "create", "device_id": device_id}
        )
        return device_id

    def add_entity(
        self,
        entity_id: str,
        state: str,
        attributes: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        aliases: Iterable[str] = (),
        area_id: str | None = None,
        device_id: str | None = None,
        device_class: str | None = None,
        entity_category: str | None = None,
        hidden: bool = False,
        registered: bool = True,
        expose: bool | None = None,
    ) -> dict[str, Any]:
        """An entity: its registry entry (unless legacy), its state, its Assist setting.

        `expose` None leaves the setting unset, as for an entity no assistant asked about.
        """
        attrs = dict(attributes or {})
        if name is not None:
            attrs.setdefault("friendly_name", name)
        if device_class is not None:
            attrs.setdefault("device_class", device_class)
        if registered:
            self.entities[entity_id] = FakeEntityEntry(
                entity_id,
                original_name=name,
                aliases=list(aliases),
                area_id=area_id,
                device_id=device_id,
                entity_category=entity_category,
                hidden_by="user" if hidden else None,
                original_device_class=device_class,
            )
            self._server.fire_event(
                "entity_registry_updated", {"action": "create", "entity_id": entity_id}
            )
        if expose is not None:
            self.expose(entity_id, expose, notify=False)
        return self._server.set_state(entity_id, state, attrs)

    def expose(
        self,
        entity_id: str,
        should_expose: bool,
        *,
        assistant: str = "conversation",
        notify: bool = True,
    ) -> None:
        """The user ticks or unticks "expose" (core `async_expose_entity`)."""
        entry = self.entities.get(entity_id)
        if entry is None:
            self.legacy_exposure.setdefault(entity_id, {}).setdefault(assistant, {})[
                "should_expose"
            ] = should_expose
            return
        old_options = copy.deepcopy(entry.options)
        if entry.options.get(assistant, {}).get("should_expose") == should_expose:
            return
        entry.options[assistant] = {
            **entry.options.get(assistant, {}),
            "should_expose": should_expose,
        }
        if notify:
            # The registry's update event names the old values of what changed.
            self._server.fire_event(
                "entity_registry_updated",
                {"action": "update", "entity_id": entity_id, "changes": {"options": old_options}},
            )

    def setting(self, entity_id: str, assistant: str = "conversation") -> bool | None:
        """The stored `should_expose` of an entity, None when unset."""
        entry = self.entities.get(entity_id)
        options = entry.options if entry is not None else self.legacy_exposure.get(entity_id, {})
        value = options.get(assistant, {}).get("should_expose")
        return value if isinstance(value, bool) else None

    # -- commands ----------------------------------------------------------------------

    def command(self, kind: str, msg: Mapping[str, Any]) -> Any:
        """The result of one house command; raises CommandFailed for an error result."""
        handler = self._commands().get(kind)
        if handler is None:
            raise KeyError(kind)
        return handler(msg)

    def handles(self, kind: str) -> bool:
        """Whether `kind` is a command of the house (and of this HA version)."""
        return kind in self._commands() and kind not in self.missing

    def _commands(self) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
        return {
            "homeassistant/expose_entity/list": self._expose_list,
            "homeassistant/expose_new_entities/get": self._expose_new_get,
            "homeassistant/expose_new_entities/set": self._expose_new_set,
            "homeassistant/expose_entity": self._expose_entity,
            "config/entity_registry/list": lambda msg: [
                entry.partial() for entry in self.entities.values()
            ],
            "config/entity_registry/list_for_display": lambda msg: {
                "entity_categories": ENTITY_CATEGORIES,
                "entities": [
                    entry.display() for entry in self.entities.values() if entry.disabled_by is None
                ],
            },
            "config/entity_registry/get": self._registry_get,
            "config/entity_registry/get_entries": self._registry_get_entries,
            "config/area_registry/list": lambda msg: list(copy.deepcopy(self.areas).values()),
            "config/device_registry/list": lambda msg: list(copy.deepcopy(self.devices).values()),
            "conversation/process": self._conversation_process,
        }

    def _expose_list(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        # core ws_list_exposed_entities: legacy store first, then every registry entry,
        # each with only the assistants that have a stored setting.
        listed: dict[str, dict[str, bool]] = {}
        for entity_id in [*self.legacy_exposure, *self.entities]:
            listed[entity_id] = {}
            for assistant in KNOWN_ASSISTANTS:
                value = self.setting(entity_id, assistant)
                if value is not None:
                    listed[entity_id][assistant] = value
        return {"exposed_entities": listed}

    def _assistant(self, msg: Mapping[str, Any]) -> str:
        assistant = msg.get("assistant")
        if not isinstance(assistant, str):
            raise CommandFailed("invalid_format", "required key not provided @ data['assistant']")
        if assistant not in KNOWN_ASSISTANTS:
            raise CommandFailed(
                "invalid_format",
                f"value must be one of {sorted(KNOWN_ASSISTANTS)!r} @ data['assistant']",
            )
        return assistant

    def _expose_new_get(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        assistant = self._assistant(msg)
        # core DEFAULT_EXPOSED_ASSISTANT: only the local conversation agent defaults to true.
        return {"expose_new": self.expose_new.get(assistant, assistant == "conversation")}

    def _expose_new_set(self, msg: Mapping[str, Any]) -> None:
        assistant = self._assistant(msg)
        expose_new = msg.get("expose_new")
        if not isinstance(expose_new, bool):
            raise CommandFailed(
                "invalid_format", "expected bool for dictionary value @ data['expose_new']"
            )
        self.expose_new[assistant] = expose_new

    def _expose_entity(self, msg: Mapping[str, Any]) -> None:
        assistants, entity_ids = msg.get("assistants"), msg.get("entity_ids")
        should_expose = msg.get("should_expose")
        if (
            not isinstance(assistants, list)
            or not isinstance(entity_ids, list)
            or not isinstance(should_expose, bool)
            or any(a not in KNOWN_ASSISTANTS for a in assistants)
        ):
            raise CommandFailed("invalid_format", "expected a valid expose_entity command")
        if blocked := next((e for e in entity_ids if e in CLOUD_NEVER_EXPOSED_ENTITIES), None):
            raise CommandFailed("not_allowed", f"can't expose '{blocked}'")
        for entity_id in entity_ids:
            for assistant in assistants:
                self.expose(str(entity_id), should_expose, assistant=assistant)

    def _registry_get(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        entry = self.entities.get(str(msg.get("entity_id")))
        if entry is None:
            raise CommandFailed("not_found", "Entity not found")
        return entry.extended()

    def _registry_get_entries(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        entity_ids = msg.get("entity_ids")
        if isinstance(entity_ids, str):
            entity_ids = [part.strip() for part in entity_ids.split(",")]
        if not isinstance(entity_ids, list) or not all(isinstance(e, str) for e in entity_ids):
            raise CommandFailed("invalid_format", "Entity IDs are invalid @ data['entity_ids']")
        return {
            entity_id: entry.extended() if (entry := self.entities.get(entity_id)) else None
            for entity_id in entity_ids
        }

    def _conversation_process(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        text, language = msg.get("text"), msg.get("language", "zh-Hans")
        agent_id, conversation_id = msg.get("agent_id"), msg.get("conversation_id")
        if not isinstance(text, str):
            raise CommandFailed("invalid_format", "required key not provided @ data['text']")
        if not isinstance(language, str) or not (agent_id is None or isinstance(agent_id, str)):
            raise CommandFailed("invalid_format", "expected str @ data['language']")
        self.conversations.append(dict(msg))
        response_type, speech = self.agent(text, language, agent_id)
        data: dict[str, Any] = (
            {"code": "no_intent_match"}
            if response_type == "error"
            else {"targets": [], "success": [], "failed": []}
        )
        return {
            "response": {
                "speech": {"plain": {"speech": speech, "extra_data": None}},
                "card": {},
                "language": language,
                "response_type": response_type,
                "data": data,
            },
            "conversation_id": conversation_id if isinstance(conversation_id, str) else _hex(),
            "continue_conversation": False,
        }

    # -- devices -----------------------------------------------------------------------

    def apply(self, call: RecordedCall) -> None:
        """What a house service does to the entities it targets (state_changed as in HA)."""
        for entity_id in _entity_ids(call):
            old = self._server.states.get(entity_id)
            if old is None or entity_id.split(".", 1)[0] != call.domain:
                continue  # HA only warns about a missing entity; the call still succeeds
            state, attrs = old["state"], copy.deepcopy(old["attributes"])
            state = self._after(call, state, attrs)
            self._server.set_state(entity_id, state, attrs)

    @staticmethod
    def _after(call: RecordedCall, state: str, attrs: dict[str, Any]) -> str:
        key = (call.domain, call.service)
        state = _STATE_AFTER.get(key, state)
        if call.service == "toggle":
            state = _TOGGLED.get(state, "on")
        if (change := _CHANGES.get(key)) is not None:
            state = change(call.service_data, state, attrs)
        if call.domain == "light" and state == "off":
            attrs["brightness"] = None
        if call.domain == "cover" and key != ("cover", "set_cover_position"):
            attrs["current_position"] = {"open": 100, "closed": 0}.get(
                state, attrs.get("current_position")
            )
        if call.domain in ("scene", "button"):
            state = _now_iso()  # a scene's or button's state is when it last ran
        return state


Change = Callable[[Mapping[str, Any], str, dict[str, Any]], str]


def _light_on(data: Mapping[str, Any], state: str, attrs: dict[str, Any]) -> str:
    attrs["brightness"] = round(float(data.get("brightness_pct", 100)) * 255 / 100)
    if "color_temp_kelvin" in data:
        attrs["color_temp_kelvin"] = int(data["color_temp_kelvin"])
    return "on"


def _fan_percentage(data: Mapping[str, Any], state: str, attrs: dict[str, Any]) -> str:
    attrs["percentage"] = int(data.get("percentage", 0))
    return "on" if attrs["percentage"] else "off"


def _climate_temperature(data: Mapping[str, Any], state: str, attrs: dict[str, Any]) -> str:
    attrs["temperature"] = data.get("temperature")
    return str(data.get("hvac_mode", state))


def _climate_on(data: Mapping[str, Any], state: str, attrs: dict[str, Any]) -> str:
    return next((mode for mode in attrs.get("hvac_modes", []) if mode != "off"), "heat")


def _cover_position(data: Mapping[str, Any], state: str, attrs: dict[str, Any]) -> str:
    attrs["current_position"] = int(data.get("position", 0))
    return "open" if attrs["current_position"] else "closed"


def _set_attribute(name: str, field_name: str, kind: Callable[[Any], Any]) -> Change:
    def change(data: Mapping[str, Any], state: str, attrs: dict[str, Any]) -> str:
        attrs[name] = kind(data.get(field_name))
        return state

    return change


def _script_run(data: Mapping[str, Any], state: str, attrs: dict[str, Any]) -> str:
    attrs["last_triggered"] = _now_iso()
    return state


_CHANGES: dict[tuple[str, str], Change] = {
    ("light", "turn_on"): _light_on,
    ("fan", "set_percentage"): _fan_percentage,
    ("climate", "set_temperature"): _climate_temperature,
    ("climate", "set_hvac_mode"): lambda data, state, attrs: str(data.get("hvac_mode", state)),
    ("climate", "turn_on"): _climate_on,
    ("cover", "set_cover_position"): _cover_position,
    ("media_player", "volume_set"): _set_attribute("volume_level", "volume_level", float),
    ("media_player", "volume_mute"): _set_attribute("is_volume_muted", "is_volume_muted", bool),
    ("humidifier", "set_humidity"): _set_attribute("humidity", "humidity", int),
    ("script", "turn_on"): _script_run,
}
