"""Tests for the speaker queue on a fake clock: merging, pacing, interrupting, idling."""

from __future__ import annotations

import asyncio
import logging

import pytest

from xiaoai_bridge.sinks.speaker_queue import Action, Clock, Playing, SpeakerQueue, UntilDone


async def settle() -> None:
    """Let every task that can run, run (no wall-clock time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


class FakeTime:
    """A clock that moves only when told; sleepers wake when it passes their deadline."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> Clock:
        return Clock(lambda: self.now, self.sleep)

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        await future

    @property
    def sleeping(self) -> int:
        return sum(1 for _, future in self._sleepers if not future.done())

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for due, future in self._sleepers:
            if due <= self.now and not future.done():
                future.set_result(None)
        self._sleepers = [(due, f) for due, f in self._sleepers if not f.done()]
        await settle()


class FakeSpeaker:
    """Says texts instantly; each character takes one (fake) second to speak."""

    def __init__(self, time: FakeTime) -> None:
        self.time = time
        self.said: list[tuple[float, str]] = []
        self.fail_next = False

    async def speak(self, text: str) -> float | None:
        self.said.append((self.time.now, text))
        if self.fail_next:
            self.fail_next = False
            return None
        return float(len(text))


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def speaker(time: FakeTime) -> FakeSpeaker:
    return FakeSpeaker(time)


def make_queue(
    time: FakeTime,
    speaker: FakeSpeaker,
    *,
    merge_max_chars: int = 120,
    max_queued: int = 64,
    until_done: UntilDone | None = None,
) -> SpeakerQueue:
    return SpeakerQueue(
        speaker.speak,
        until_done=until_done,
        name="test",
        label="living room",
        merge_max_chars=merge_max_chars,
        max_queued=max_queued,
        clock=time.clock(),
    )


async def test_the_next_sentence_waits_for_the_estimate_of_the_last(
    time: FakeTime, speaker: FakeSpeaker
) -> None:
    queue = make_queue(time, speaker, merge_max_chars=3)
    queue.say("一二三")
    queue.say("四五")
    await settle()
    assert speaker.said == [(0.0, "一二三")]
    await time.advance(2.9)
    assert len(speaker.said) == 1
    await time.advance(0.1)
    assert speaker.said == [(0.0, "一二三"), (3.0, "四五")]
    assert queue.pending == 0
    await queue.aclose()


async def test_sentences_queued_meanwhile_merge_up_to_the_limit(
    time: FakeTime, speaker: FakeSpeaker
) -> None:
    queue = make_queue(time, speaker, merge_max_chars=4)
    queue.say("一二")
    await settle()
    for text in ["甲。", "乙。", "丙。"]:
        queue.say(text)
    assert queue.pending == 3
    await time.advance(2)
    await time.advance(4)
    assert speaker.said == [(0.0, "一二"), (2.0, "甲。乙。"), (6.0, "丙。")]
    await queue.aclose()


async def test_an_unmergeable_sentence_goes_out_alone(time: FakeTime, speaker: FakeSpeaker) -> None:
    queue = make_queue(time, speaker)
    queue.say("让我想想", mergeable=False)
    queue.say("好。")
    queue.say("的。")
    await settle()
    await time.advance(4)
    assert [text for _, text in speaker.said] == ["让我想想", "好。的。"]
    await queue.aclose()


async def test_interrupt_drops_the_queue_and_the_wait_so_the_new_answer_goes_at_once(
    time: FakeTime, speaker: FakeSpeaker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    queue = make_queue(time, speaker, merge_max_chars=2)
    queue.say("一二三四五")
    queue.say("旧二")
    queue.say("旧三")
    await settle()
    assert time.sleeping == 1  # pacing the old answer

    assert await queue.interrupt() == 2
    assert (queue.pending, time.sleeping) == (0, 0)
    queue.say("新的")
    await settle()
    assert speaker.said == [(0.0, "一二三四五"), (0.0, "新的")]
    assert "dropped 2 queued sentence(s)" in caplog.text
    await queue.aclose()


async def test_interrupt_aborts_a_call_under_way(time: FakeTime) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    said: list[str] = []

    async def slow_speak(text: str) -> float:
        said.append(text)
        if len(said) == 1:
            started.set()
            try:
                await asyncio.Event().wait()  # a cloud call that hangs
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return 1.0

    queue = SpeakerQueue(slow_speak, name="test", label="x", clock=time.clock())
    queue.say("旧的")
    await started.wait()
    await queue.interrupt()
    assert cancelled.is_set()
    queue.say("新的")
    await settle()
    assert said == ["旧的", "新的"]
    await queue.aclose()


async def test_until_done_replaces_the_estimate(time: FakeTime, speaker: FakeSpeaker) -> None:
    done = asyncio.Event()
    seen: list[Playing] = []

    async def until_done(playing: Playing) -> None:
        seen.append(playing)
        await done.wait()  # e.g. the speaker's play status says it stopped

    queue = make_queue(time, speaker, until_done=until_done, merge_max_chars=2)
    queue.say("一二三")
    queue.say("四五")
    await settle()
    await time.advance(10)  # far beyond the estimate: only until_done decides
    assert len(speaker.said) == 1
    assert seen == [Playing(sent_at=0.0, seconds=3.0)]
    done.set()
    await settle()
    assert [text for _, text in speaker.said] == ["一二三", "四五"]
    await queue.aclose()


async def test_a_sentence_that_could_not_be_said_does_not_hold_up_the_next(
    time: FakeTime, speaker: FakeSpeaker
) -> None:
    queue = make_queue(time, speaker, merge_max_chars=2)
    speaker.fail_next = True
    queue.say("丢了")
    queue.say("还在")
    await settle()
    assert speaker.said == [(0.0, "丢了"), (0.0, "还在")]
    await queue.aclose()


async def test_actions_run_at_once_or_after_the_speech_before_them(
    time: FakeTime, speaker: FakeSpeaker
) -> None:
    ran: list[tuple[float, str]] = []

    def action(name: str) -> Action:
        async def run() -> None:
            ran.append((time.now, name))

        return run

    queue = make_queue(time, speaker)
    queue.say("一二")
    await settle()
    queue.say("三")
    queue.act(action("silence"), at_once=True)
    queue.act(action("wake"), at_once=False)
    await settle()
    # An at-once action still waits its turn behind the sentence before it in the queue,
    # but not for that sentence's speech; the other kind waits until it has been spoken.
    assert ran == []
    await time.advance(2)
    assert speaker.said[-1] == (2.0, "三")
    assert ran == [(2.0, "silence")]
    await time.advance(1)
    assert ran == [(2.0, "silence"), (3.0, "wake")]
    await queue.aclose()


async def test_an_at_once_action_at_the_head_skips_the_wait(
    time: FakeTime, speaker: FakeSpeaker
) -> None:
    ran: list[float] = []

    async def silence() -> None:
        ran.append(time.now)

    queue = make_queue(time, speaker)
    queue.say("一二三")
    await settle()
    queue.act(silence, at_once=True)
    await settle()
    assert ran == [0.0]  # not after the 3 s of "一二三"
    await queue.aclose()


async def test_wait_idle_returns_once_everything_was_handed_over(
    time: FakeTime, speaker: FakeSpeaker
) -> None:
    queue = make_queue(time, speaker, merge_max_chars=1)
    await queue.wait_idle()  # nothing queued: at once
    queue.say("一")
    queue.say("二")
    waiter = asyncio.create_task(queue.wait_idle())
    await settle()
    assert not waiter.done()
    await time.advance(1)
    await waiter
    # Handed over, though "二" is still playing by the estimate.
    assert speaker.said == [(0.0, "一"), (1.0, "二")]
    await queue.aclose()


async def test_overflow_drops_the_oldest(
    time: FakeTime, speaker: FakeSpeaker, caplog: pytest.LogCaptureFixture
) -> None:
    queue = make_queue(time, speaker, merge_max_chars=1, max_queued=2)
    queue.say("一")
    await settle()
    for text in ["二", "三", "四"]:
        queue.say(text)
    assert queue.pending == 2
    assert "living room has 2 sentences queued; dropping the oldest" in caplog.text
    await time.advance(1)
    await time.advance(1)
    assert [text for _, text in speaker.said] == ["一", "三", "四"]
    await queue.aclose()


async def test_a_bug_in_speak_is_logged_and_the_next_sentence_restarts_the_queue(
    time: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    said: list[str] = []

    async def speak(text: str) -> float:
        said.append(text)
        if text == "坏":
            raise RuntimeError("bug")
        return 0.0

    queue = SpeakerQueue(speak, name="test", label="x", clock=time.clock())
    queue.say("坏")
    await queue.wait_idle()  # does not hang on the dead task
    assert "speaker task for x failed" in caplog.text
    queue.say("好")
    await queue.wait_idle()
    assert said == ["坏", "好"]
    await queue.aclose()


async def test_aclose_stops_the_task_and_drops_the_queue(
    time: FakeTime, speaker: FakeSpeaker
) -> None:
    queue = make_queue(time, speaker, merge_max_chars=1)
    queue.say("一")
    queue.say("二")
    await settle()
    await queue.aclose()
    assert (queue.pending, time.sleeping) == (0, 0)
    await queue.wait_idle()
    await time.advance(5)
    assert speaker.said == [(0.0, "一")]


async def test_sleep_until_set_wakes_on_the_event_or_the_deadline(time: FakeTime) -> None:
    clock = time.clock()
    event = asyncio.Event()
    sleeper = asyncio.create_task(clock.sleep_until_set(event, 5.0))
    await settle()
    event.set()
    await settle()
    assert sleeper.done()
    assert time.sleeping == 0  # the losing sleep was cancelled

    event.clear()
    sleeper = asyncio.create_task(clock.sleep_until_set(event, 5.0))
    await time.advance(5)
    assert sleeper.done()
    await clock.sleep_until_set(event, 1.0)  # already past: returns at once
