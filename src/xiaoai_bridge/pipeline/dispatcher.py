"""Routes utterances to the pipeline: one device in order, different devices concurrently."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

from xiaoai_bridge.errors import BridgeError
from xiaoai_bridge.models import Answer, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.pipeline import Pipeline
from xiaoai_bridge.sinks.base import Sink

_LOGGER = logging.getLogger(__name__)

AnswerListener = Callable[[Answer], None]


class Dispatcher:
    """Runs one worker per busy device; a device's questions are answered in arrival order."""

    def __init__(self, pipeline: Pipeline, sinks: Mapping[str, Sink]) -> None:
        self._pipeline = pipeline
        self._sinks = dict(sinks)
        self._queues: dict[str, deque[Utterance]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._listeners: list[AnswerListener] = []
        self._observers: list[Sink] = []
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
        """Utterances accepted and not yet finished."""
        return sum(len(queue) for queue in self._queues.values())

    def submit(self, utterance: Utterance) -> None:
        """Queue an utterance; never blocks, never drops."""
        sink = self._sinks.get(utterance.source)
        if sink is None:
            _LOGGER.error("no sink for source %r; utterance dropped", utterance.source)
            return
        queue = self._queues.get(utterance.device)
        if queue is not None:
            queue.append(utterance)  # the device's worker will get to it
            return
        self._queues[utterance.device] = deque([utterance])
        self._idle.clear()
        worker = asyncio.create_task(
            self._work(utterance.device), name=f"pipeline:{utterance.device}"
        )
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    async def drain(self) -> None:
        """Wait until every accepted utterance is answered."""
        await self._idle.wait()

    async def aclose(self) -> None:
        """Cancel the workers (shutdown after the drain deadline)."""
        for worker in list(self._workers):
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _work(self, device: str) -> None:
        queue = self._queues[device]
        try:
            while queue:
                utterance = queue[0]
                await self._answer(utterance)
                queue.popleft()  # only now: in_flight counts the one being answered
        finally:
            del self._queues[device]
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
