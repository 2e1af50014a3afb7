"""Home Assistant sink: speaks answers through a service call, paced per speaker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self

from xiaoai_bridge import adapters
from xiaoai_bridge.clients.homeassistant import (
    STATE_CHANGED,
    HassEvent,
    HomeAssistantClient,
    HomeAssistantCommandError,
    HomeAssistantError,
    refuses_responses,
)
from xiaoai_bridge.models import Answer, HomeAssistantRoute, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.ports import Sink
from xiaoai_bridge.sinks.speaker_queue import (
    DEFAULT_MERGE_MAX_CHARS,
    MAX_QUEUED_CHUNKS,
    Clock,
    Playing,
    Sleep,
    SpeakerQueue,
)
from xiaoai_bridge.spoken import estimate_speech_s

_LOGGER = logging.getLogger(__name__)

SINK_NAME = adapters.HOMEASSISTANT
# Mandarin TTS on XiaoAi speaks roughly 4-5 characters a second.
DEFAULT_CHARS_PER_SECOND = 4.5
# Xiaomi's cloud takes a moment between the service call and the first sound.
DEFAULT_SPEECH_OVERHEAD_S = 0.5
# With media_player state, wait for "playing" to end, but never longer than this many
# times the estimate (a speaker may go back to playing music after the TTS).
DEFAULT_PLAYER_MAX_STRETCH = 1.5
DEFAULT_CALL_TIMEOUT_S = 15.0
SUGGESTED_ACKNOWLEDGEMENT = "让我想想"

StopMode = Literal["none", "pause", "stop"]


@dataclass(frozen=True, slots=True)
class SpeakService:
    """Which service speaks a text, and where the text and the entity go in its data."""

    domain: str
    service: str
    text_field: str = "text"
    # None: the entity goes in `target` instead of the service data.
    entity_field: str | None = "entity_id"
    data: Mapping[str, Any] = field(default_factory=dict)
    # ha_xiaomi_home's notify entities parse `message` as YAML: a JSON list keeps any text
    # (colons, "yes", leading dashes) a plain string.
    text_as_list: bool = False
    return_response: bool = False

    @property
    def full_name(self) -> str:
        """E.g. "xiaomi_miot.intelligent_speaker"."""
        return f"{self.domain}.{self.service}"

    def build(self, entity_id: str, text: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The `service_data` and `target` of a call speaking `text` on `entity_id`."""
        data = dict(self.data)
        data[self.text_field] = (
            json.dumps([text], ensure_ascii=False) if self.text_as_list else text
        )
        if self.entity_field is None:
            return data, {"entity_id": entity_id}
        data[self.entity_field] = entity_id
        return data, None


# hass-xiaomi-miot: play_text through the speaker's MIoT spec. It answers with the MIoT
# result, and reports its own failures as {"error": ...} inside a successful result.
INTELLIGENT_SPEAKER = SpeakService(
    "xiaomi_miot",
    "intelligent_speaker",
    data=MappingProxyType({"execute": False, "silent": False}),
    return_response=True,
)
# Xiaomi's official integration: a notify entity per speaker action (play-text).
NOTIFY_SEND_MESSAGE = SpeakService(
    "notify", "send_message", text_field="message", entity_field=None, text_as_list=True
)


def resolve_speak_service(
    service: str,
    *,
    text_field: str | None = None,
    entity_field: str | None = "entity_id",
    data: Mapping[str, Any] | None = None,
) -> SpeakService:
    """A SpeakService from a config value like "notify.send_message" or "tts.speak".

    The two known services get their presets; any other service is called with its text in
    `text_field` (default "text") and the entity in `entity_field` (None: in `target`).
    """
    domain, _, name = service.partition(".")
    if not domain or not name:
        raise ValueError(f"speak service must look like domain.service, got {service!r}")
    if service == INTELLIGENT_SPEAKER.full_name and text_field is None and data is None:
        return INTELLIGENT_SPEAKER
    if service == NOTIFY_SEND_MESSAGE.full_name and text_field is None and data is None:
        return NOTIFY_SEND_MESSAGE
    return SpeakService(
        domain, name, text_field=text_field or "text", entity_field=entity_field, data=data or {}
    )


def _media_player_of(utterance: Utterance) -> str:
    """The media_player that asked, as the Home Assistant source tells it."""
    route = utterance.route
    return route.media_player if isinstance(route, HomeAssistantRoute) else utterance.device


@dataclass(eq=False)
class _Speaker:
    media_player: str
    target: str
    queue: SpeakerQueue = field(init=False)
    player_state: str | None = None
    saw_playing: bool = False
    player_changed: asyncio.Event = field(default_factory=asyncio.Event)


class HomeAssistantSink(Sink):
    """Speaks each answer's sentences on the asking speaker through a Home Assistant service.

    The services give no end-of-speech signal and a new text cuts off the one being spoken,
    so each speaker has a queue: the next call goes out when the previous text should have
    been spoken (estimated from its length), or earlier once the media_player reports that
    it stopped playing. Sentences that queue up meanwhile are merged into one call, and a new
    question from the same speaker drops whatever of the old answer is still queued.
    Use it as `async with`, which runs the media_player watcher and stops the queues.
    """

    def __init__(
        self,
        client: HomeAssistantClient,
        *,
        name: str = SINK_NAME,
        speak: SpeakService = INTELLIGENT_SPEAKER,
        speak_targets: Mapping[str, str] | None = None,
        chars_per_second: float = DEFAULT_CHARS_PER_SECOND,
        speech_overhead_s: float = DEFAULT_SPEECH_OVERHEAD_S,
        merge_max_chars: int = DEFAULT_MERGE_MAX_CHARS,
        stop_xiaoai: StopMode = "none",
        acknowledgement: str = "",
        follow_player_state: bool = True,
        player_max_stretch: float = DEFAULT_PLAYER_MAX_STRETCH,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        max_queued_chunks: int = MAX_QUEUED_CHUNKS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """`speak_targets` maps a media_player to the entity to speak on (e.g. a notify entity).

        `stop_xiaoai` pauses or stops the media_player when a question is accepted, cutting
        XiaoAi's own answer short; `acknowledgement` (e.g. "让我想想") is spoken right then.
        """
        if chars_per_second <= 0:
            raise ValueError("chars_per_second must be positive")
        self._client = client
        self._name = name
        self._speak = speak
        self._speak_targets = dict(speak_targets or {})
        self._chars_per_second = chars_per_second
        self._overhead_s = speech_overhead_s
        self._merge_max_chars = merge_max_chars
        self._stop_xiaoai = stop_xiaoai
        self._acknowledgement = acknowledgement.strip()
        self._follow_player_state = follow_player_state
        self._player_max_stretch = max(1.0, player_max_stretch)
        self._call_timeout_s = call_timeout_s
        self._max_queued = max_queued_chunks
        self._clock = Clock(clock, sleep)
        # Cleared once the speak service refuses return_response (hass-xiaomi-miot < 0.7.18).
        self._ask_response = speak.return_response
        self._speakers: dict[str, _Speaker] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.spoken = 0
        self.failed = 0

    @property
    def name(self) -> str:
        """Registry key; matches the Home Assistant source's name."""
        return self._name

    async def __aenter__(self) -> Self:
        if self._follow_player_state and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_players(), name=f"{self._name}:players")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drop every queue and stop the tasks."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for speaker in self._speakers.values():
            await speaker.queue.aclose()

    async def begin(self, utterance: Utterance) -> None:
        """A new question: drop the old answer's queue, optionally silence XiaoAi and ack."""
        speaker = self._speaker(utterance)
        await speaker.queue.interrupt()
        speaker.saw_playing = False
        if self._stop_xiaoai != "none":
            speaker.queue.act(functools.partial(self._silence_xiaoai, speaker), at_once=True)
        if self._acknowledgement:
            speaker.queue.say(self._acknowledgement, mergeable=False)

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """Queue one sentence for the utterance's speaker."""
        if text := chunk.text.strip():
            self._speaker(utterance).queue.say(text)

    async def end(self, answer: Answer) -> None:
        """Nothing to flush: queued sentences keep being spoken at their pace."""
        _LOGGER.debug("%s: %s ended (%s)", self._name, answer.utterance.id, answer.outcome.value)

    async def wait_idle(self) -> None:
        """Wait until every queued sentence was handed to Home Assistant."""
        for speaker in list(self._speakers.values()):
            await speaker.queue.wait_idle()

    def pending(self, media_player: str) -> int:
        """Sentences queued (not yet sent) for one speaker."""
        speaker = self._speakers.get(media_player)
        return speaker.queue.pending if speaker is not None else 0

    def _speaker(self, utterance: Utterance) -> _Speaker:
        media_player = _media_player_of(utterance)
        speaker = self._speakers.get(media_player)
        if speaker is None:
            target = self._speak_targets.get(media_player, media_player)
            speaker = _Speaker(media_player=media_player, target=target)
            speaker.queue = SpeakerQueue(
                functools.partial(self._say, speaker),
                until_done=functools.partial(self._until_done, speaker),
                name=self._name,
                label=media_player,
                merge_max_chars=self._merge_max_chars,
                max_queued=self._max_queued,
                clock=self._clock,
            )
            self._speakers[media_player] = speaker
        return speaker

    async def _until_done(self, speaker: _Speaker, playing: Playing) -> None:
        """Until the estimate has passed, or the media_player stopped playing our text."""
        while True:
            if self._follow_player_state and speaker.saw_playing:
                if speaker.player_state != "playing":
                    return
                deadline = playing.sent_at + playing.seconds * self._player_max_stretch
            else:
                deadline = playing.sent_at + playing.seconds
            if deadline <= self._clock.now():
                return
            speaker.player_changed.clear()
            await self._clock.sleep_until_set(speaker.player_changed, deadline)

    async def _say(self, speaker: _Speaker, text: str) -> float | None:
        # A "playing" report may arrive before the call returns (hass-xiaomi-miot refreshes
        # the media_player before answering), so start listening for it now.
        speaker.saw_playing = False
        service_data, target = self._speak.build(speaker.target, text)
        ok = await self._call(
            speaker,
            self._speak.domain,
            self._speak.service,
            service_data,
            target,
            return_response=self._ask_response,
        )
        if not ok:
            return None
        self.spoken += 1
        estimate_s = estimate_speech_s(text, self._chars_per_second, self._overhead_s)
        _LOGGER.debug(
            "%s: speaking %d chars on %s (~%.1f s)",
            self._name,
            len(text),
            speaker.target,
            estimate_s,
        )
        return estimate_s

    async def _silence_xiaoai(self, speaker: _Speaker) -> None:
        service = "media_pause" if self._stop_xiaoai == "pause" else "media_stop"
        await self._call(
            speaker, "media_player", service, None, {"entity_id": speaker.media_player}
        )

    async def _call(
        self,
        speaker: _Speaker,
        domain: str,
        service: str,
        service_data: Mapping[str, Any] | None,
        target: Mapping[str, Any] | None,
        *,
        return_response: bool = False,
    ) -> bool:
        try:
            response = await self._client.call_service(
                domain,
                service,
                service_data,
                target,
                return_response=return_response,
                timeout_s=self._call_timeout_s,
            )
        except HomeAssistantCommandError as err:
            if return_response and refuses_responses(err):
                self._stop_asking_response(domain, service)
                return await self._call(speaker, domain, service, service_data, target)
            self.failed += 1
            _LOGGER.warning(
                "%s: %s.%s on %s failed: %s (%s)",
                self._name,
                domain,
                service,
                speaker.target,
                err.message,
                err.code,
            )
            return False
        except HomeAssistantError as err:
            self.failed += 1
            _LOGGER.warning(
                "%s: %s.%s on %s failed: %s", self._name, domain, service, speaker.target, err
            )
            return False
        if isinstance(response, Mapping) and response.get("error"):
            # hass-xiaomi-miot catches its own exceptions and returns them in the response.
            self.failed += 1
            _LOGGER.warning(
                "%s: %s.%s on %s reported an error: %s",
                self._name,
                domain,
                service,
                speaker.target,
                response["error"],
            )
            return False
        return True

    def _stop_asking_response(self, domain: str, service: str) -> None:
        if self._ask_response:
            self._ask_response = False
            _LOGGER.warning(
                "%s: %s.%s does not support responses (hass-xiaomi-miot older than 0.7.18?); "
                "speaking without asking for one, so its own errors go unnoticed",
                self._name,
                domain,
                service,
            )

    async def _watch_players(self) -> None:
        try:
            async with self._client.subscribe_events() as stream:
                async for item in stream:
                    if isinstance(item, HassEvent) and item.event_type == STATE_CHANGED:
                        self._on_state_changed(item)
        except HomeAssistantError as err:
            _LOGGER.debug("%s: media_player watcher stopped: %s", self._name, err)

    def _on_state_changed(self, event: HassEvent) -> None:
        speaker = self._speakers.get(str(event.data.get("entity_id", "")))
        if speaker is None:
            return
        new_state = event.data.get("new_state")
        state = new_state.get("state") if isinstance(new_state, Mapping) else None
        speaker.player_state = str(state) if state is not None else None
        if state == "playing":
            speaker.saw_playing = True
        speaker.player_changed.set()
