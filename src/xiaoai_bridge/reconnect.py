"""Reconnecting every long-lived connection: the backoff policy and the one loop that uses it."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

DEFAULT_INITIAL_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 30.0
DEFAULT_MULTIPLIER = 2.0
# Auth failures will not fix themselves in seconds; retry them slowly.
DEFAULT_AUTH_DELAY_S = 300.0

_T = TypeVar("_T")
Sleep = Callable[[float], Awaitable[None]]


class ConnectionState(enum.Enum):
    """What /healthz and the logs say about one adapter's connection."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class ReconnectPolicy:
    """Tracks one connection's state and says how long to wait before the next attempt.

    The first failure after a good connection is logged at WARNING, the retries at DEBUG,
    and the recovery once at INFO, so a flapping broker does not flood the log.
    """

    name: str
    logger: logging.Logger
    initial_delay_s: float = DEFAULT_INITIAL_DELAY_S
    max_delay_s: float = DEFAULT_MAX_DELAY_S
    multiplier: float = DEFAULT_MULTIPLIER
    auth_delay_s: float = DEFAULT_AUTH_DELAY_S
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    state: ConnectionState = ConnectionState.CONNECTING
    since: float = 0.0
    last_error: str = ""
    failures: int = 0
    reconnects: int = 0

    def __post_init__(self) -> None:
        self.since = self.clock()

    def connected(self) -> None:
        """Record a successful connection."""
        if self.state is ConnectionState.RECONNECTING:
            self.reconnects += 1
            self.logger.info(
                "%s: connection restored after %d failed attempts", self.name, self.failures
            )
        elif self.state is not ConnectionState.CONNECTED:
            self.logger.info("%s: connected", self.name)
        self.failures = 0
        self._set(ConnectionState.CONNECTED)

    def failed(self, error: BaseException, *, auth: bool = False) -> float:
        """Record a failed or lost connection and return the delay before the next attempt."""
        self.failures += 1
        self.last_error = type(error).__name__
        if self.failures == 1:
            self.logger.warning("%s: connection unavailable: %s", self.name, error)
        else:
            self.logger.debug("%s: attempt %d failed: %s", self.name, self.failures, error)
        self._set(ConnectionState.RECONNECTING)
        if auth:
            return self.auth_delay_s
        ceiling = min(
            self.max_delay_s, self.initial_delay_s * self.multiplier ** (self.failures - 1)
        )
        # "Equal jitter": never less than half the ceiling, so retries still back off.
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def fatal(self, error: BaseException) -> None:
        """Record an error that ends this connection for good."""
        self.last_error = type(error).__name__
        self._set(ConnectionState.FAILED)

    def stopped(self) -> None:
        """Record an orderly shutdown."""
        self._set(ConnectionState.STOPPED)

    def _set(self, state: ConnectionState) -> None:
        if state is not self.state:
            self.state = state
            self.since = self.clock()


class Retry(enum.Enum):
    """What an error that ended an attempt means for the next one."""

    SOON = "soon"  # the peer is away or failing: back off, jittered and capped
    SLOWLY = "slowly"  # refused credentials: retrying fast only provokes lockouts
    NEVER = "never"  # nothing a retry can fix: record it and raise


# None: not a connection problem (a bug, a config error); the runner lets it through as is.
Classify = Callable[[Exception], Retry | None]


def classify_by_type(table: Mapping[type[Exception], Retry]) -> Classify:
    """A Classify from exception types; the first entry the error is an instance of wins."""

    def classify(error: Exception) -> Retry | None:
        return next((retry for kind, retry in table.items() if isinstance(error, kind)), None)

    return classify


class ReconnectRunner:
    """Runs an attempt ("connect and serve once") again and again until one returns.

    The attempt says when it is connected (`policy.connected()`) and raises when the
    connection fails or ends; `classify` says whether and how soon to try again, the policy
    records the failure and says how long to wait. A returning attempt ends the loop with its
    value; cancellation passes through, even when the attempt reports it as another error.
    """

    def __init__(
        self,
        policy: ReconnectPolicy,
        classify: Classify,
        *,
        sleep: Sleep = asyncio.sleep,
        on_failure: Callable[[Exception, float], None] | None = None,
    ) -> None:
        """`on_failure(error, delay)` runs after the policy recorded a retried failure."""
        self.policy = policy
        self._classify = classify
        self._sleep = sleep
        self._on_failure = on_failure

    def connected(self) -> None:
        """Record that the attempt is connected (instead of calling `policy.connected()`).

        Raises CancelledError if the task is being cancelled: a library may have swallowed the
        cancel while connecting (Python 3.11's `asyncio.wait_for` does when its answer arrives
        in the same instant), and the connection would then serve on after a shutdown.
        """
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        self.policy.connected()

    async def run(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """Await `attempt()` until it returns; raise what is fatal or not classified."""
        while True:
            try:
                return await attempt()
            except Exception as err:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # A library turned our cancellation into its own error (aiomqtt does,
                    # during connect and disconnect); retrying would swallow the shutdown.
                    raise asyncio.CancelledError from err
                retry = self._classify(err)
                if retry is None:
                    raise
                if retry is Retry.NEVER:
                    self.policy.fatal(err)
                    raise
                delay = self.policy.failed(err, auth=retry is Retry.SLOWLY)
                if self._on_failure is not None:
                    self._on_failure(err, delay)
            await self._sleep(delay)
