"""The conversation log: bounded history per device and a live feed that never blocks."""

from __future__ import annotations

import asyncio
import logging

import pytest

from xiaoai_bridge.log import register_secret
from xiaoai_bridge.models import Answer, Outcome, SpeechChunk, ToolCallRecord, Utterance
from xiaoai_bridge.status import TOOL_TEXT_CHARS, ConversationLog, Event


class Clock:
    """Wall time that moves only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def converse(
    log: ConversationLog, utterance: Utterance, sentences: list[str], outcome: Outcome
) -> Answer:
    """One answer's life cycle, as the dispatcher drives an observer."""
    await log.begin(utterance)
    for seq, text in enumerate(sentences):
        final = seq == len(sentences) - 1
        await log.chunk(utterance, SpeechChunk(utterance.id, utterance.device, seq, text, final))
    answer = Answer(utterance, outcome, "".join(sentences), "", 0.25, 0.75)
    await log.end(answer)
    return answer


def drain(subscription_events: list[Event | None]) -> list[str]:
    return [event.kind for event in subscription_events if event is not None]


async def test_a_conversation_is_kept_with_its_chunks_answer_and_timings() -> None:
    clock = Clock()
    log = ConversationLog(clock=clock)
    heard = Utterance("今天天气", device="kitchen", id="q1", source="mqtt", said_at=clock.now - 2)
    await converse(log, heard, ["晴天。", "二十五度。"], Outcome.ANSWERED)
    [entry] = log.recent("kitchen")
    assert entry.question == "今天天气"
    assert entry.id == "q1"
    assert entry.source == "mqtt"
    assert entry.chunks == ["晴天。", "二十五度。"]
    assert entry.answer == "晴天。二十五度。"
    assert entry.outcome == "answered"
    assert (entry.first_chunk_s, entry.total_s) == (0.25, 0.75)
    assert entry.said_at == clock.now - 2
    assert entry.started_at == clock.now
    assert log.snapshot() == {"kitchen": [entry.as_dict()]}


async def test_failures_and_ignored_utterances_are_logged_with_their_reason() -> None:
    log = ConversationLog()
    failed = Utterance("问题", device="d")
    await log.begin(failed)
    await log.chunk(failed, SpeechChunk("", "d", 0, "抱歉，大模型响应超时了。", final=True))
    await log.end(Answer(failed, Outcome.FAILED, "抱歉，大模型响应超时了。", "timeout"))
    # Ignored utterances end without a begin or a chunk.
    ignored = Utterance("打开灯", device="d")
    await log.end(Answer(ignored, Outcome.IGNORED, reason="not_triggered"))
    first, second = log.recent("d")
    assert (first.outcome, first.reason, first.answer) == (
        "failed",
        "timeout",
        "抱歉，大模型响应超时了。",
    )
    assert (second.question, second.outcome, second.reason) == (
        "打开灯",
        "ignored",
        "not_triggered",
    )


async def test_history_is_bounded_per_device_and_in_devices() -> None:
    log = ConversationLog(per_device=3, max_devices=2, max_chunks=2)
    for n in range(5):
        await converse(
            log, Utterance(f"问题{n}", device="a"), ["一。", "二。", "三。"], Outcome.ANSWERED
        )
    assert [entry.question for entry in log.recent("a")] == ["问题2", "问题3", "问题4"]
    assert log.recent("a")[-1].chunks == ["一。", "二。"]  # chunks capped, answer kept
    assert log.recent("a")[-1].answer == "一。二。三。"
    await converse(log, Utterance("b", device="b"), ["好。"], Outcome.ANSWERED)
    await converse(log, Utterance("a again", device="a"), ["好。"], Outcome.ANSWERED)
    await converse(log, Utterance("c", device="c"), ["好。"], Outcome.ANSWERED)
    # The least recently active device went first.
    assert log.devices() == ["c", "a"]
    assert log.recent("b") == []


async def test_devices_interleave_without_mixing_their_answers() -> None:
    log = ConversationLog()
    one, two = Utterance("一", device="one"), Utterance("二", device="two")
    await log.begin(one)
    await log.begin(two)
    await log.chunk(two, SpeechChunk("", "two", 0, "二号回答。", final=False))
    await log.chunk(one, SpeechChunk("", "one", 0, "一号回答。", final=False))
    await log.end(Answer(two, Outcome.ANSWERED, "二号回答。"))
    await log.end(Answer(one, Outcome.ANSWERED, "一号回答。"))
    assert log.recent("one")[0].chunks == ["一号回答。"]
    assert log.recent("two")[0].chunks == ["二号回答。"]


async def test_an_answer_that_never_ended_is_marked_when_the_next_begins() -> None:
    log = ConversationLog()
    await log.begin(Utterance("崩溃了", device="d"))
    await converse(log, Utterance("下一个", device="d"), ["好。"], Outcome.ANSWERED)
    stale, fresh = log.recent("d")
    assert (stale.outcome, stale.reason) == ("failed", "unfinished")
    assert fresh.outcome == "answered"


async def test_subscribers_see_begin_chunks_and_end_in_order() -> None:
    log = ConversationLog()
    with log.subscribe() as subscription:
        heard = Utterance("你好", device="d", id=7)
        await converse(log, heard, ["你好。", "很高兴见到你。"], Outcome.ANSWERED)
        events = [await subscription.get() for _ in range(4)]
    assert drain(events) == ["begin", "chunk", "chunk", "end"]
    begin, first, second, end = (event for event in events if event is not None)
    assert begin.data["question"] == "你好"
    assert begin.data["outcome"] == ""
    assert (first.data["text"], first.data["seq"], first.data["final"]) == ("你好。", 0, False)
    assert second.data["final"] is True
    assert first.data["key"] == begin.data["key"] == end.data["key"]
    assert end.data["answer"] == "你好。很高兴见到你。"
    assert log.subscribers == 0


async def test_a_slow_subscriber_is_dropped_and_never_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = ConversationLog(queue_size=4)
    slow = log.subscribe()
    fast = log.subscribe()
    received: list[Event] = []

    async def follow() -> None:
        while (event := await fast.get()) is not None:
            received.append(event)

    follower = asyncio.create_task(follow())
    for n in range(10):  # 30 events, far more than the slow queue holds
        await converse(log, Utterance(f"问题{n}", device="d"), ["好。"], Outcome.ANSWERED)
        await asyncio.sleep(0)  # the fast one keeps up
    assert slow.dropped
    assert slow.closed
    assert await slow.get() is None
    assert log.subscribers == 1
    assert any("fell 4 events behind" in r.getMessage() for r in caplog.records)
    assert all(r.levelno <= logging.WARNING for r in caplog.records)
    log.close()
    async with asyncio.timeout(1):
        await follower
    assert len(received) == 30
    assert not fast.dropped


async def test_close_ends_waiting_subscribers() -> None:
    log = ConversationLog()
    subscription = log.subscribe()
    waiting = asyncio.create_task(subscription.get())
    await asyncio.sleep(0)
    log.close()
    async with asyncio.timeout(1):
        assert await waiting is None
    assert log.subscribers == 0


async def test_published_events_reach_subscribers() -> None:
    log = ConversationLog()
    with log.subscribe() as subscription:
        log.publish("answering", {"enabled": False})
        event = await subscription.get()
    assert event == Event("answering", {"enabled": False})


async def test_each_event_is_encoded_once_for_every_page() -> None:
    log = ConversationLog()
    pages = [log.subscribe() for _ in range(3)]
    log.publish("forgot", {"device": "厨房", "turns": 2})
    events = [await page.get() for page in pages]
    first = events[0]
    assert first is not None
    assert first.frame == 'event: forgot\ndata: {"device": "厨房", "turns": 2}\n\n'.encode()
    # One encoding shared by every page, not one per page.
    assert all(event is first and event.frame is first.frame for event in events)
    log.close()


async def test_a_page_takes_every_waiting_event_in_one_batch() -> None:
    log = ConversationLog()
    subscription = log.subscribe()
    await converse(log, Utterance("你好", device="d", id=1), ["你好。", "再见。"], Outcome.ANSWERED)
    batch = await subscription.next_batch()
    assert [event.kind for event in batch] == ["begin", "chunk", "chunk", "end"]
    waiting = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    assert not waiting.done()  # waits for the next event rather than spinning
    log.publish("answering", {"enabled": True})
    async with asyncio.timeout(1):
        assert [event.kind for event in await waiting] == ["answering"]
    subscription.close()
    assert await subscription.next_batch() == []


async def test_a_dropped_page_is_told_at_once_so_its_connection_can_end() -> None:
    log = ConversationLog(queue_size=2)
    dropped: list[str] = []
    slow = log.subscribe(on_drop=lambda: dropped.append("slow"))
    with log.subscribe(on_drop=lambda: dropped.append("closed normally")) as keeping_up:
        for n in range(3):
            log.publish("answering", {"enabled": n % 2 == 0})
            assert await keeping_up.next_batch()
            assert dropped == ([] if n < 2 else ["slow"])
    assert dropped == ["slow"]
    assert slow.dropped
    assert await slow.next_batch() == []


async def test_a_lingering_page_gathers_a_burst_into_one_batch() -> None:
    log = ConversationLog()
    with log.subscribe() as subscription:
        log.publish("answering", {"enabled": False})
        waiting = asyncio.create_task(subscription.next_batch(linger_s=0.05))
        await asyncio.sleep(0)
        log.publish("answering", {"enabled": True})  # arrives while the page lingers
        async with asyncio.timeout(1):
            batch = await waiting
    assert [event.data["enabled"] for event in batch] == [False, True]


async def test_tool_calls_are_kept_short_with_their_outcome_and_time_in_ms() -> None:
    log = ConversationLog(max_tool_calls=2)
    register_secret("sk-tool-secret-93jd")
    asked = Utterance("把灯关了", device="kitchen", id="t1")
    await log.begin(asked)
    calls = (
        ToolCallRecord("turn_off", "house", '{"name": "客厅灯"}', "ok", "客厅灯 is off", 0.0314),
        ToolCallRecord(
            "search", "mcp:web", "{}", "error", "error: key sk-tool-secret-93jd " + "x" * 900, 1.5
        ),
        ToolCallRecord("x" * 500, "", "{}", "unknown_tool", "error: no such tool", 0.0),
    )
    with log.subscribe() as subscription:
        await log.end(Answer(asked, Outcome.ANSWERED, "好了。", tool_calls=calls))
        end = await subscription.get()
    [entry] = log.recent("kitchen")
    assert entry.tool_calls[0] == {
        "name": "turn_off",
        "source": "house",
        "arguments": '{"name": "客厅灯"}',
        "outcome": "ok",
        "result": "客厅灯 is off",
        "ms": 31,
    }
    search = entry.tool_calls[1]
    assert search["result"].startswith("error: key *** xxx")
    assert len(search["result"]) == TOOL_TEXT_CHARS
    assert search["result"].endswith("…")
    assert (search["outcome"], search["ms"]) == ("error", 1500)
    # Past the cap, the page is told how many were left out.
    assert len(entry.tool_calls) == 2
    assert entry.tool_calls_omitted == 1
    assert end is not None
    assert end.data["tool_calls"] == entry.tool_calls
    assert end.data["tool_calls_omitted"] == 1
