"""Reconnect policy shared by every long-lived connection: jittered, capped backoff."""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_INITIAL_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 30.0
DEFAULT_MULTIPLIER = 2.0
# Auth failures will not fix themselves in seconds; retry them slowly.
DEFAULT_AUTH_DELAY_S = 300.0


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
