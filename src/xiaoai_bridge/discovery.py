"""Home Assistant MQTT discovery: the bridge as one device with sensors, a switch and buttons."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from xiaoai_bridge import __version__
from xiaoai_bridge.clients.mqtt import OFFLINE, ONLINE, MqttConnection
from xiaoai_bridge.jsonwire import parse_json
from xiaoai_bridge.models import Answer, Outcome, SpeakerId, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.controls import Controls
from xiaoai_bridge.pipeline.memory import source_of_legacy_device

_LOGGER = logging.getLogger(__name__)

DEFAULT_PREFIX = "homeassistant"
DEFAULT_BASE_TOPIC = "xiaoai-bridge"
DEFAULT_NODE_ID = "xiaoai-bridge"
# Home Assistant's birth and last-will topic, below the discovery prefix.
HA_STATUS_SUFFIX = "status"
# The retained list of everything this bridge published, so a later run can take it back.
REGISTRY_SUFFIX = "discovery"
# HA refuses states longer than this (MAX_LENGTH_STATE_STATE); the full text is an attribute.
MAX_STATE_CHARS = 255
# Attributes over 16 KiB are not recorded by HA; answers never need that much.
MAX_ATTRIBUTE_CHARS = 8000
# Speakers get entities of their own; a flood of made-up device ids must not flood HA.
MAX_SPEAKERS = 256
MAX_OBJECT_ID_CHARS = 48
PAYLOAD_ON = "ON"
PAYLOAD_OFF = "OFF"
PAYLOAD_PRESS = "PRESS"
SOURCE_NAME = "discovery"

_NOT_OBJECT_ID = re.compile(r"[^a-z0-9_-]+")
_ELLIPSIS = "…"


def object_id_for(device: str) -> str:
    """A stable HA object id (and topic level) for a device id: [a-z0-9_-], unique per id."""
    slug = _NOT_OBJECT_ID.sub("_", device.lower()).strip("_")[:MAX_OBJECT_ID_CHARS]
    if slug == device:
        return slug
    # Ids that had to change get a digest, so "a.b" and "a_b" stay two speakers.
    digest = hashlib.sha256(device.encode()).hexdigest()[:8]
    return f"{slug}_{digest}" if slug else digest


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marked with an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + _ELLIPSIS


def _dumps(data: object) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _publishable(topic: object) -> bool:
    return isinstance(topic, str) and bool(topic) and "+" not in topic and "#" not in topic


@dataclass(frozen=True)
class _Registry:
    """The retained `{"speakers": [...], "topics": [...]}` message, sorted and deduplicated."""

    speakers: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()

    @classmethod
    def of(cls, speakers: Iterable[str], topics: Iterable[str]) -> _Registry:
        return cls(tuple(sorted(set(speakers))), tuple(sorted(set(topics))))

    @classmethod
    def parse(cls, payload: bytes) -> _Registry:
        """Read leniently: anything unreadable counts as an empty registry."""
        if not payload:
            return cls()
        try:
            data = parse_json(payload)
        except ValueError as err:
            _LOGGER.warning("ignoring an unreadable discovery registry: %s", err)
            return cls()
        if not isinstance(data, dict):
            return cls()
        speakers = data.get("speakers")
        topics = data.get("topics")
        return cls.of(
            (s for s in speakers if isinstance(s, str) and s) if isinstance(speakers, list) else (),
            (t for t in topics if _publishable(t)) if isinstance(topics, list) else (),
        )

    def encode(self) -> bytes:
        return _dumps({"speakers": list(self.speakers), "topics": list(self.topics)})


class HomeAssistantDiscovery:
    """Announces the bridge to Home Assistant and serves the switch and buttons it offers.

    A dispatcher observer: every accepted question and its answer update the speaker's sensors;
    a speaker's entities are announced the first time it is seen. `run()` serves the commands
    and re-announces everything when Home Assistant comes online.
    """

    def __init__(
        self,
        connection: MqttConnection,
        controls: Controls,
        *,
        availability_topic: str,
        prefix: str = DEFAULT_PREFIX,
        base_topic: str = DEFAULT_BASE_TOPIC,
        node_id: str = DEFAULT_NODE_ID,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, topic in (("prefix", prefix), ("base_topic", base_topic)):
            if not _publishable(topic) or topic.endswith("/"):
                raise ValueError(f"{name} must be a topic without wildcards: {topic!r}")
        self._connection = connection
        self._controls = controls
        self._availability = availability_topic
        self._prefix = prefix
        self._base = base_topic
        self._node = object_id_for(node_id)
        # Unique ids must be unique across every MQTT entity in HA, not only ours.
        self._uid = self._node if "xiaoai" in self._node else f"xiaoai_bridge_{self._node}"
        self._clock = clock
        # Object id -> device id, of every speaker with entities.
        self._speakers: dict[str, SpeakerId] = {}
        # Questions from speakers past MAX_SPEAKERS: answered, but shown nowhere in HA.
        self._unannounced = 0
        self._ha_status_topic = f"{prefix}/{HA_STATUS_SUFFIX}"
        self._registry_topic = f"{base_topic}/{REGISTRY_SUFFIX}"
        self._answering_state = f"{base_topic}/answering"
        self._answering_command = f"{base_topic}/answering/set"
        self._forget_filter = f"{base_topic}/+/forget"
        for topic_filter in self._filters:
            connection.subscribe(topic_filter)
        # HA's switch follows answering, whoever switched it (voice, status page, HA itself).
        controls.on_answering(lambda _on: self.publish_answering())

    @property
    def _filters(self) -> tuple[str, ...]:
        return (
            self._ha_status_topic,
            self._answering_command,
            self._forget_filter,
            self._registry_topic,
        )

    @property
    def name(self) -> str:
        """Observer name, for logs."""
        return SOURCE_NAME

    @property
    def speakers(self) -> dict[str, str]:
        """Object id -> device id of every speaker announced so far."""
        return {object_id: speaker.device for object_id, speaker in self._speakers.items()}

    @property
    def unannounced(self) -> int:
        """Questions from speakers that got no entities because MAX_SPEAKERS was reached."""
        return self._unannounced

    # -- the observer side -------------------------------------------------------------------

    async def begin(self, utterance: Utterance) -> None:
        """A question was accepted: it becomes the speaker's last question."""
        object_id = self._see(utterance.speaker)
        if object_id is None:
            self._refused(utterance.device)
            return
        text = utterance.text.strip()
        self._state(
            f"{self._speaker_topic(object_id)}/question",
            text,
            _question_attributes(text, utterance, self._now()),
        )

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """Sentences are not shown one by one; the sensor shows the whole answer at the end."""

    async def end(self, answer: Answer) -> None:
        """An answer (or apology) was given: it becomes the speaker's last answer."""
        if answer.outcome is Outcome.IGNORED:
            return  # not a question: XiaoAi's own business, or answering is switched off
        object_id = self._see(answer.utterance.speaker)
        if object_id is None:
            return
        self._state(
            f"{self._speaker_topic(object_id)}/answer",
            answer.text,
            _answer_attributes(answer, self._now()),
        )

    # -- the command side --------------------------------------------------------------------

    async def run(self) -> None:
        """Announce everything, then serve commands and HA restarts until cancelled."""
        self.publish_all()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch_home_assistant(), name="discovery:ha-status")
            group.create_task(self._serve_answering(), name="discovery:answering")
            group.create_task(self._serve_forget(), name="discovery:forget")
            group.create_task(self._watch_registry(), name="discovery:registry")

    def publish_all(self) -> None:
        """(Re-)publish every config message, the switch state and the registry."""
        self._publish_bridge_configs()
        for object_id, speaker in self._speakers.items():
            self._publish_speaker_configs(object_id, speaker.device)
        self.publish_answering()
        self._publish_registry()

    def publish_answering(self) -> None:
        """Publish the answering switch state (retained)."""
        state = PAYLOAD_ON if self._controls.answering else PAYLOAD_OFF
        self._connection.publish(self._answering_state, state, retain=True)

    async def _watch_home_assistant(self) -> None:
        async for message in self._connection.messages(self._ha_status_topic):
            if message.payload.strip() == ONLINE.encode():
                _LOGGER.info("Home Assistant is online: publishing discovery again")
                self.publish_all()

    async def _serve_answering(self) -> None:
        async for message in self._connection.messages(self._answering_command):
            command = message.payload.decode(errors="replace").strip().upper()
            if command not in (PAYLOAD_ON, PAYLOAD_OFF):
                _LOGGER.warning("answering switch: unknown command %r", command[:32])
                continue
            # Its listener publishes the new state back to HA.
            self._controls.set_answering(command == PAYLOAD_ON, by="Home Assistant")

    async def _serve_forget(self) -> None:
        prefix, suffix = f"{self._base}/", "/forget"
        async for message in self._connection.messages(self._forget_filter):
            object_id = message.topic.removeprefix(prefix).removesuffix(suffix)
            speaker = self._speakers.get(object_id)
            if speaker is None:
                _LOGGER.warning("forget button of an unknown speaker %r", object_id)
                continue
            await self._controls.forget(speaker, by="Home Assistant's forget button")

    async def _watch_registry(self) -> None:
        # Our own retained registry comes back at every (re)subscription: it brings the
        # speakers of earlier runs, and any topics they published that we no longer do.
        async for message in self._connection.messages(self._registry_topic):
            listed = _Registry.parse(message.payload)
            for device in listed.speakers:
                # The registry names devices only; the next question says whose it is.
                legacy = SpeakerId(source_of_legacy_device(device), device)
                self._see(legacy, register=False, refresh=False)
            expected = set(self._expected_topics())
            stale = [t for t in listed.topics if t not in expected and self._ours(t)]
            for topic in stale:
                self._connection.publish(topic, b"", retain=True)
            if stale:
                _LOGGER.info("removed %d discovery messages no longer published", len(stale))
            if listed != self._current_registry():
                self._publish_registry()

    # -- publishing --------------------------------------------------------------------------

    def _see(
        self, speaker: SpeakerId, *, register: bool = True, refresh: bool = True
    ) -> str | None:
        object_id = object_id_for(speaker.device)
        if object_id in self._speakers:
            if refresh:
                self._speakers[object_id] = speaker  # its buttons act on whoever spoke last
            return object_id
        if len(self._speakers) >= MAX_SPEAKERS:
            return None
        self._speakers[object_id] = speaker
        self._publish_speaker_configs(object_id, speaker.device)
        if register:
            self._publish_registry()
        return object_id

    def _refused(self, device: str) -> None:
        # Once per run: a flood of made-up device ids must not flood the log either.
        if self._unannounced == 0:
            _LOGGER.warning(
                "%d speakers have Home Assistant entities already: questions from further "
                "speakers are answered but get no entities (counted, not logged again)",
                MAX_SPEAKERS,
            )
        self._unannounced += 1
        _LOGGER.debug("no entities for %s: past %d speakers", device, MAX_SPEAKERS)

    def _now(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="seconds")

    def _speaker_topic(self, object_id: str) -> str:
        return f"{self._base}/{object_id}"

    def _config_topic(self, component: str, object_id: str) -> str:
        return f"{self._prefix}/{component}/{self._node}/{object_id}/config"

    def _ours(self, topic: str) -> bool:
        return topic.startswith((f"{self._prefix}/", f"{self._base}/"))

    @property
    def _device(self) -> dict[str, Any]:
        return {
            "identifiers": [self._uid],
            "name": "xiaoai-bridge",
            "manufacturer": "xiaoai-bridge",
            "model": "XiaoAi LLM bridge",
            "sw_version": __version__,
        }

    def _config(self, component: str, object_id: str, values: dict[str, Any]) -> None:
        config: dict[str, Any] = {
            "unique_id": f"{self._uid}_{object_id}",
            "device": self._device,
            "origin": {"name": "xiaoai-bridge", "sw_version": __version__},
            **values,
        }
        self._connection.publish(
            self._config_topic(component, object_id), _dumps(config), retain=True
        )

    @property
    def _availability_config(self) -> dict[str, str]:
        return {
            "availability_topic": self._availability,
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
        }

    def _bridge_entities(self) -> list[tuple[str, str]]:
        return [("binary_sensor", "connectivity"), ("switch", "answering")]

    def _speaker_entities(self, object_id: str) -> list[tuple[str, str]]:
        return [
            ("sensor", f"{object_id}_question"),
            ("sensor", f"{object_id}_answer"),
            ("button", f"{object_id}_forget"),
        ]

    def _publish_bridge_configs(self) -> None:
        self._config(
            "binary_sensor",
            "connectivity",
            {
                # No availability: "offline" must show as disconnected, not as unavailable.
                "name": "Connectivity",
                "device_class": "connectivity",
                "entity_category": "diagnostic",
                "state_topic": self._availability,
                "payload_on": ONLINE,
                "payload_off": OFFLINE,
            },
        )
        self._config(
            "switch",
            "answering",
            {
                "name": "Answering enabled",
                "icon": "mdi:robot",
                "entity_category": "config",
                "command_topic": self._answering_command,
                "state_topic": self._answering_state,
                "payload_on": PAYLOAD_ON,
                "payload_off": PAYLOAD_OFF,
                "qos": 1,
                **self._availability_config,
            },
        )

    def _publish_speaker_configs(self, object_id: str, device: str) -> None:
        base = self._speaker_topic(object_id)
        for kind, label, icon in (
            ("question", "last question", "mdi:account-voice"),
            ("answer", "last answer", "mdi:message-reply-text"),
        ):
            self._config(
                "sensor",
                f"{object_id}_{kind}",
                {
                    "name": f"{device} {label}",
                    "icon": icon,
                    "state_topic": f"{base}/{kind}",
                    "json_attributes_topic": f"{base}/{kind}/attributes",
                    "qos": 1,
                    **self._availability_config,
                },
            )
        self._config(
            "button",
            f"{object_id}_forget",
            {
                "name": f"{device} forget conversation",
                "icon": "mdi:broom",
                "command_topic": f"{base}/forget",
                "payload_press": PAYLOAD_PRESS,
                "qos": 1,
                **self._availability_config,
            },
        )

    def _state(self, topic: str, text: str, attributes: dict[str, Any]) -> None:
        # Attributes first: HA then shows the new state with its own attributes.
        self._connection.publish(f"{topic}/attributes", _dumps(attributes), retain=True)
        self._connection.publish(topic, truncate(text, MAX_STATE_CHARS), retain=True)

    def _expected_topics(self) -> list[str]:
        topics = [self._config_topic(c, o) for c, o in self._bridge_entities()]
        topics.append(self._answering_state)
        for object_id in self._speakers:
            topics.extend(self._config_topic(c, o) for c, o in self._speaker_entities(object_id))
            base = self._speaker_topic(object_id)
            for kind in ("question", "answer"):
                topics.extend((f"{base}/{kind}", f"{base}/{kind}/attributes"))
        return topics

    def _current_registry(self) -> _Registry:
        devices = [speaker.device for speaker in self._speakers.values()]
        return _Registry.of(devices, self._expected_topics())

    def _publish_registry(self) -> None:
        registry = self._current_registry().encode()
        self._connection.publish(self._registry_topic, registry, retain=True)


def _question_attributes(text: str, utterance: Utterance, at: str) -> dict[str, Any]:
    return {
        "text": truncate(text, MAX_ATTRIBUTE_CHARS),
        "device": utterance.device,
        "source": utterance.source,
        "question_id": str(utterance.id),
        "at": at,
    }


def _answer_attributes(answer: Answer, at: str) -> dict[str, Any]:
    return {
        "text": truncate(answer.text, MAX_ATTRIBUTE_CHARS),
        "question": truncate(answer.utterance.text.strip(), MAX_ATTRIBUTE_CHARS),
        "device": answer.utterance.device,
        "question_id": str(answer.utterance.id),
        "outcome": answer.outcome.value,
        "reason": answer.reason,
        "first_chunk_s": None if answer.first_chunk_s is None else round(answer.first_chunk_s, 3),
        "total_s": None if answer.total_s is None else round(answer.total_s, 3),
        "at": at,
    }


class DiscoveryCleaner:
    """With discovery switched off: takes back what an earlier run announced, if anything.

    Reads the retained registry an enabled run left behind, clears every retained message it
    lists (an empty retained payload deletes a discovery config in HA), then the registry.
    """

    def __init__(
        self,
        connection: MqttConnection,
        *,
        prefix: str = DEFAULT_PREFIX,
        base_topic: str = DEFAULT_BASE_TOPIC,
    ) -> None:
        self._connection = connection
        self._roots = (f"{prefix}/", f"{base_topic}/")
        self._registry_topic = f"{base_topic}/{REGISTRY_SUFFIX}"
        connection.subscribe(self._registry_topic)

    async def run(self) -> None:
        """Clear whatever the registry lists, whenever it lists something; until cancelled."""
        async for message in self._connection.messages(self._registry_topic):
            if not message.payload:
                continue  # deleted: by us a moment ago, or never there
            topics = [
                t for t in _Registry.parse(message.payload).topics if t.startswith(self._roots)
            ]
            for topic in topics:
                self._connection.publish(topic, b"", retain=True)
            self._connection.publish(self._registry_topic, b"", retain=True)
            _LOGGER.info("discovery is off: removed %d retained discovery messages", len(topics))
