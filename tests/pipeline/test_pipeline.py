"""The pipeline's decisions: commands, continuous conversation, the answering switch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import llm_settings
from tests.fakes.openai_server import FakeOpenAI
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend
from xiaoai_bridge.models import Answer, Outcome, SpeakerId, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.memory import ConversationMemory
from xiaoai_bridge.pipeline.pipeline import (
    CONTINUOUS_OFF_REPLY,
    CONTINUOUS_ON_REPLY,
    WAKE_ONLY_REPLY,
    Pipeline,
    PipelineSettings,
    join_sentences,
)
from xiaoai_bridge.pipeline.trigger import Trigger


@dataclass
class Recorder:
    """Stands in for a speaker: keeps what it was asked to do."""

    name: str = "test"
    begun: list[Utterance] = field(default_factory=list)
    chunks: list[SpeechChunk] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    async def begin(self, utterance: Utterance) -> None:
        self.begun.append(utterance)

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        self.chunks.append(chunk)

    async def end(self, answer: Answer) -> None:
        self.answers.append(answer)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pipeline(llm: FakeOpenAI) -> AsyncIterator[tuple[Pipeline, Clock]]:
    backend = OpenAICompatBackend(llm_settings(llm))
    memory = ConversationMemory(None, max_turns=5, max_tokens=1000)
    memory.open()
    clock = Clock()
    settings = PipelineSettings(
        system_prompt="系统",
        forget_commands=("清空对话",),
        continuous_start_commands=("开始持续对话",),
        continuous_stop_commands=("结束持续对话",),
        continuous_idle_s=30,
    )
    trigger = Trigger(strip_regex="(.*机器人)", mode="keyword", keywords=("机器人",))
    yield (
        Pipeline(
            backend=backend, memory=memory, settings=settings, default_trigger=trigger, clock=clock
        ),
        clock,
    )
    memory.close()
    await backend.aclose()


def said(text: str) -> Utterance:
    return Utterance(text=text, device="kitchen", id=text, source="test")


async def test_untriggered_is_ignored_without_begin(
    pipeline: tuple[Pipeline, Clock], llm: FakeOpenAI
) -> None:
    sink = Recorder()
    answer = await pipeline[0].handle(said("打开灯"), sink)
    assert (answer.outcome, answer.reason) == (Outcome.IGNORED, "not_triggered")
    assert sink.begun == []
    assert sink.chunks == []
    assert llm.request_count == 0


async def test_wake_word_alone_gets_a_prompt(pipeline: tuple[Pipeline, Clock]) -> None:
    sink = Recorder()
    answer = await pipeline[0].handle(said("小爱机器人"), sink)
    assert answer.outcome is Outcome.COMMAND
    assert [c.text for c in sink.chunks] == [WAKE_ONLY_REPLY]
    assert sink.chunks[-1].final


async def test_continuous_conversation_lapses_after_the_idle_timeout(
    pipeline: tuple[Pipeline, Clock], llm: FakeOpenAI
) -> None:
    pipe, clock = pipeline
    sink = Recorder()
    on = await pipe.handle(said("开始持续对话。"), sink)
    assert (on.outcome, on.keep_listening) == (Outcome.COMMAND, True)
    assert sink.chunks[-1].text == CONTINUOUS_ON_REPLY
    clock.now += 20
    asked = await pipe.handle(said("今天几号"), sink)
    assert (asked.outcome, asked.keep_listening) == (Outcome.ANSWERED, True)
    clock.now += 29  # each question restarts the idle timer
    assert (await pipe.handle(said("明天呢"), sink)).outcome is Outcome.ANSWERED
    clock.now += 31
    lapsed = await pipe.handle(said("后天呢"), sink)
    assert (lapsed.outcome, lapsed.keep_listening) == (Outcome.IGNORED, False)
    assert [r.last_user_message for r in llm.requests] == ["今天几号", "明天呢"]


async def test_continuous_conversation_stops_on_command(pipeline: tuple[Pipeline, Clock]) -> None:
    pipe, _ = pipeline
    sink = Recorder()
    await pipe.handle(said("开始持续对话"), sink)
    off = await pipe.handle(said("结束持续对话"), sink)
    assert (off.outcome, off.keep_listening) == (Outcome.COMMAND, False)
    assert sink.chunks[-1].text == CONTINUOUS_OFF_REPLY
    assert not pipe.continuous(SpeakerId("test", "kitchen"))


async def test_disabled_pipeline_ignores_everything(
    pipeline: tuple[Pipeline, Clock], llm: FakeOpenAI
) -> None:
    pipe, _ = pipeline
    pipe.controls.set_answering(False, by="a test")
    answer = await pipe.handle(said("机器人你好"), Recorder())
    assert (answer.outcome, answer.reason) == (Outcome.IGNORED, "disabled")
    assert llm.request_count == 0


async def test_answer_timings_and_memory(pipeline: tuple[Pipeline, Clock], llm: FakeOpenAI) -> None:
    pipe, _ = pipeline
    llm.answer = "Hello there. 你好。"
    answer = await pipe.handle(said("机器人 hi"), Recorder())
    assert answer.text == "Hello there.你好。"  # chunks re-joined without a space before CJK
    assert answer.first_chunk_s is not None
    assert answer.total_s is not None
    assert [m.content for m in await pipe.memory.history(SpeakerId("test", "kitchen"))] == [
        "hi",
        answer.text,
    ]


async def test_first_words_go_out_at_the_first_clause(
    pipeline: tuple[Pipeline, Clock], llm: FakeOpenAI
) -> None:
    pipe, _ = pipeline
    llm.answer = "今天北京的天气很好，适合出门散步。最高气温二十五度，记得多喝水。"
    sink = Recorder()
    answer = await pipe.handle(said("机器人 天气"), sink)
    assert [c.text for c in sink.chunks] == [
        "今天北京的天气很好，",
        "适合出门散步。",
        "最高气温二十五度，记得多喝水。",
    ]
    assert answer.text == llm.answer
    llm.answer = "In Beijing today, it is sunny."
    assert (await pipe.handle(said("机器人 weather"), sink)).text == llm.answer


async def test_first_clause_can_be_turned_off(llm: FakeOpenAI) -> None:
    backend = OpenAICompatBackend(llm_settings(llm))
    memory = ConversationMemory(None, max_turns=5, max_tokens=1000)
    memory.open()
    settings = PipelineSettings(system_prompt="系统", first_clause_chars=0)
    trigger = Trigger(strip_regex="", mode="all", keywords=())
    pipe = Pipeline(backend=backend, memory=memory, settings=settings, default_trigger=trigger)
    llm.answer = "今天北京的天气很好，适合出门散步。"
    sink = Recorder()
    try:
        await pipe.handle(said("天气"), sink)
    finally:
        memory.close()
        await backend.aclose()
    assert [c.text for c in sink.chunks] == [llm.answer]


def test_join_sentences_spaces_only_between_western_text() -> None:
    assert join_sentences(["你好。", "再见。"]) == "你好。再见。"
    assert join_sentences(["Hello.", "Bye."]) == "Hello. Bye."
    assert join_sentences(["Hello.", "你好。"]) == "Hello.你好。"
