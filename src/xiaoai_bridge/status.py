"""The status page's memory: recent conversations per device and a live event feed."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from xiaoai_bridge.log import mask_secrets
from xiaoai_bridge.models import Answer, SpeakerId, SpeechChunk, ToolCallRecord, Utterance

_LOGGER = logging.getLogger(__name__)

DEFAULT_PER_DEVICE = 20
DEFAULT_MAX_DEVICES = 50
# A runaway answer must not grow a log entry without end; the final text is kept anyway.
DEFAULT_MAX_CHUNKS = 200
# A model looping on tools makes many calls; an entry keeps the first ones and a count.
DEFAULT_MAX_TOOL_CALLS = 32
# Tool names, arguments and results come from the model and remote servers: the page shows
# them cut to this length whatever the pipeline passed on.
TOOL_TEXT_CHARS = 200
# Events a page may lag behind before it is cut off (it reconnects and reloads the state).
DEFAULT_QUEUE_SIZE = 256


@dataclass(frozen=True)
class Event:
    """One thing that happened, for the live page: `kind` names it, `data` is JSON-ready."""

    kind: str
    data: dict[str, Any]

    @functools.cached_property
    def frame(self) -> bytes:
        """The event as one server-sent-events frame, encoded once however many pages follow."""
        # json.dumps never emits a raw newline, so one data line carries the whole event.
        data = json.dumps(self.data, ensure_ascii=False)
        return f"event: {self.kind}\ndata: {data}\n\n".encode()


@dataclass
class Conversation:
    """One utterance and what became of it, as the status page shows it."""

    key: int  # unique in this process; question ids may repeat
    id: str
    device: str
    source: str
    question: str
    started_at: float
    said_at: float | None = None
    chunks: list[str] = field(default_factory=list)
    answer: str = ""
    outcome: str = ""  # empty while the answer is under way
    reason: str = ""
    first_chunk_s: float | None = None
    total_s: float | None = None
    # The tools the model called on the way (JSON-ready), and how many more were left out.
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_calls_omitted: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {
            "key": self.key,
            "id": self.id,
            "device": self.device,
            "source": self.source,
            "question": self.question,
            "started_at": self.started_at,
            "said_at": self.said_at,
            "chunks": list(self.chunks),
            "answer": self.answer,
            "outcome": self.outcome,
            "reason": self.reason,
            "first_chunk_s": self.first_chunk_s,
            "total_s": self.total_s,
            "tool_calls": [dict(call) for call in self.tool_calls],
            "tool_calls_omitted": self.tool_calls_omitted,
        }


def tool_call_view(call: ToolCallRecord) -> dict[str, Any]:
    """One tool call as the status page shows it: short texts, secrets masked, time in ms."""
    return {
        "name": _display(call.name),
        "source": _display(call.source),
        "arguments": _display(call.arguments),
        "outcome": call.outcome,
        "result": _display(call.result),
        "ms": round(max(call.seconds, 0.0) * 1000),
    }


def _display(text: str) -> str:
    text = mask_secrets(text)
    return text if len(text) <= TOOL_TEXT_CHARS else text[: TOOL_TEXT_CHARS - 1] + "…"


class Subscription:
    """A page's view of the event feed: a bounded queue that ends when closed or too slow."""

    def __init__(
        self, log: ConversationLog, size: int, on_drop: Callable[[], None] | None = None
    ) -> None:
        self._log = log
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=size)
        self._on_drop = on_drop
        self.closed = False
        self.dropped = False

    async def get(self) -> Event | None:
        """The next event, or None once the subscription has ended."""
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    async def next_batch(self, linger_s: float = 0.0) -> list[Event]:
        """Every event waiting (at least one, waiting for it), or [] once ended.

        After the first event, waits `linger_s` for more: in a burst a page gets many events
        per wake-up and write, not one each.
        """
        first = await self.get()
        if first is None:
            return []
        if linger_s > 0:
            await asyncio.sleep(linger_s)
        batch = [first]
        while not self._queue.empty():
            event = self._queue.get_nowait()
            if event is None:
                break  # closed: what came before is still worth sending
            batch.append(event)
        return batch

    def close(self) -> None:
        """Stop receiving events; a pending `get` returns None."""
        if self.closed:
            return
        self.closed = True
        self._log._unsubscribe(self)
        # Whatever is still queued is stale now: the page reloads the state when it returns.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def _offer(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
            _LOGGER.warning("a status page fell %d events behind; disconnected it", self._size)
            self.close()
            if self._on_drop is not None:
                self._on_drop()  # its connection may be stuck writing: end it now

    @property
    def _size(self) -> int:
        return self._queue.maxsize

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ConversationLog:
    """Dispatcher observer keeping the recent conversations of each device, bounded.

    Every change is also published to the subscribers without waiting: a subscriber that
    cannot keep up is disconnected, so a stuck browser never slows an answer down.
    """

    def __init__(
        self,
        *,
        per_device: int = DEFAULT_PER_DEVICE,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._per_device = per_device
        self._max_devices = max_devices
        self._max_chunks = max_chunks
        self._max_tool_calls = max_tool_calls
        self._queue_size = queue_size
        self._clock = clock
        self._keys = itertools.count(1)
        # Device -> its conversations, oldest first; devices in least recently active order.
        self._devices: OrderedDict[str, deque[Conversation]] = OrderedDict()
        # Device -> the utterance being answered and its entry (calls per device never overlap).
        self._open: dict[SpeakerId, tuple[Utterance, Conversation]] = {}
        self._subscribers: list[Subscription] = []

    @property
    def name(self) -> str:
        """Observer name, for the dispatcher's log lines."""
        return "status"

    async def begin(self, utterance: Utterance) -> None:
        """An answer starts."""
        self._entry(utterance)

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """A sentence of the answer is out: keep it and tell the pages."""
        entry = self._entry(utterance)
        if chunk.text and len(entry.chunks) < self._max_chunks:
            entry.chunks.append(chunk.text)
        self.publish(
            "chunk",
            {
                "key": entry.key,
                "device": entry.device,
                "seq": chunk.seq,
                "text": chunk.text,
                "final": chunk.final,
            },
        )

    async def end(self, answer: Answer) -> None:
        """The answer is complete (or the utterance was ignored or failed)."""
        entry = self._entry(answer.utterance)
        del self._open[answer.utterance.speaker]
        entry.answer = answer.text
        entry.outcome = answer.outcome.value
        entry.reason = answer.reason
        entry.first_chunk_s = answer.first_chunk_s
        entry.total_s = answer.total_s
        kept = answer.tool_calls[: self._max_tool_calls]
        entry.tool_calls = [tool_call_view(call) for call in kept]
        entry.tool_calls_omitted = len(answer.tool_calls) - len(kept)
        self.publish("end", entry.as_dict())

    def devices(self) -> list[str]:
        """Devices with recent conversations, most recently active first."""
        return list(reversed(self._devices))

    def recent(self, device: str) -> list[Conversation]:
        """A device's recent conversations, oldest first."""
        return list(self._devices.get(device, ()))

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every device's recent conversations, JSON-ready, most recently active first."""
        return {
            device: [entry.as_dict() for entry in self._devices[device]]
            for device in self.devices()
        }

    def subscribe(self, on_drop: Callable[[], None] | None = None) -> Subscription:
        """Start receiving events; close the subscription (or use `with`) when done.

        `on_drop` is called if the subscriber falls too far behind and is cut off.
        """
        subscription = Subscription(self, self._queue_size, on_drop)
        self._subscribers.append(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        """Pages currently following the feed."""
        return len(self._subscribers)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Hand an event to every subscriber without waiting."""
        if not self._subscribers:
            return
        event = Event(kind, data)
        for subscription in list(self._subscribers):
            subscription._offer(event)

    def close(self) -> None:
        """End every subscription (shutdown)."""
        for subscription in list(self._subscribers):
            subscription.close()

    def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def _entry(self, utterance: Utterance) -> Conversation:
        device = utterance.device
        current = self._open.get(utterance.speaker)
        if current is not None and current[0] is utterance:
            return current[1]
        if current is not None:
            # The previous answer never ended: the dispatcher logged why (a bug).
            stale = current[1]
            stale.outcome, stale.reason = "failed", "unfinished"
            self.publish("end", stale.as_dict())
        # Ignored and rejected utterances end without a begin; their entry starts here.
        entry = Conversation(
            key=next(self._keys),
            id=str(utterance.id),
            device=device,
            source=utterance.source,
            question=utterance.text,
            started_at=self._clock(),
            said_at=utterance.said_at,
        )
        self._open[utterance.speaker] = (utterance, entry)
        history = self._devices.get(device)
        if history is None:
            history = self._devices[device] = deque(maxlen=self._per_device)
            while len(self._devices) > self._max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device)
        history.append(entry)
        self.publish("begin", entry.as_dict())
        return entry
