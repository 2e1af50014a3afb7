"""Xiaomi cloud source: polls each speaker's conversation log and yields new records."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xiaoai_bridge import adapters
from xiaoai_bridge.clients.xiaomi.conversation import (
    DEFAULT_FRESHNESS_S,
    DEFAULT_LIMIT,
    DEFAULT_MAX_PAGES,
    DEFAULT_PAGE_LIMIT,
    ConversationClient,
    ConversationCursor,
    ConversationRecord,
)
from xiaoai_bridge.clients.xiaomi.errors import XiaomiAuthError, XiaomiError
from xiaoai_bridge.clients.xiaomi.mina import MinaClient, MinaDevice
from xiaoai_bridge.errors import ConfigError
from xiaoai_bridge.models import Utterance, XiaomiRoute
from xiaoai_bridge.reconnect import (
    DEFAULT_AUTH_DELAY_S,
    DEFAULT_INITIAL_DELAY_S,
    DEFAULT_MAX_DELAY_S,
    ConnectionState,
    ReconnectPolicy,
    ReconnectRunner,
    Retry,
    Sleep,
    classify_by_type,
)

_LOGGER = logging.getLogger(__name__)

SOURCE_NAME = adapters.XIAOMI
DEFAULT_POLL_INTERVAL_S = 1.0
# Each wait is the interval times a random factor in [1 - jitter, 1 + jitter], so several
# speakers (which share one account's rate limit) drift apart instead of polling together.
DEFAULT_JITTER = 0.2
# Records heard but not yet taken by the pipeline; a full queue slows the pollers down.
MAX_QUEUED_UTTERANCES = 64
# Worst first: the aggregate state of several speakers is the worst of theirs.
_SEVERITY = (
    ConnectionState.FAILED,
    ConnectionState.RECONNECTING,
    ConnectionState.CONNECTING,
    ConnectionState.STOPPED,
    ConnectionState.CONNECTED,
)

_CLASSIFY = classify_by_type(
    {
        # The client already logged in again once; more attempts soon would only provoke
        # Xiaomi's risk control.
        XiaomiAuthError: Retry.SLOWLY,
        # Unavailable, rate limited, or an answer we cannot read: back off.
        XiaomiError: Retry.SOON,
    }
)


def redact_id(value: str) -> str:
    """A device id fit for logs: only its last four characters."""
    return f"…{value[-4:]}" if len(value) > 4 else "…"


def match_speakers(devices: Sequence[MinaDevice], wanted: Sequence[str]) -> list[MinaDevice]:
    """The devices named in `wanted` (name, alias or MiNA deviceID); empty = all of them.

    Raises ConfigError when an entry matches no speaker, naming the ones that exist.
    """
    if not wanted:
        return list(devices)
    chosen: list[MinaDevice] = []
    missing: list[str] = []
    for entry in wanted:
        key = entry.strip().casefold()
        found = [
            device
            for device in devices
            if key in {device.device_id.casefold(), device.name.casefold(), device.alias.casefold()}
        ]
        if not found:
            missing.append(entry)
        for device in found:
            if device not in chosen:
                chosen.append(device)
    if missing:
        known = ", ".join(sorted(device.name or device.alias for device in devices)) or "none"
        raise ConfigError(
            f"[xiaomi] speakers: no speaker called {', '.join(map(repr, missing))} on this "
            f"Xiaomi account (speakers found: {known}); use a name, alias or MiNA deviceID "
            "from `xiaoai-bridge devices`"
        )
    return chosen


@dataclass(eq=False)
class SpeakerPoller:
    """One speaker's polling state, as /healthz reports it."""

    device: MinaDevice
    label: str
    policy: ReconnectPolicy
    route: XiaomiRoute
    # Clock time until which continuous conversation is on (0: off).
    continuous_until: float = 0.0
    polls: int = 0
    heard: int = 0
    last_poll: float | None = None

    def health(self, now: float) -> dict[str, Any]:
        """State for /healthz: no ids, no tokens."""
        return {
            "state": self.policy.state.value,
            "since": self.policy.since,
            "last_error": self.policy.last_error,
            "failures": self.policy.failures,
            "hardware": self.device.hardware,
            "online": self.device.online,
            "continuous": now < self.continuous_until,
            "polls": self.polls,
            "heard": self.heard,
            "last_poll": self.last_poll,
        }


class XiaomiSource:
    """Yields every new record said to the configured speakers, each exactly once.

    One poll task per speaker reads the conversation log through a ConversationCursor, so a
    record is never yielded twice and records from before the start (or older than
    `freshness_s`) never at all. Cloud errors and rate limits back off per speaker; auth
    errors are retried slowly. Trigger words are the pipeline's job: every record is yielded.
    """

    def __init__(
        self,
        mina: MinaClient,
        conversation: ConversationClient,
        *,
        speakers: Sequence[str] = (),
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        continuous_poll_interval_s: float | None = None,
        jitter: float = DEFAULT_JITTER,
        freshness_s: float = DEFAULT_FRESHNESS_S,
        limit: int = DEFAULT_LIMIT,
        page_limit: int = DEFAULT_PAGE_LIMIT,
        max_pages: int = DEFAULT_MAX_PAGES,
        backoff_initial_s: float = DEFAULT_INITIAL_DELAY_S,
        backoff_max_s: float = DEFAULT_MAX_DELAY_S,
        auth_retry_s: float = DEFAULT_AUTH_DELAY_S,
        max_queued: int = MAX_QUEUED_UTTERANCES,
        name: str = SOURCE_NAME,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_speaker: Callable[[str, ReconnectPolicy], None] | None = None,
    ) -> None:
        """`continuous_poll_interval_s` applies while continuous conversation is on for a
        speaker (see `set_continuous`); None means half the normal interval."""
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self._mina = mina
        self._conversation = conversation
        self._wanted = [entry for entry in speakers if entry.strip()]
        self._interval_s = poll_interval_s
        self._continuous_interval_s = (
            continuous_poll_interval_s
            if continuous_poll_interval_s is not None
            else poll_interval_s / 2
        )
        self._jitter = jitter
        self._freshness_s = freshness_s
        self._limit = limit
        self._page_limit = page_limit
        self._max_pages = max_pages
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._auth_retry_s = auth_retry_s
        self._max_queued = max_queued
        self._name = name
        self._clock = clock
        self._on_speaker = on_speaker
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._pollers: dict[str, SpeakerPoller] = {}
        self._continuous: dict[str, float] = {}
        self.discovery = self._policy(f"{name} speakers")

    @property
    def name(self) -> str:
        """Registry key; also `Utterance.source`."""
        return self._name

    @property
    def speakers(self) -> list[MinaDevice]:
        """The speakers being polled (empty until resolved)."""
        return [poller.device for poller in self._pollers.values()]

    @property
    def pollers(self) -> dict[str, SpeakerPoller]:
        """MiNA deviceID -> that speaker's poller (policy, counters)."""
        return dict(self._pollers)

    @property
    def state(self) -> ConnectionState:
        """The worst state among the speakers (or of the speaker lookup before that)."""
        states = {poller.policy.state for poller in self._pollers.values()}
        if not states:
            return self.discovery.state
        return next(state for state in _SEVERITY if state in states)

    def health(self) -> dict[str, Any]:
        """For /healthz: the aggregate state and each speaker's, keyed by its name."""
        return {
            "state": self.state.value,
            "speakers": {
                poller.label: poller.health(self._clock()) for poller in self._pollers.values()
            },
        }

    def set_continuous(self, device_id: str, on: bool, *, for_s: float | None = None) -> None:
        """Continuous conversation turned on/off for a speaker: it is polled faster while on.

        `for_s` ends it by itself after that many seconds (the pipeline's idle timeout), so
        a conversation that lapses without a last answer does not keep the fast polling.
        """
        until = 0.0
        if on:
            until = self._clock() + for_s if for_s is not None else math.inf
        self._continuous[device_id] = until
        poller = self._pollers.get(device_id)
        if poller is not None:
            poller.continuous_until = until

    async def resolve_speakers(self) -> list[MinaDevice]:
        """Look the configured speakers up in MiNA's device list.

        Raises XiaomiError when the cloud fails and ConfigError when a configured speaker
        does not exist (or the account has none).
        """
        devices = await self._mina.device_list()
        chosen = match_speakers(devices, self._wanted)
        if not chosen:
            raise ConfigError(
                "no XiaoAi speaker on this Xiaomi account: set the speaker up in the Xiaomi "
                "Home / XiaoAi app with the same account (shared speakers are not listed)"
            )
        return chosen

    async def utterances(self) -> AsyncGenerator[Utterance, None]:
        """Every new record of every speaker, forever; ConfigError if a speaker is unknown."""
        start_ms = int(self._clock() * 1000)
        devices = await self._discover()
        queue: asyncio.Queue[Utterance] = asyncio.Queue(maxsize=self._max_queued)
        tasks: list[asyncio.Task[None]] = []
        self._pollers = {}
        labels: set[str] = set()
        for device in devices:
            label = _unique_label(device, labels)
            labels.add(label)
            poller = SpeakerPoller(
                device=device,
                label=label,
                policy=self._policy(f"{self._name} {label}"),
                continuous_until=self._continuous.get(device.device_id, 0.0),
                route=XiaomiRoute(
                    device_id=device.device_id,
                    hardware=device.hardware,
                    miot_did=device.miot_did,
                    name=device.name or device.alias,
                ),
            )
            self._pollers[device.device_id] = poller
            if self._on_speaker is not None:  # e.g. for /healthz, one entry per speaker
                self._on_speaker(label, poller.policy)
            if not device.online:
                _LOGGER.info("%s: speaker %s is offline; polling it anyway", self._name, label)
        _LOGGER.info(
            "%s: polling %d speaker(s): %s",
            self._name,
            len(self._pollers),
            ", ".join(f"{p.label} ({p.device.hardware})" for p in self._pollers.values()),
        )
        getter: asyncio.Future[Utterance] | None = None
        try:
            for poller in self._pollers.values():
                tasks.append(
                    asyncio.create_task(
                        self._poll(poller, start_ms, queue),
                        name=f"{self._name}:poll:{poller.label}",
                    )
                )
            while True:
                getter = asyncio.ensure_future(queue.get())
                # Wake on a record, or on a poller dying of a bug (re-raised below).
                done, _ = await asyncio.wait([getter, *tasks], return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    for task in done:
                        task.result()  # a poller only ends by raising
                    continue
                yield getter.result()
        finally:
            pending: list[asyncio.Future[Any]] = [*tasks]
            if getter is not None:
                pending.append(getter)
            for future in pending:
                future.cancel()
            if pending:
                await asyncio.wait(pending)
            for poller in self._pollers.values():
                poller.policy.stopped()

    async def _discover(self) -> list[MinaDevice]:
        # A ConfigError (unknown speaker) is not retried: the runner lets it through.
        devices = await self._runner(self.discovery).run(self.resolve_speakers)
        self.discovery.connected()
        return devices

    async def _poll(
        self, poller: SpeakerPoller, start_ms: int, queue: asyncio.Queue[Utterance]
    ) -> None:
        device = poller.device
        cursor = ConversationCursor(
            self._conversation,
            device.device_id,
            device.hardware,
            start_ms=start_ms,
            freshness_s=self._freshness_s,
            limit=self._limit,
            page_limit=self._page_limit,
            max_pages=self._max_pages,
            clock=self._clock,
        )

        async def poll_until_failure() -> None:
            while True:
                records = await cursor.poll()
                poller.policy.connected()
                poller.polls += 1
                poller.last_poll = self._clock()
                for record in records:
                    utterance = self._utterance(poller, record)
                    if utterance is not None:
                        poller.heard += 1
                        await queue.put(utterance)
                await self._sleep(self._next_delay(poller))

        # A random first offset spreads speakers over the interval from the start.
        await self._sleep(self._rng.uniform(0, self._interval_s))
        await self._runner(poller.policy).run(poll_until_failure)

    def _next_delay(self, poller: SpeakerPoller) -> float:
        continuous = self._clock() < poller.continuous_until
        interval = self._continuous_interval_s if continuous else self._interval_s
        return interval * self._rng.uniform(1 - self._jitter, 1 + self._jitter)

    def _utterance(self, poller: SpeakerPoller, record: ConversationRecord) -> Utterance | None:
        text = record.query.strip()
        if not text:
            _LOGGER.debug("%s: %s: record without text; ignored", self._name, poller.label)
            return None
        reply = next(
            (answer.text for answer in record.answers if answer.type in {"TTS", "LLM"}), ""
        )
        _LOGGER.debug("%s: %s heard %r", self._name, poller.label, text)
        return Utterance(
            text=text,
            device=poller.device.device_id,
            id=record.request_id or f"{poller.device.device_id}@{record.time_ms}",
            source=self._name,
            said_at=record.time_ms / 1000,
            route=poller.route,
            xiaoai_answer=reply,
        )

    def _runner(self, policy: ReconnectPolicy) -> ReconnectRunner:
        return ReconnectRunner(policy, _CLASSIFY, sleep=self._sleep)

    def _policy(self, name: str) -> ReconnectPolicy:
        return ReconnectPolicy(
            name=name,
            logger=_LOGGER,
            initial_delay_s=self._backoff_initial_s,
            max_delay_s=self._backoff_max_s,
            auth_delay_s=self._auth_retry_s,
            clock=self._clock,
            rng=self._rng,
        )


def _unique_label(device: MinaDevice, taken: set[str]) -> str:
    """The speaker's name for logs and /healthz; its id's tail tells same-named ones apart."""
    label = device.name or device.alias or device.hardware or "speaker"
    if label in taken:
        label = f"{label} {redact_id(device.device_id)}"
    return label
