"""Xiaomi cloud sink: silences XiaoAi, then speaks each sentence paced by the speaker."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

from xiaoai_bridge import adapters
from xiaoai_bridge.audio import AudioStore, AudioStoreError, audio_duration_s
from xiaoai_bridge.clients.tts import TtsEngine, TtsError
from xiaoai_bridge.clients.xiaomi.errors import XiaomiError
from xiaoai_bridge.clients.xiaomi.mina import MinaClient
from xiaoai_bridge.clients.xiaomi.miot import MiotClient, SpeakerActions, speaker_actions
from xiaoai_bridge.models import Answer, QuestionId, SpeechChunk, Utterance, XiaomiRoute
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

SINK_NAME = adapters.XIAOMI
# XiaoAi's Mandarin TTS speaks about 4.5 characters a second (xiaogpt's figure).
DEFAULT_CHARS_PER_SECOND = 4.5
# Cloud relay before the first sound; only added where no play status can tell the end.
DEFAULT_SPEECH_OVERHEAD_S = 0.5
DEFAULT_STATUS_POLL_INTERVAL_S = 0.5
# Status polling starts at this fraction of the estimate, so a sentence that ends early is
# followed at once; "not playing" before the estimate counts only once "playing" was seen.
DEFAULT_STATUS_POLL_FROM = 0.75
# A status stuck on "playing" (e.g. music resuming after the TTS) is believed up to this
# many times the estimate plus the grace period, then the queue goes on.
DEFAULT_MAX_SPEECH_STRETCH = 2.0
DEFAULT_STATUS_GRACE_S = 2.0
# What continuous conversation "says" to the speaker where it has no wake-up action.
DEFAULT_WAKE_TEXT = "小爱同学"

TtsRoute = Literal["auto", "mina", "miot", "url"]
Route = Literal["mina", "miot", "url"]
SilenceMode = Literal["pause_stop", "pause", "stop", "none"]
WakeMode = Literal["auto", "wake_up", "directive", "none"]


def _label(name: str, device_id: str) -> str:
    """A speaker's name for logs; never its full device id."""
    return name or (f"…{device_id[-4:]}" if len(device_id) > 4 else "speaker")


@dataclass(frozen=True, slots=True)
class SpeakerTarget:
    """Where one speaker is reached, from the utterance the Xiaomi source made."""

    device_id: str  # MiNA deviceID
    miot_did: str
    hardware: str
    label: str
    actions: SpeakerActions


@dataclass(eq=False)
class _Speaker:
    target: SpeakerTarget
    queue: SpeakerQueue = field(init=False)
    # The utterance whose answer this speaker is giving (set by begin, cleared by end).
    answering: QuestionId | None = None


class XiaomiSink(Sink):
    """Speaks answers on XiaoAi speakers through the Xiaomi cloud, one queue per speaker.

    `begin` silences XiaoAi's own answer at once (MiNA pause, then stop if it still plays)
    and drops what is left of the previous answer. Each sentence goes out through MiNA
    text_to_speech or the model's MIoT play-text action; the next one waits for the
    estimated duration and then for the play status to leave "playing", and sentences that
    queued up meanwhile are merged into one call. With `Answer.keep_listening`, the speaker
    is woken to listen again once the last sentence has been spoken.
    Use it as `async with` (or call `aclose`) so the queues stop on shutdown.
    """

    def __init__(
        self,
        mina: MinaClient,
        miot: MiotClient | None = None,
        *,
        name: str = SINK_NAME,
        models: Mapping[str, SpeakerActions] | None = None,
        tts: TtsRoute = "auto",
        tts_engine: TtsEngine | None = None,
        audio: AudioStore | None = None,
        silence: SilenceMode = "pause_stop",
        wake: WakeMode = "auto",
        wake_text: str = DEFAULT_WAKE_TEXT,
        chars_per_second: float = DEFAULT_CHARS_PER_SECOND,
        speech_overhead_s: float = DEFAULT_SPEECH_OVERHEAD_S,
        status_poll_interval_s: float = DEFAULT_STATUS_POLL_INTERVAL_S,
        status_poll_from: float = DEFAULT_STATUS_POLL_FROM,
        max_speech_stretch: float = DEFAULT_MAX_SPEECH_STRETCH,
        status_grace_s: float = DEFAULT_STATUS_GRACE_S,
        merge_max_chars: int = DEFAULT_MERGE_MAX_CHARS,
        max_queued_chunks: int = MAX_QUEUED_CHUNKS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """`models` overrides the action table per hardware (e.g. "LX06"); `tts` forces a
        route ("auto" follows the table's `prefer_miot_tts`; "url" speaks through
        `tts_engine`, serves the audio from `audio` and has the speaker play its URL, with
        the speaker's own TTS as the fallback); without `miot`, speech, the play status and
        waking use MiNA only (no MIoT speech, no wake-up)."""
        if tts == "url" and (tts_engine is None or audio is None):
            raise ValueError('tts="url" needs a tts_engine and an audio store')
        if chars_per_second <= 0:
            raise ValueError("chars_per_second must be positive")
        if status_poll_interval_s <= 0:
            raise ValueError("status_poll_interval_s must be positive")
        self._mina = mina
        self._miot = miot
        self._name = name
        self._models = dict(models or {})
        self._tts = tts
        self._tts_engine = tts_engine
        self._audio = audio
        self._silence_mode = silence
        self._wake_mode = wake
        self._wake_text = wake_text
        self._chars_per_second = chars_per_second
        self._overhead_s = speech_overhead_s
        self._poll_interval_s = status_poll_interval_s
        self._poll_from = min(max(status_poll_from, 0.0), 1.0)
        self._max_stretch = max(1.0, max_speech_stretch)
        self._grace_s = status_grace_s
        self._merge_max_chars = merge_max_chars
        self._max_queued = max_queued_chunks
        self._clock = Clock(clock, sleep)
        self._speakers: dict[str, _Speaker] = {}
        self.spoken = 0
        self.failed = 0

    @property
    def name(self) -> str:
        """Registry key; matches the Xiaomi source's name."""
        return self._name

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drop every queue and stop the speaker tasks."""
        for speaker in self._speakers.values():
            await speaker.queue.aclose()

    def target(self, utterance: Utterance) -> SpeakerTarget:
        """Where to speak the answer to `utterance`; the one place reading the source's route."""
        route = utterance.route
        if not isinstance(route, XiaomiRoute):  # e.g. a replayed question of unknown origin
            route = XiaomiRoute(device_id=utterance.device, hardware="", miot_did="", name="")
        device_id = route.device_id or utterance.device
        return SpeakerTarget(
            device_id=device_id,
            miot_did=route.miot_did,
            hardware=route.hardware,
            label=_label(route.name, device_id),
            actions=speaker_actions(route.hardware, self._models),
        )

    def route(self, target: SpeakerTarget) -> Route:
        """Which way speech goes to this speaker."""
        if self._tts == "url":
            return "url"
        return self._own_route(target)

    def _own_route(self, target: SpeakerTarget) -> Literal["mina", "miot"]:
        """Which service speaks with XiaoAi's own voice on this speaker."""
        can_miot = (
            self._miot is not None
            and bool(target.miot_did)
            and target.actions.play_text is not None
        )
        if can_miot and (
            self._tts == "miot" or (self._tts == "auto" and target.actions.prefer_miot_tts)
        ):
            return "miot"
        return "mina"

    async def begin(self, utterance: Utterance) -> None:
        """A new question: drop the old answer, silence XiaoAi before anything is spoken."""
        speaker = self._speaker(utterance)
        # Also aborts a pacing wait or a status poll of the old answer: silence is due now,
        # and XiaoAi's pause silences our old sentence too.
        await speaker.queue.interrupt()
        speaker.answering = utterance.id
        if self._silence_mode != "none":
            speaker.queue.act(functools.partial(self._silence, speaker), at_once=True)

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """Queue one sentence for the utterance's speaker."""
        if text := chunk.text.strip():
            self._speaker(utterance).queue.say(text)

    async def end(self, answer: Answer) -> None:
        """With `keep_listening`, wake the speaker once the last sentence has played."""
        speaker = self._speakers.get(answer.utterance.device)
        if speaker is None or speaker.answering != answer.utterance.id:
            return  # never begun (e.g. left to XiaoAi), or superseded by a newer question
        speaker.answering = None
        if answer.keep_listening and self._wake_mode != "none":
            speaker.queue.act(functools.partial(self._wake, speaker), at_once=False)

    async def wait_idle(self) -> None:
        """Wait until every queued item was handed to the cloud."""
        for speaker in list(self._speakers.values()):
            await speaker.queue.wait_idle()

    def pending(self, device: str) -> int:
        """Sentences queued (not yet sent) for one speaker."""
        speaker = self._speakers.get(device)
        return speaker.queue.pending if speaker is not None else 0

    # --- what the speaker queue calls -------------------------------------------------

    def _speaker(self, utterance: Utterance) -> _Speaker:
        target = self.target(utterance)
        speaker = self._speakers.get(utterance.device)
        if speaker is None:
            speaker = _Speaker(target)
            speaker.queue = SpeakerQueue(
                functools.partial(self._say, speaker),
                until_done=functools.partial(self._until_done, speaker),
                name=self._name,
                label=target.label,
                merge_max_chars=self._merge_max_chars,
                max_queued=self._max_queued,
                clock=self._clock,
            )
            self._speakers[utterance.device] = speaker
        elif speaker.target != target:
            speaker.target = target
            speaker.queue.label = target.label
        return speaker

    async def _silence(self, speaker: _Speaker) -> None:
        target = speaker.target
        mode = self._silence_mode
        try:
            if mode in {"pause", "pause_stop"}:
                await self._mina.pause(target.device_id)
            if mode == "stop":
                await self._mina.stop(target.device_id)
            elif mode == "pause_stop":
                # XiaoAi may start its answer after the pause landed; a stop ends that too.
                if target.actions.reports_play_status:
                    if (await self._mina.play_status(target.device_id)).playing:
                        await self._mina.stop(target.device_id)
                else:
                    await self._mina.stop(target.device_id)
        except XiaomiError as err:
            self.failed += 1
            _LOGGER.warning("%s: could not silence XiaoAi on %s: %s", self._name, target.label, err)

    async def _say(self, speaker: _Speaker, text: str) -> float | None:
        target = speaker.target
        if self._tts == "url":
            played_s = await self._say_by_url(target, text)
            if played_s is not None:
                self.spoken += 1
                _LOGGER.debug(
                    "%s: playing %d chars on %s by URL (%.1f s)",
                    self._name,
                    len(text),
                    target.label,
                    played_s,
                )
                return played_s
        route = self._own_route(target)
        try:
            if route == "miot":
                assert self._miot is not None  # checked by route()  # noqa: S101
                await self._miot.play_text(target.miot_did, target.actions, text)
            else:
                await self._mina.text_to_speech(target.device_id, text)
        except XiaomiError as err:
            self.failed += 1
            _LOGGER.warning(
                "%s: speaking %d chars on %s via %s failed: %s",
                self._name,
                len(text),
                target.label,
                route,
                err,
            )
            return None
        self.spoken += 1
        estimate = estimate_speech_s(text, self._chars_per_second)
        _LOGGER.debug(
            "%s: speaking %d chars on %s via %s (~%.1f s)",
            self._name,
            len(text),
            target.label,
            route,
            estimate,
        )
        return estimate

    async def _say_by_url(self, target: SpeakerTarget, text: str) -> float | None:
        """Speak through the external TTS; how long it plays, None if it could not."""
        assert self._tts_engine is not None  # checked in __init__  # noqa: S101
        assert self._audio is not None  # noqa: S101
        try:
            audio = await self._tts_engine.synthesize(text)
            played_s = audio_duration_s(audio.data, audio.content_type)
            if played_s is None:
                # Not a format we can measure: XiaoAi's speech rate is the best guess.
                played_s = estimate_speech_s(text, self._chars_per_second)
            url = self._audio.put(audio.data, audio.content_type, plays_s=played_s)
            await self._mina.play_audio(target.device_id, target.hardware, url)
        except (TtsError, AudioStoreError, XiaomiError) as err:
            # Never silence: the speaker's own voice says this sentence instead.
            _LOGGER.warning(
                "%s: external TTS for %s failed (%s); XiaoAi speaks this sentence itself",
                self._name,
                target.label,
                err,
            )
            return None
        return played_s

    async def _until_done(self, speaker: _Speaker, playing: Playing) -> None:
        """Wait until the sentence last sent has been spoken, by play status where it has one."""
        target = speaker.target
        clock = self._clock
        estimate_end = playing.sent_at + playing.seconds
        if not self._has_status(target):
            await clock.sleep_until(estimate_end + self._overhead_s)
            return
        await clock.sleep_until(playing.sent_at + playing.seconds * self._poll_from)
        deadline = playing.sent_at + playing.seconds * self._max_stretch + self._grace_s
        seen_playing = False
        while True:
            is_playing = await self._is_playing(target)
            now = clock.now()
            if is_playing is None:
                # The status could not be read: the estimate is all there is.
                await clock.sleep_until(estimate_end + self._overhead_s)
                return
            if is_playing:
                seen_playing = True
            elif seen_playing or now >= estimate_end:
                return
            if now >= deadline:
                _LOGGER.debug("%s: %s still reports playing; going on", self._name, target.label)
                return
            next_poll = now + self._poll_interval_s
            if not seen_playing:
                # Not started yet, or already done: by the estimate's end it is decided.
                next_poll = min(next_poll, estimate_end)
            await clock.sleep_until(min(next_poll, deadline))

    def _has_status(self, target: SpeakerTarget) -> bool:
        if target.actions.reports_play_status:
            return True
        return (
            target.actions.playing_property is not None
            and self._miot is not None
            and bool(target.miot_did)
        )

    async def _is_playing(self, target: SpeakerTarget) -> bool | None:
        """The speaker's playing state; None when it cannot be read."""
        try:
            if target.actions.reports_play_status:
                return (await self._mina.play_status(target.device_id)).playing
            if self._miot is not None:
                return await self._miot.is_playing(target.miot_did, target.actions)
        except XiaomiError as err:
            _LOGGER.debug("%s: no play status for %s: %s", self._name, target.label, err)
        return None

    async def _wake(self, speaker: _Speaker) -> None:
        target = speaker.target
        actions = target.actions
        if self._miot is None or not target.miot_did:
            _LOGGER.warning(
                "%s: cannot wake %s to keep listening: no MIoT client or did",
                self._name,
                target.label,
            )
            return
        try:
            if self._wake_mode in {"auto", "wake_up"} and actions.wake_up is not None:
                await self._miot.wake_up(target.miot_did, actions)
            elif (
                self._wake_mode in {"auto", "directive"}
                and actions.execute_text_directive is not None
            ):
                # Not silent: XiaoAi answers its wake word and then listens.
                await self._miot.execute_text_directive(
                    target.miot_did, actions, self._wake_text, silent=False
                )
            else:
                _LOGGER.warning(
                    "%s: %s (%s) has no %s action to keep listening with",
                    self._name,
                    target.label,
                    target.hardware or "unknown model",
                    "wake-up" if self._wake_mode == "wake_up" else "wake",
                )
                return
        except XiaomiError as err:
            self.failed += 1
            _LOGGER.warning("%s: could not wake %s: %s", self._name, target.label, err)
            return
        _LOGGER.debug("%s: woke %s to listen again", self._name, target.label)
