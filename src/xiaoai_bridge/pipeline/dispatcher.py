"""Routes utterances to the pipeline: one speaker in order, different speakers concurrently."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from xiaoai_bridge.errors import BridgeError
from xiaoai_bridge.models import Answer, SpeakerId, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.inbox import Inbox, InboxEntry
from xiaoai_bridge.pipeline.pipeline import Pipeline
from xiaoai_bridge.pipeline.ports import Sink

_LOGGER = logging.getLogger(__name__)

AnswerListener = Callable[[Answer], None]

# "Busy" apologies waiting to be sent. Past it a question is dropped unanswered: logged and
# counted, the last resort of a flood far beyond [inbox] max_pending.
MAX_QUEUED_REFUSALS = 10_000
# A flood of refusals logs a line at most this often.
REFUSAL_LOG_INTERVAL_S = 10.0


@dataclass
class DispatchStats:
    """Counts of what did not get a normal answer, for logs, metrics and benchmarks."""

    refused_busy: int = 0
    dropped_stale: int = 0
    dropped_overflow: int = 0
    resumed: int = 0


@dataclass(frozen=True, slots=True)
class _Job:
    utterance: Utterance
    entry_id: int | None = None


class Dispatcher:
    """Runs one worker per busy speaker; a speaker's questions are answered in arrival order.

    `admit` is the durable door: it returns once a question is on disk in the inbox (or was
    refused as busy), so the source may acknowledge it; the inbox row is deleted only after
    the answer is delivered. It never blocks, so a source may call it while reading its
    socket. `submit` is the in-memory door for questions that need no acknowledgement (the
    status page's ask box, tests).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        sinks: Mapping[str, Sink],
        *,
        inbox: Inbox | None = None,
        max_pending: int | None = None,
        resume_freshness_s: float = math.inf,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pipeline = pipeline
        self._sinks = dict(sinks)
        self._inbox = inbox
        self._max_pending = max_pending
        self._resume_freshness_s = resume_freshness_s
        self._clock = clock
        self._queues: dict[SpeakerId, deque[_Job]] = {}
        self._pending = 0
        self._workers: set[asyncio.Task[None]] = set()
        self._listeners: list[AnswerListener] = []
        self._observers: list[Sink] = []
        self._refusals: deque[_Job] = deque()
        self._refuser: asyncio.Task[None] | None = None
        self._last_logged: dict[str, float] = {}
        self.stats = DispatchStats()
        self._idle = asyncio.Event()
        self._idle.set()

    def add_listener(self, listener: AnswerListener) -> None:
        """Be told about every finished answer (metrics)."""
        self._listeners.append(listener)

    def add_observer(self, observer: Sink) -> None:
        """See every answer's life cycle as its sink does (status page, discovery sensors)."""
        self._observers.append(observer)

    def add_sink(self, sink: Sink) -> None:
        """Answer the utterances of source `sink.name` through `sink`."""
        self._sinks[sink.name] = sink

    @property
    def in_flight(self) -> int:
        """Questions received and not yet finished: queued, being answered, or refused."""
        return self._pending + len(self._refusals)

    def admit(self, utterance: Utterance) -> None:
        """Accept durably or refuse as busy; returns when the source may acknowledge it."""
        if not self._routable(utterance):
            return
        if (
            self._max_pending is not None
            and self._pending >= self._max_pending
            and not utterance.rejected
        ):
            self._refuse(utterance)
            return
        self._enqueue(_Job(utterance, self._record(utterance)))

    def submit(self, utterance: Utterance) -> None:
        """Queue an utterance in memory only; never blocks, never drops."""
        if self._routable(utterance):
            self._enqueue(_Job(utterance))

    def resume(self) -> None:
        """Queue again what an earlier run accepted and left unanswered, if still fresh."""
        if self._inbox is None:
            return
        now = self._clock()
        for entry in self._inbox.pending():
            if self._sinks.get(entry.utterance.source) is None or (
                entry.age(now) > self._resume_freshness_s
            ):
                self._drop_stale(entry, now)
                continue
            self.stats.resumed += 1
            self._enqueue(_Job(entry.utterance, entry.id))
        if self.stats.resumed or self.stats.dropped_stale:
            _LOGGER.warning(
                "resumed %d questions left unanswered by the last run; dropped %d too old "
                "to answer (older than %.0f s) or from a mode no longer configured",
                self.stats.resumed,
                self.stats.dropped_stale,
                self._resume_freshness_s,
            )

    async def drain(self) -> None:
        """Wait until every accepted utterance is answered."""
        await self._idle.wait()

    async def aclose(self) -> None:
        """Cancel the workers (shutdown after the drain deadline)."""
        workers = list(self._workers)
        if self._refuser is not None:
            workers.append(self._refuser)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    def _routable(self, utterance: Utterance) -> bool:
        if self._sinks.get(utterance.source) is None:
            _LOGGER.error("no sink for source %r; utterance dropped", utterance.source)
            return False
        return True

    def _record(self, utterance: Utterance) -> int | None:
        if self._inbox is None:
            return None
        try:
            return self._inbox.add(utterance).id
        except sqlite3.Error as err:
            # A full or broken disk must not cost the answer: keep it in memory only.
            _LOGGER.warning("could not record a question in the inbox: %s", err)
            return None

    def _enqueue(self, job: _Job) -> None:
        self._pending += 1
        speaker = job.utterance.speaker
        queue = self._queues.get(speaker)
        if queue is not None:
            queue.append(job)  # the speaker's worker will get to it
            return
        self._queues[speaker] = deque([job])
        self._idle.clear()
        worker = asyncio.create_task(self._work(speaker), name=f"pipeline:{speaker}")
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    def _drop_stale(self, entry: InboxEntry, now: float) -> None:
        self.stats.dropped_stale += 1
        _LOGGER.info(
            "not answering a %s question from %s: asked %.0f s ago, before a restart",
            entry.utterance.source,
            entry.utterance.device,
            entry.age(now),
        )
        if self._inbox is not None:
            self._inbox.done(entry.id)

    def _refuse(self, utterance: Utterance) -> None:
        if len(self._refusals) >= MAX_QUEUED_REFUSALS:
            self.stats.dropped_overflow += 1
            if self._time_to_log("overflow"):
                _LOGGER.error(
                    "overwhelmed: %d questions waiting and %d 'busy' replies queued; "
                    "dropping new questions unanswered (%d so far)",
                    self._pending,
                    len(self._refusals),
                    self.stats.dropped_overflow,
                )
            return
        self.stats.refused_busy += 1
        if self._time_to_log("busy"):
            _LOGGER.warning(
                "busy: %d questions already waiting (limit %d); answering new ones with a "
                "'busy' apology (%d so far)",
                self._pending,
                self._max_pending,
                self.stats.refused_busy,
            )
        # Recorded too: a kill before the apology is sent makes the next run send it.
        refused = dataclasses.replace(utterance, rejected="busy")
        self._refusals.append(_Job(refused, self._record(refused)))
        if self._refuser is None:
            self._refuser = asyncio.create_task(self._send_refusals(), name="pipeline:refusals")

    def _time_to_log(self, what: str) -> bool:
        # A flood must not flood the log: one line per kind per interval.
        now = self._clock()
        if now - self._last_logged.get(what, -math.inf) < REFUSAL_LOG_INTERVAL_S:
            return False
        self._last_logged[what] = now
        return True

    async def _send_refusals(self) -> None:
        try:
            while self._refusals:
                job = self._refusals[0]
                await self._answer(job.utterance)
                self._refusals.popleft()
                self._done(job)
        finally:
            self._refuser = None

    def _done(self, job: _Job) -> None:
        if job.entry_id is not None and self._inbox is not None:
            self._inbox.done(job.entry_id)

    async def _work(self, speaker: SpeakerId) -> None:
        queue = self._queues[speaker]
        try:
            while queue:
                job = queue[0]
                await self._answer(job.utterance)
                queue.popleft()  # only now: in_flight counts the one being answered
                self._pending -= 1
                self._done(job)
        finally:
            self._pending -= len(queue)  # cancelled at shutdown: the inbox keeps them
            del self._queues[speaker]
            if not self._queues:
                self._idle.set()

    async def _answer(self, utterance: Utterance) -> None:
        try:
            sink = self._sinks[utterance.source]
            if self._observers:
                sink = _Observed(sink, self._observers)
            answer = await self._pipeline.handle(utterance, sink)
        except Exception:
            # The supervisor boundary: a bug in one answer must not stop the others.
            _LOGGER.exception("unexpected error answering %s", utterance.device)
            return
        for listener in self._listeners:
            listener(answer)


class _Observed:
    """A sink whose calls are repeated to observers; an observer's failure stays its own."""

    def __init__(self, sink: Sink, observers: list[Sink]) -> None:
        self._sink = sink
        self._observers = observers

    @property
    def name(self) -> str:
        return self._sink.name

    async def begin(self, utterance: Utterance) -> None:
        for observer in self._observers:
            await _quietly(observer.name, observer.begin(utterance))
        await self._sink.begin(utterance)

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        for observer in self._observers:
            await _quietly(observer.name, observer.chunk(utterance, chunk))
        await self._sink.chunk(utterance, chunk)

    async def end(self, answer: Answer) -> None:
        for observer in self._observers:
            await _quietly(observer.name, observer.end(answer))
        await self._sink.end(answer)


async def _quietly(name: str, call: Awaitable[None]) -> None:
    try:
        await call
    except BridgeError as err:
        _LOGGER.warning("observer %s failed: %s", name, err)
