"""Xiaomi cloud sink: silences XiaoAi, then speaks each sentence paced by the speaker."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

from xiaoai_bridge.audio import AudioStore, AudioStoreError, audio_duration_s
from xiaoai_bridge.clients.tts import TtsEngine, TtsError
from xiaoai_bridge.clients.xiaomi.errors import XiaomiError
from xiaoai_bridge.clients.xiaomi.mina import MinaClient
from xiaoai_bridge.clients.xiaomi.miot import MiotClient, SpeakerActions, speaker_actions
from xiaoai_bridge.models import Answer, QuestionId, SpeechChunk, Utterance
from xiaoai_bridge.spoken import estimate_speech_s, join_spoken

_LOGGER = logging.getLogger(__name__)

SINK_NAME = "xiaomi"
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
# Sentences that piled up while the speaker talked go out as one call, up to this length
# (XiaoAi's TTS cuts long texts; the exact limit is unknown).
DEFAULT_MERGE_MAX_CHARS = 120
# What continuous conversation "says" to the speaker where it has no wake-up action.
DEFAULT_WAKE_TEXT = "小爱同学"
# Chunks waiting per speaker; beyond this the oldest are dropped.
MAX_QUEUED_CHUNKS = 64

TtsRoute = Literal["auto", "mina", "miot", "url"]
Route = Literal["mina", "miot", "url"]
SilenceMode = Literal["pause_stop", "pause", "stop", "none"]
WakeMode = Literal["auto", "wake_up", "directive", "none"]

Sleep = Callable[[float], Awaitable[None]]


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


class _Kind(enum.Enum):
    SILENCE = "silence"
    SAY = "say"
    WAKE = "wake"


@dataclass(frozen=True, slots=True)
class _Item:
    kind: _Kind
    text: str = ""


@dataclass(frozen=True, slots=True)
class _Playing:
    sent_at: float
    estimate_s: float


@dataclass(eq=False)
class _Speaker:
    target: SpeakerTarget
    queue: deque[_Item] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set while nothing is queued or being sent (the last sentence may still be playing).
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    playing: _Playing | None = None
    # The utterance whose answer this speaker is giving (set by begin, cleared by end).
    answering: QuestionId | None = None


class XiaomiSink:
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
        self._clock = clock
        self._sleep = sleep
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
        tasks = [sp.task for sp in self._speakers.values() if sp.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for speaker in self._speakers.values():
            speaker.queue.clear()
            speaker.task = None
            speaker.idle.set()

    def target(self, utterance: Utterance) -> SpeakerTarget:
        """Where to speak the answer to `utterance` (from the source's `extra`)."""
        extra = utterance.extra
        device_id = extra.get("device_id") or utterance.device
        hardware = extra.get("hardware", "")
        return SpeakerTarget(
            device_id=device_id,
            miot_did=extra.get("miot_did", ""),
            hardware=hardware,
            label=_label(extra.get("name", ""), device_id),
            actions=speaker_actions(hardware, self._models),
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
        dropped = sum(1 for item in speaker.queue if item.kind is _Kind.SAY)
        speaker.queue.clear()
        task = speaker.task
        if task is not None and not task.done():
            # Also aborts a pacing wait or a status poll of the old answer: silence is due now.
            task.cancel()
            await asyncio.wait([task])
        if dropped:
            _LOGGER.info(
                "%s: new question on %s; dropped %d queued sentence(s)",
                self._name,
                speaker.target.label,
                dropped,
            )
        # XiaoAi's pause silences our old sentence too, and new speech would cut it anyway.
        speaker.playing = None
        speaker.answering = utterance.id
        if self._silence_mode != "none":
            speaker.queue.append(_Item(_Kind.SILENCE))
        self._kick(speaker)

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """Queue one sentence for the utterance's speaker."""
        text = chunk.text.strip()
        if not text:
            return
        speaker = self._speaker(utterance)
        if len(speaker.queue) >= self._max_queued:
            speaker.queue.popleft()
            _LOGGER.warning(
                "%s: %s has %d sentences queued; dropping the oldest",
                self._name,
                speaker.target.label,
                self._max_queued,
            )
        speaker.queue.append(_Item(_Kind.SAY, text))
        self._kick(speaker)

    async def end(self, answer: Answer) -> None:
        """With `keep_listening`, wake the speaker once the last sentence has played."""
        speaker = self._speakers.get(answer.utterance.device)
        if speaker is None or speaker.answering != answer.utterance.id:
            return  # never begun (e.g. left to XiaoAi), or superseded by a newer question
        speaker.answering = None
        if answer.keep_listening and self._wake_mode != "none":
            speaker.queue.append(_Item(_Kind.WAKE))
            self._kick(speaker)

    async def wait_idle(self) -> None:
        """Wait until every queued item was handed to the cloud."""
        for speaker in list(self._speakers.values()):
            if speaker.task is not None and not speaker.task.done():
                await speaker.idle.wait()

    def pending(self, device: str) -> int:
        """Sentences queued (not yet sent) for one speaker."""
        speaker = self._speakers.get(device)
        if speaker is None:
            return 0
        return sum(1 for item in speaker.queue if item.kind is _Kind.SAY)

    # --- the per-speaker worker ---------------------------------------------------------

    def _speaker(self, utterance: Utterance) -> _Speaker:
        target = self.target(utterance)
        speaker = self._speakers.get(utterance.device)
        if speaker is None:
            speaker = _Speaker(target)
            self._speakers[utterance.device] = speaker
        elif speaker.target != target:
            speaker.target = target
        return speaker

    def _kick(self, speaker: _Speaker) -> None:
        speaker.idle.clear()
        speaker.wake.set()
        if speaker.task is None or speaker.task.done():
            speaker.task = asyncio.create_task(
                self._work(speaker), name=f"{self._name}:speaker:{speaker.target.label}"
            )
            speaker.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            # A bug, not a cloud error (those are handled in place); the next item restarts it.
            _LOGGER.error("%s: speaker task failed", self._name, exc_info=error)

    async def _work(self, speaker: _Speaker) -> None:
        while True:
            while not speaker.queue:
                speaker.idle.set()
                speaker.wake.clear()
                await speaker.wake.wait()
            if speaker.queue[0].kind is not _Kind.SILENCE:
                # Wait before taking the item, so sentences arriving meanwhile can merge.
                await self._until_quiet(speaker)
                if not speaker.queue:
                    continue
            item = speaker.queue.popleft()
            if item.kind is _Kind.SILENCE:
                await self._silence(speaker.target)
            elif item.kind is _Kind.WAKE:
                await self._wake(speaker.target)
            else:
                text = item.text
                while (
                    speaker.queue
                    and speaker.queue[0].kind is _Kind.SAY
                    and len(text) + len(speaker.queue[0].text) <= self._merge_max_chars
                ):
                    text = join_spoken(text, speaker.queue.popleft().text)
                await self._say(speaker, text)

    async def _silence(self, target: SpeakerTarget) -> None:
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

    async def _say(self, speaker: _Speaker, text: str) -> None:
        target = speaker.target
        speaker.playing = None
        if self._tts == "url":
            played_s = await self._say_by_url(target, text)
            if played_s is not None:
                self.spoken += 1
                speaker.playing = _Playing(sent_at=self._clock(), estimate_s=played_s)
                _LOGGER.debug(
                    "%s: playing %d chars on %s by URL (%.1f s)",
                    self._name,
                    len(text),
                    target.label,
                    played_s,
                )
                return
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
            return
        self.spoken += 1
        estimate = estimate_speech_s(text, self._chars_per_second)
        speaker.playing = _Playing(sent_at=self._clock(), estimate_s=estimate)
        _LOGGER.debug(
            "%s: speaking %d chars on %s via %s (~%.1f s)",
            self._name,
            len(text),
            target.label,
            route,
            estimate,
        )

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

    async def _until_quiet(self, speaker: _Speaker) -> None:
        """Wait until the sentence last sent has been spoken."""
        playing = speaker.playing
        if playing is None:
            return
        target = speaker.target
        estimate_end = playing.sent_at + playing.estimate_s
        if not self._has_status(target):
            await self._sleep_until(estimate_end + self._overhead_s)
            speaker.playing = None
            return
        await self._sleep_until(playing.sent_at + playing.estimate_s * self._poll_from)
        deadline = playing.sent_at + playing.estimate_s * self._max_stretch + self._grace_s
        seen_playing = False
        while True:
            is_playing = await self._is_playing(target)
            now = self._clock()
            if is_playing is None:
                # The status could not be read: the estimate is all there is.
                await self._sleep_until(estimate_end + self._overhead_s)
                break
            if is_playing:
                seen_playing = True
            elif seen_playing or now >= estimate_end:
                break
            if now >= deadline:
                _LOGGER.debug("%s: %s still reports playing; going on", self._name, target.label)
                break
            next_poll = now + self._poll_interval_s
            if not seen_playing:
                # Not started yet, or already done: by the estimate's end it is decided.
                next_poll = min(next_poll, estimate_end)
            await self._sleep_until(min(next_poll, deadline))
        speaker.playing = None

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

    async def _wake(self, target: SpeakerTarget) -> None:
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

    async def _sleep_until(self, when: float) -> None:
        remaining = when - self._clock()
        if remaining > 0:
            await self._sleep(remaining)
