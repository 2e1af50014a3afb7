"""One speaker's speech queue: merging, pacing, cancel-on-new-question and idle wait."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from xiaoai_bridge.spoken import join_spoken

_LOGGER = logging.getLogger(__name__)

# Sentences that piled up while the speaker talked go out as one call, up to this length
# (XiaoAi's TTS cuts long texts; the exact limit is unknown).
DEFAULT_MERGE_MAX_CHARS = 120
# Items waiting per speaker; beyond this the oldest are dropped.
MAX_QUEUED_CHUNKS = 64

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Clock:
    """The time pacing runs on: `now` reads a monotonic clock, `sleep` waits (tests fake both)."""

    now: Callable[[], float] = time.monotonic
    sleep: Sleep = asyncio.sleep

    async def sleep_until(self, when: float) -> None:
        """Sleep until `now()` reaches `when`."""
        remaining = when - self.now()
        if remaining > 0:
            await self.sleep(remaining)

    async def sleep_until_set(self, event: asyncio.Event, when: float) -> None:
        """Sleep until `when`, or only until `event` is set if that comes first."""
        remaining = when - self.now()
        if remaining <= 0 or event.is_set():
            return
        sleeper = asyncio.ensure_future(self.sleep(remaining))
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()
            await asyncio.wait([sleeper, waiter])


@dataclass(frozen=True, slots=True)
class Playing:
    """The text last handed to the speaker: when, and how long it should take to speak."""

    sent_at: float
    seconds: float


# Say a text now; returns how long it should play, or None if it could not be said.
Speak = Callable[[str], Awaitable[float | None]]
# Return once what `Playing` describes has been spoken (e.g. by polling the speaker).
UntilDone = Callable[[Playing], Awaitable[None]]
Action = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Sentence:
    text: str
    mergeable: bool


@dataclass(frozen=True, slots=True)
class _Act:
    run: Action
    at_once: bool


class SpeakerQueue:
    """What one speaker is yet to say, handed to it one utterance at a time.

    The speaker services give no end-of-speech signal and new speech cuts off the old, so
    each sentence waits until the previous one should have been spoken (`until_done`, by
    default its estimated duration); sentences queued meanwhile go out merged into one call.
    `interrupt` (a new question) drops what is queued and aborts the wait or call under way,
    so the new answer goes out at once. Actions (silencing XiaoAi, waking the speaker) run
    in order with the sentences, either at once or after the speech before them.
    """

    def __init__(
        self,
        speak: Speak,
        *,
        until_done: UntilDone | None = None,
        name: str,
        label: str,
        merge_max_chars: int = DEFAULT_MERGE_MAX_CHARS,
        max_queued: int = MAX_QUEUED_CHUNKS,
        clock: Clock | None = None,
    ) -> None:
        """`name` (the sink's) and `label` (the speaker's, never a device id) go in logs."""
        self._speak = speak
        self._clock = clock or Clock()
        self._until_done = until_done or self._until_estimate
        self._name = name
        self.label = label
        self._merge_max_chars = merge_max_chars
        self._max_queued = max_queued
        self._items: deque[_Sentence | _Act] = deque()
        self._wake = asyncio.Event()
        # Set while nothing is queued or being sent (the last text may still be playing).
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._playing: Playing | None = None

    @property
    def pending(self) -> int:
        """Sentences queued, not yet handed to the speaker."""
        return sum(1 for item in self._items if isinstance(item, _Sentence))

    def say(self, text: str, *, mergeable: bool = True) -> None:
        """Queue a sentence; `mergeable=False` keeps it a call of its own."""
        self._put(_Sentence(text, mergeable))

    def act(self, run: Action, *, at_once: bool) -> None:
        """Queue an action: `at_once` runs it without waiting for the speech before it."""
        self._put(_Act(run, at_once))

    async def interrupt(self) -> int:
        """Drop everything queued and abort what is under way; returns the sentences dropped."""
        dropped = self.pending
        self._items.clear()
        await self._stop()
        # The next text cuts off whatever still plays, so nothing is worth waiting for.
        self._playing = None
        if dropped:
            _LOGGER.info(
                "%s: new question on %s; dropped %d queued sentence(s)",
                self._name,
                self.label,
                dropped,
            )
        return dropped

    async def wait_idle(self) -> None:
        """Wait until every queued item was handed to the speaker."""
        if self._task is not None and not self._task.done():
            await self._idle.wait()

    async def aclose(self) -> None:
        """Drop the queue and stop its task."""
        self._items.clear()
        await self._stop()

    def _put(self, item: _Sentence | _Act) -> None:
        if len(self._items) >= self._max_queued:
            self._items.popleft()
            _LOGGER.warning(
                "%s: %s has %d sentences queued; dropping the oldest",
                self._name,
                self.label,
                self._max_queued,
            )
        self._items.append(item)
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(
                self._work(), name=f"{self._name}:speaker:{self.label}"
            )
            self._task.add_done_callback(self._task_done)

    async def _stop(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task is self._task:
            self._idle.set()
        if not task.cancelled() and (error := task.exception()) is not None:
            # A bug, not a service error (those are handled in place); the next item restarts it.
            _LOGGER.error("%s: speaker task for %s failed", self._name, self.label, exc_info=error)

    async def _work(self) -> None:
        while True:
            while not self._items:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            head = self._items[0]
            if not (isinstance(head, _Act) and head.at_once):
                # Wait before taking the item, so sentences arriving meanwhile can merge.
                await self._until_quiet()
            item = self._items.popleft()
            if isinstance(item, _Act):
                await item.run()
            else:
                await self._say(self._merged(item))

    def _merged(self, first: _Sentence) -> str:
        text = first.text
        while first.mergeable and self._items:
            nxt = self._items[0]
            if not (
                isinstance(nxt, _Sentence)
                and nxt.mergeable
                and len(text) + len(nxt.text) <= self._merge_max_chars
            ):
                break
            self._items.popleft()
            text = join_spoken(text, nxt.text)
        return text

    async def _say(self, text: str) -> None:
        self._playing = None
        seconds = await self._speak(text)
        if seconds is not None:
            self._playing = Playing(sent_at=self._clock.now(), seconds=seconds)

    async def _until_quiet(self) -> None:
        playing = self._playing
        if playing is not None:
            await self._until_done(playing)
            self._playing = None

    async def _until_estimate(self, playing: Playing) -> None:
        await self._clock.sleep_until(playing.sent_at + playing.seconds)
