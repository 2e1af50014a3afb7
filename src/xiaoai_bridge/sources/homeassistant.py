"""Home Assistant source: turns conversation-sensor state changes into utterances."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from xiaoai_bridge import adapters
from xiaoai_bridge.clients.homeassistant import (
    CONVERSATION_ENTITY_CLASS,
    ENTITY_REGISTRY_UPDATED,
    STATE_CHANGED,
    HassEvent,
    HomeAssistantClient,
    HomeAssistantError,
    Subscribed,
    is_conversation_sensor,
)
from xiaoai_bridge.clients.homeassistant_entities import valid_entity_id
from xiaoai_bridge.models import HomeAssistantRoute, Utterance

_LOGGER = logging.getLogger(__name__)

SOURCE_NAME = adapters.HOMEASSISTANT
# The hass-xiaomi-miot FAQ's own guard against replayed records is "< 60 s old".
DEFAULT_FRESHNESS_S = 60.0
# Discovery mode re-reads every state this often, for speakers whose entity appeared without
# a registry event (an existing entity that hass-xiaomi-miot was still loading).
DEFAULT_REDISCOVER_S = 300.0
# hass-xiaomi-miot names the sensor `<media_player object id>_conversation`.
_SENSOR_PREFIX, _SENSOR_SUFFIX = "sensor.", "_conversation"
_NOT_SPEECH = frozenset({"", "unknown", "unavailable", "none"})
# Epoch values above this are milliseconds (year 5138 in seconds).
_MS_THRESHOLD = 100_000_000_000
# A record this far ahead of our clock is not believed: remembering it as the latest would
# silence the sensor until that moment. Clocks of HA, Xiaomi's cloud and us differ by seconds.
MAX_CLOCK_AHEAD_S = 300.0


def parse_timestamp(value: Any) -> float | None:
    """`attributes.timestamp` as epoch seconds: an ISO string over the API, or epoch s/ms.

    None for anything else, including values no clock can hold (huge integers, inf, nan).
    """
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            seconds = value / 1000 if value > _MS_THRESHOLD else float(value)
        elif isinstance(value, str) and value:
            # A naive value is taken as local time, which is what HA would have meant.
            seconds = datetime.fromisoformat(value).timestamp()
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return seconds if math.isfinite(seconds) else None


def _encodable(text: str) -> bool:
    # JSON may carry lone surrogates ("\ud800"): fine in Python, fatal when sent on as UTF-8.
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def xiaoai_answer(attributes: Mapping[str, Any]) -> str:
    """XiaoAi's own reply text from `answers` (TTS or LLM items), or ""."""
    answers = attributes.get("answers")
    if not isinstance(answers, list):
        return ""
    for answer in answers:
        if not isinstance(answer, Mapping):
            continue
        for kind in ("tts", "llm"):
            body = answer.get(kind)
            text = body.get("text") if isinstance(body, Mapping) else None
            if isinstance(text, str) and text and _encodable(text):
                return text
    return ""


class HomeAssistantSource:
    """Yields every fresh utterance heard by hass-xiaomi-miot conversation sensors.

    A record is accepted once: its timestamp must be newer than the last one seen for that
    sensor and within `freshness_s` of now, so HA restarts and failed polls (which replay
    old records) never yield old questions, while the same sentence said again (only the
    timestamp changes) yields again. Trigger matching is left to the pipeline.
    """

    def __init__(
        self,
        client: HomeAssistantClient,
        *,
        speakers: Mapping[str, str] | None = None,
        freshness_s: float = DEFAULT_FRESHNESS_S,
        catch_up_on_reconnect: bool = True,
        name: str = SOURCE_NAME,
        clock: Callable[[], float] = time.time,
        rediscover_s: float = DEFAULT_REDISCOVER_S,
    ) -> None:
        """`speakers` maps conversation sensor -> media_player; None discovers them.

        An empty media_player in the mapping means "use the sensor's parent_entity_id".
        With `catch_up_on_reconnect`, a fresh record that arrived while disconnected is
        still answered after the reconnect; at the first connection the current records
        are only remembered, never answered.
        """
        self._client = client
        self._configured = dict(speakers) if speakers is not None else None
        self._freshness_s = freshness_s
        self._catch_up = catch_up_on_reconnect
        self._name = name
        self._clock = clock
        self._rediscover_s = rediscover_s
        self._discovered: dict[str, str] = {}
        self._latest: dict[str, float] = {}
        # Entities already handed to the client's watch list.
        self._asked: set[str] = set()

    @property
    def name(self) -> str:
        """Registry key; also `Utterance.source`."""
        return self._name

    @property
    def speakers(self) -> dict[str, str]:
        """Conversation sensor -> media_player, as configured or discovered so far."""
        if self._configured is not None:
            return {
                sensor: player or self._discovered.get(sensor, "")
                for sensor, player in self._configured.items()
            }
        return dict(self._discovered)

    def wanted_entities(self) -> set[str]:
        """The entities this source listens to: its conversation sensors and their speakers."""
        wanted = set(self._configured or ()) | set(self._discovered)
        return wanted | {player for player in self.speakers.values() if player}

    async def utterances(self) -> AsyncGenerator[Utterance, None]:
        """Every fresh utterance, forever; raises HomeAssistantAuthError if the token is bad.

        Only the wanted entities' changes reach this source (the client subscribes to them
        by id), so however busy the house is, nothing else competes for its queue.
        """
        async with self._client.subscribe_events() as stream:
            loop = asyncio.get_running_loop()
            next_scan = loop.time() + self._rediscover_s
            while True:
                try:
                    scan_at = next_scan if self._configured is None else None
                    async with asyncio.timeout_at(scan_at):
                        item = await anext(stream, None)
                except TimeoutError:
                    next_scan = loop.time() + self._rediscover_s
                    found = await self._snapshot(answer=True, warn=False)
                else:
                    if item is None:
                        return  # the client closed
                    found = await self._judge(item)
                found += await self._watch_wanted()
                for utterance in found:
                    yield utterance

    async def _judge(self, item: Subscribed | HassEvent) -> list[Utterance]:
        if isinstance(item, Subscribed):
            return await self._snapshot(answer=item.reconnected and self._catch_up)
        if item.event_type == STATE_CHANGED:
            return [heard] if (heard := self._on_state_changed(item)) else []
        if item.event_type == ENTITY_REGISTRY_UPDATED:
            return await self._on_registry_updated(item)
        return []

    async def _watch_wanted(self) -> list[Utterance]:
        """Ask the client to watch entities found since; judge their states at that moment."""
        found: list[Utterance] = []
        while missing := self.wanted_entities() - self._asked:
            self._asked |= missing
            for state in await self._client.watch_entities(missing):
                # A record said between the snapshot and the subscription is new here.
                if (utterance := self.accept_state(state, answer=True)) is not None:
                    found.append(utterance)
        return found

    async def _on_registry_updated(self, event: HassEvent) -> list[Utterance]:
        """A new (or renamed) conversation sensor: watch it; its first state discovers it."""
        if self._configured is not None:
            return []
        entity_id, old_id = event.data.get("entity_id"), event.data.get("old_entity_id")
        action = event.data.get("action")
        if not isinstance(entity_id, str):
            return []
        is_new_sensor = (
            action == "create"
            and entity_id.startswith(_SENSOR_PREFIX)
            and entity_id.endswith(_SENSOR_SUFFIX)
        )
        renamed = action == "update" and isinstance(old_id, str) and old_id in self._discovered
        if not (is_new_sensor or renamed) or entity_id in self._asked:
            return []
        _LOGGER.debug("%s: %s appeared in the entity registry; watching it", self._name, entity_id)
        self._asked.add(entity_id)
        found = []
        for state in await self._client.watch_entities([entity_id]):
            if (utterance := self.accept_state(state, answer=True)) is not None:
                found.append(utterance)
        return found

    async def _snapshot(self, *, answer: bool, warn: bool = True) -> list[Utterance]:
        try:
            states = await self._client.get_states()
        except HomeAssistantError as err:
            # The next Subscribed marker (after the reconnect) takes a new snapshot.
            _LOGGER.debug("%s: no state snapshot: %s", self._name, err)
            return []
        found = self.accept_states(states, answer=answer)
        if not warn:
            return found
        present = {str(state.get("entity_id", "")) for state in states}
        if self._configured is not None:
            for sensor in sorted(set(self._configured) - present):
                _LOGGER.warning(
                    "%s: configured sensor %s does not exist in Home Assistant", self._name, sensor
                )
        elif not self._discovered:
            _LOGGER.warning(
                "%s: no XiaoAi conversation sensor found (entity_class %s); is hass-xiaomi-miot "
                "set up with the speaker owner's account?",
                self._name,
                CONVERSATION_ENTITY_CLASS,
            )
        return found

    def accept_states(
        self, states: Iterable[Mapping[str, Any]], *, answer: bool
    ) -> list[Utterance]:
        """Feed a get_states snapshot; returns utterances only when `answer` is true."""
        found = []
        for state in states:
            utterance = self.accept_state(state, answer=answer)
            if utterance is not None:
                found.append(utterance)
        return found

    def _on_state_changed(self, event: HassEvent) -> Utterance | None:
        new_state = event.data.get("new_state")
        if not isinstance(new_state, Mapping):
            return None  # entity removed
        return self.accept_state(new_state, answer=True)

    def accept_state(self, state: Mapping[str, Any], *, answer: bool = True) -> Utterance | None:
        """Judge one conversation-sensor state object; an Utterance if it is a new question."""
        sensor = state.get("entity_id")
        if not isinstance(sensor, str):
            return None
        media_player = self._track(sensor, state)
        if media_player is None:
            return None
        text = state.get("state")
        if not isinstance(text, str) or not _encodable(text):
            _LOGGER.warning("%s: %s has a state that is not text; ignored", self._name, sensor)
            return None
        text = text.strip()
        if text.lower() in _NOT_SPEECH:
            _LOGGER.debug("%s: %s is %r; ignored", self._name, sensor, text)
            return None
        attributes = state.get("attributes")
        attributes = attributes if isinstance(attributes, Mapping) else {}
        raw_timestamp = attributes.get("timestamp")
        said_at = parse_timestamp(raw_timestamp)
        if said_at is None:
            _LOGGER.warning(
                "%s: %s has no usable timestamp (a %s); ignored",
                self._name,
                sensor,
                type(raw_timestamp).__name__,
            )
            return None
        if said_at - self._clock() > MAX_CLOCK_AHEAD_S:
            _LOGGER.warning(
                "%s: %s record is %.0f s in the future; ignored",
                self._name,
                sensor,
                said_at - self._clock(),
            )
            return None
        latest = self._latest.get(sensor)
        if latest is not None and said_at <= latest:
            # An answers-only update, a replay after a failed poll, or an HA restart.
            _LOGGER.debug("%s: %s record at %s already seen", self._name, sensor, raw_timestamp)
            return None
        self._latest[sensor] = said_at
        age = self._clock() - said_at
        if age > self._freshness_s:
            _LOGGER.info(
                "%s: %s record is %.0f s old (limit %.0f s); ignored",
                self._name,
                sensor,
                age,
                self._freshness_s,
            )
            return None
        if not answer:
            return None
        stamp = raw_timestamp if isinstance(raw_timestamp, str) else repr(said_at)
        return Utterance(
            text=text,
            device=media_player,
            id=f"{sensor}@{round(said_at * 1000)}",
            source=self._name,
            route=HomeAssistantRoute(media_player=media_player, sensor=sensor, timestamp=stamp),
            xiaoai_answer=xiaoai_answer(attributes),
            said_at=said_at,
        )

    def _track(self, sensor: str, state: Mapping[str, Any]) -> str | None:
        """The media_player for a sensor we listen to, or None to ignore the entity."""
        attributes = state.get("attributes")
        parent = ""
        if isinstance(attributes, Mapping):
            value = attributes.get("parent_entity_id")
            # It becomes a service call's target: only an id HA itself could have made.
            parent = value if isinstance(value, str) and valid_entity_id(value) else ""
        if self._configured is not None:
            if sensor not in self._configured:
                return None
            if parent:
                self._discovered[sensor] = parent
            return self._configured[sensor] or self._discovered.get(sensor) or sensor
        if is_conversation_sensor(state) and valid_entity_id(sensor):
            player = parent or self._discovered.get(sensor) or sensor
            if self._discovered.get(sensor) != player:
                if sensor not in self._discovered:
                    _LOGGER.info("%s: found speaker %s -> %s", self._name, sensor, parent)
                self._discovered[sensor] = player
            return self._discovered[sensor]
        # An unavailable sensor has lost its entity_class attribute; keep it known.
        return self._discovered.get(sensor)
