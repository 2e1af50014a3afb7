"""The dispatcher: order per device, concurrency across devices, the durable inbox, the bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import pytest

from tests.pipeline.test_pipeline import Recorder
from xiaoai_bridge.llm.base import ChatMessage, Message, RoundEvent, ToolSpec
from xiaoai_bridge.models import Utterance
from xiaoai_bridge.pipeline import dispatcher as dispatcher_module
from xiaoai_bridge.pipeline.dispatcher import Dispatcher
from xiaoai_bridge.pipeline.inbox import Inbox
from xiaoai_bridge.pipeline.memory import ConversationMemory
from xiaoai_bridge.pipeline.pipeline import APOLOGIES, Pipeline, PipelineSettings
from xiaoai_bridge.pipeline.trigger import Trigger


@dataclass
class GatedBackend:
    """A chat backend whose answers finish only when the test opens their gate."""

    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def gate(self, question: str) -> asyncio.Event:
        return self.gates.setdefault(question, asyncio.Event())

    @overload
    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]: ...

    @overload
    def stream(
        self, messages: Sequence[Message], *, tools: Sequence[ToolSpec]
    ) -> AsyncIterator[RoundEvent]: ...

    async def stream(
        self, messages: Sequence[Message], *, tools: Sequence[ToolSpec] | None = None
    ) -> AsyncIterator[RoundEvent]:
        last = messages[-1]
        question = last.content if isinstance(last, ChatMessage) else ""
        self.started.append(question)
        self.changed.set()
        await self.gate(question).wait()
        yield f"答{question}。"

    async def wait_started(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.started) < count:
                self.changed.clear()
                await self.changed.wait()

    async def check(self) -> str:
        return "gated"

    async def aclose(self) -> None:
        return None


def make_pipeline(backend: GatedBackend) -> Pipeline:
    memory = ConversationMemory(None, max_turns=0, max_tokens=0)
    memory.open()
    return Pipeline(
        backend=backend,
        memory=memory,
        settings=PipelineSettings(system_prompt="系统"),
        default_trigger=Trigger(strip_regex="", mode="all"),
    )


def question(text: str, device: str = "d1", source: str = "test") -> Utterance:
    return Utterance(text=text, device=device, id=text, source=source)


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[Inbox]:
    box = Inbox(tmp_path / "inbox.sqlite3")
    box.open()
    yield box
    await box.close()


async def test_one_device_in_order_and_devices_side_by_side() -> None:
    backend = GatedBackend()
    sink = Recorder()
    dispatcher = Dispatcher(make_pipeline(backend), {"test": sink})
    for text, device in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        dispatcher.admit(question(text, device))
    await backend.wait_started(2)
    assert backend.started == ["a1", "b1"]  # a2 waits for a1; b1 does not
    backend.gate("b1").set()
    backend.gate("a1").set()
    await backend.wait_started(3)
    backend.gate("a2").set()
    await dispatcher.drain()
    assert [a.utterance.id for a in sink.answers] == ["b1", "a1", "a2"]
    assert dispatcher.in_flight == 0


async def test_a_question_is_on_disk_from_admit_until_answered(inbox: Inbox) -> None:
    backend = GatedBackend()
    dispatcher = Dispatcher(make_pipeline(backend), {"test": Recorder()}, inbox=inbox)
    dispatcher.admit(question("q1"))
    assert [e.utterance for e in inbox.pending()] == [question("q1")]
    backend.gate("q1").set()
    await dispatcher.drain()
    await inbox.close()  # writes the batch of answered entries
    inbox.open()
    assert inbox.pending() == []


async def test_a_cancelled_answer_stays_in_the_inbox_and_the_next_run_resumes_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "inbox.sqlite3"
    first = Inbox(path)
    first.open()
    backend = GatedBackend()
    dispatcher = Dispatcher(make_pipeline(backend), {"test": Recorder()}, inbox=first)
    dispatcher.admit(question("q1"))
    dispatcher.admit(question("q2"))
    await backend.wait_started(1)
    await dispatcher.aclose()  # shutdown deadline passed: both unanswered
    await first.close()

    second = Inbox(path)
    second.open()
    backend = GatedBackend()
    sink = Recorder()
    dispatcher = Dispatcher(
        make_pipeline(backend), {"test": sink}, inbox=second, resume_freshness_s=60
    )
    dispatcher.resume()
    backend.gate("q1").set()
    backend.gate("q2").set()
    await dispatcher.drain()
    assert [a.utterance.id for a in sink.answers] == ["q1", "q2"]
    assert dispatcher.stats.resumed == 2
    await second.close()


async def test_resume_drops_stale_questions_and_unknown_sources(tmp_path: Path) -> None:
    now = [1000.0]
    box = Inbox(tmp_path / "inbox.sqlite3", clock=lambda: now[0])
    box.open()
    box.add(question("old"))
    now[0] += 50
    box.add(question("fresh"))
    box.add(question("orphan", source="gone"))
    now[0] += 20  # "old" is 70 s old, "fresh" 20 s
    backend = GatedBackend()
    backend.gate("fresh").set()
    sink = Recorder()
    dispatcher = Dispatcher(
        make_pipeline(backend),
        {"test": sink},
        inbox=box,
        resume_freshness_s=60,
        clock=lambda: now[0],
    )
    dispatcher.resume()
    await dispatcher.drain()
    assert [a.utterance.id for a in sink.answers] == ["fresh"]
    assert (dispatcher.stats.resumed, dispatcher.stats.dropped_stale) == (1, 2)
    await box.close()
    box.open()
    assert box.pending() == []  # dropped ones are gone for good
    await box.close()


async def test_past_the_bound_a_question_gets_a_busy_apology_at_once() -> None:
    backend = GatedBackend()
    sink = Recorder()
    dispatcher = Dispatcher(make_pipeline(backend), {"test": sink}, max_pending=2)
    answered = asyncio.Event()
    dispatcher.add_listener(lambda _: answered.set())
    for n in range(3):
        dispatcher.admit(question(f"q{n}", device=f"d{n}"))
    await backend.wait_started(2)
    async with asyncio.timeout(5):
        await answered.wait()
    refused = sink.answers[0]
    assert refused.utterance.id == "q2"
    assert refused.utterance.rejected == "busy"
    assert refused.text == APOLOGIES["busy"]
    assert dispatcher.stats.refused_busy == 1
    assert backend.started == ["q0", "q1"]  # the refused one never reached the model
    for gate in backend.gates.values():
        gate.set()
    await dispatcher.drain()


async def test_past_the_refusal_queue_questions_are_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dispatcher_module, "MAX_QUEUED_REFUSALS", 3)
    backend = GatedBackend()
    dispatcher = Dispatcher(make_pipeline(backend), {"test": Recorder()}, max_pending=1)
    dispatcher.admit(question("q", device="d"))
    for n in range(5):  # nothing yielded to the loop: the refusals are all still queued
        dispatcher.admit(question(f"r{n}", device=f"r{n}"))
    assert (dispatcher.stats.refused_busy, dispatcher.stats.dropped_overflow) == (3, 2)
    assert "dropping new questions unanswered" in caplog.text
    assert dispatcher.in_flight == 1 + 3
    backend.gate("q").set()
    await dispatcher.drain()
    await dispatcher.aclose()


async def test_a_question_from_a_source_without_a_sink_is_logged_not_queued(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = Dispatcher(make_pipeline(GatedBackend()), {"test": Recorder()})
    dispatcher.admit(question("q1", source="nowhere"))
    assert dispatcher.in_flight == 0
    assert "no sink for source 'nowhere'" in caplog.text


async def test_a_busy_reply_not_yet_sent_is_recorded_and_sent_by_the_next_run(
    inbox: Inbox,
) -> None:
    backend = GatedBackend()
    dispatcher = Dispatcher(
        make_pipeline(backend), {"test": Recorder()}, inbox=inbox, max_pending=1
    )
    dispatcher.admit(question("q", device="d"))
    dispatcher.admit(question("r", device="e"))  # refused, queued, not yet sent
    assert [(e.utterance.id, e.utterance.rejected) for e in inbox.pending()] == [
        ("q", ""),
        ("r", "busy"),
    ]
    await dispatcher.aclose()  # killed before anything was sent

    sink = Recorder()
    again = GatedBackend()
    again.gate("q").set()
    resumed = Dispatcher(make_pipeline(again), {"test": sink}, inbox=inbox)
    resumed.resume()
    await resumed.drain()
    texts = {a.utterance.id: a.text for a in sink.answers}
    assert texts["r"] == APOLOGIES["busy"]
    assert texts["q"] == "答q。"


async def test_one_device_name_on_two_sources_does_not_queue_behind_the_other() -> None:
    backend = GatedBackend()
    mqtt, ha = Recorder(), Recorder()
    dispatcher = Dispatcher(make_pipeline(backend), {"mqtt": mqtt, "homeassistant": ha})
    name = "media_player.xiaomi_lx06_a1b2"
    dispatcher.admit(question("家里", device=name, source="homeassistant"))
    dispatcher.admit(question("冒充", device=name, source="mqtt"))
    await backend.wait_started(2)  # both asked at once: two speakers, not one queue
    assert sorted(backend.started) == ["冒充", "家里"]
    for gate in backend.gates.values():
        gate.set()
    await dispatcher.drain()
    assert [a.utterance.source for a in mqtt.answers] == ["mqtt"]
    assert [a.utterance.source for a in ha.answers] == ["homeassistant"]
