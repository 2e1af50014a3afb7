"""The reconnect runner with an injected clock and sleep: no test waits on the wall clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import pytest

from xiaoai_bridge.reconnect import (
    ConnectionState,
    ReconnectPolicy,
    ReconnectRunner,
    Retry,
    classify_by_type,
)

_LOGGER = logging.getLogger("tests.reconnect")


class Away(Exception):
    """The peer is unreachable."""


class Refused(Away):
    """The peer refused the credentials."""


class Broken(Exception):
    """Nothing a retry fixes."""


class FakeTime:
    """A clock that only moves when the runner sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)  # still a suspension point, as the real sleep is


CLASSIFY = classify_by_type({Refused: Retry.SLOWLY, Away: Retry.SOON, Broken: Retry.NEVER})


def make(
    time: FakeTime, on_failure: Callable[[Exception, float], None] | None = None
) -> tuple[ReconnectPolicy, ReconnectRunner]:
    policy = ReconnectPolicy(
        name="peer",
        logger=_LOGGER,
        initial_delay_s=1.0,
        max_delay_s=8.0,
        auth_delay_s=300.0,
        clock=time.clock,
        rng=random.Random(3),  # noqa: S311  # jitter, seeded for repeatable runs
    )
    return policy, ReconnectRunner(policy, CLASSIFY, sleep=time.sleep, on_failure=on_failure)


class Script:
    """An attempt that fails with the given errors in turn, then connects and returns."""

    def __init__(self, policy: ReconnectPolicy, *errors: Exception) -> None:
        self.policy = policy
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.policy.connected()
        return "served"


async def test_retries_back_off_exponentially_with_jitter_and_cap() -> None:
    time = FakeTime()
    policy, runner = make(time)
    attempt = Script(policy, *(Away(f"down {n}") for n in range(6)))

    assert await runner.run(attempt) == "served"

    assert attempt.calls == 7
    # Equal jitter: each delay lies between half its ceiling and the ceiling (1, 2, 4, 8, 8, 8).
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert len(time.sleeps) == 6
    for delay, ceiling in zip(time.sleeps, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert policy.state is ConnectionState.CONNECTED
    assert policy.failures == 0
    assert policy.reconnects == 1
    assert policy.last_error == "Away"
    assert policy.since == time.now  # recorded on the injected clock


async def test_refused_credentials_wait_the_auth_delay() -> None:
    time = FakeTime()
    policy, runner = make(time)

    await runner.run(Script(policy, Refused("bad password"), Away("down")))

    assert time.sleeps[0] == 300.0
    assert time.sleeps[1] <= 2.0  # the second failure's ordinary backoff


async def test_a_fatal_error_is_recorded_and_raised_without_waiting() -> None:
    time = FakeTime()
    policy, runner = make(time)
    attempt = Script(policy, Away("down"), Broken("gone for good"))

    with pytest.raises(Broken, match="gone for good"):
        await runner.run(attempt)

    assert attempt.calls == 2
    assert len(time.sleeps) == 1
    assert policy.state is ConnectionState.FAILED
    assert policy.last_error == "Broken"


async def test_an_error_it_was_not_told_about_passes_through_untouched() -> None:
    time = FakeTime()
    policy, runner = make(time)

    with pytest.raises(KeyError):
        await runner.run(Script(policy, KeyError("a bug")))

    assert time.sleeps == []
    assert policy.state is ConnectionState.CONNECTING
    assert policy.failures == 0


async def test_cancellation_while_waiting_is_not_swallowed() -> None:
    policy = ReconnectPolicy(name="peer", logger=_LOGGER, initial_delay_s=60.0)
    waiting = asyncio.Event()

    async def sleep(delay: float) -> None:
        waiting.set()
        await asyncio.Event().wait()  # a long wait, ended only by the cancellation

    runner = ReconnectRunner(policy, CLASSIFY, sleep=sleep)
    attempt = Script(policy, *(Away("down") for _ in range(9)))
    async with asyncio.TaskGroup() as group:
        task = group.create_task(runner.run(attempt))
        await waiting.wait()
        task.cancel()

    assert task.cancelled()
    assert attempt.calls == 1
    assert policy.state is ConnectionState.RECONNECTING


async def test_a_cancel_reported_as_a_lost_connection_still_ends_the_runner() -> None:
    time = FakeTime()
    policy, runner = make(time)
    waiting = asyncio.Event()
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            return "served again"  # where a runner that swallowed the cancel would end up
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise Away("connection lost") from None  # as aiomqtt may report a cancel
        return "unreachable"

    async with asyncio.TaskGroup() as group:
        task = group.create_task(runner.run(attempt))
        await waiting.wait()
        task.cancel()

    assert task.cancelled()
    assert calls == 1
    assert time.sleeps == []
    assert policy.failures == 0  # a shutdown, not a lost connection


async def test_a_cancel_swallowed_while_connecting_ends_the_attempt_when_it_connects() -> None:
    time = FakeTime()
    policy, runner = make(time)
    waiting = asyncio.Event()

    async def attempt() -> str:
        waiting.set()
        # As Python 3.11's wait_for does when its answer is there at the same moment:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        runner.connected()
        return "serving after the shutdown"

    async with asyncio.TaskGroup() as group:
        task = group.create_task(runner.run(attempt))
        await waiting.wait()
        task.cancel()

    assert task.cancelled()
    assert policy.state is ConnectionState.CONNECTING  # never reported as connected


async def test_on_failure_sees_the_recorded_failure_and_its_delay() -> None:
    time = FakeTime()
    seen: list[tuple[str, float, int]] = []

    def on_failure(error: Exception, delay: float) -> None:
        seen.append((str(error), delay, policy.failures))

    policy, runner = make(time, on_failure=on_failure)
    await runner.run(Script(policy, Away("one"), Refused("two")))

    assert seen == [("one", time.sleeps[0], 1), ("two", 300.0, 2)]


def test_classify_by_type_takes_the_first_matching_entry() -> None:
    specific_first = classify_by_type({Refused: Retry.SLOWLY, Away: Retry.SOON})
    general_first = classify_by_type({Away: Retry.SOON, Refused: Retry.SLOWLY})

    assert specific_first(Refused()) is Retry.SLOWLY
    assert general_first(Refused()) is Retry.SOON
    assert specific_first(Broken()) is None


async def test_first_failure_warns_retries_are_quiet_and_recovery_is_told_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=_LOGGER.name)
    time = FakeTime()
    policy, runner = make(time)

    await runner.run(Script(policy, Away("one"), Away("two"), Away("three")))

    levels = [(record.levelno, record.getMessage()) for record in caplog.records]
    assert levels == [
        (logging.WARNING, "peer: connection unavailable: one"),
        (logging.DEBUG, "peer: attempt 2 failed: two"),
        (logging.DEBUG, "peer: attempt 3 failed: three"),
        (logging.INFO, "peer: connection restored after 3 failed attempts"),
    ]
