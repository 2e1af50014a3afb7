"""A continuous conversation switched by a tool mid-answer: the answer says whether to listen."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC

import pytest

from tests.conftest import llm_settings
from tests.fakes.openai_server import FakeOpenAI, ScriptedCall, ToolRound
from tests.pipeline.test_pipeline import Recorder
from tests.pipeline.test_tool_loop import said
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend
from xiaoai_bridge.models import Outcome, SpeakerId
from xiaoai_bridge.pipeline.memory import ConversationMemory
from xiaoai_bridge.pipeline.pipeline import Pipeline, PipelineSettings
from xiaoai_bridge.pipeline.tool_loop import ToolLoopSettings
from xiaoai_bridge.pipeline.trigger import Trigger
from xiaoai_bridge.tools.builtin import CONTINUOUS_CONVERSATION, BuiltinTools


@pytest.fixture
async def pipeline(llm: FakeOpenAI) -> AsyncIterator[Pipeline]:
    backend = OpenAICompatBackend(llm_settings(llm))
    memory = ConversationMemory(None, max_turns=5, max_tokens=2000)
    memory.open()
    settings = PipelineSettings(
        system_prompt="系统", tools=ToolLoopSettings(filler_after_s=30.0, call_timeout_s=5.0)
    )
    trigger = Trigger(strip_regex="(.*机器人)", mode="keyword", keywords=("机器人",))
    made = Pipeline(backend=backend, memory=memory, settings=settings, default_trigger=trigger)

    def set_continuous(speaker: SpeakerId, on: bool) -> None:
        made.set_continuous(speaker, on=on)

    made.tools.add(BuiltinTools(tz=UTC, set_continuous=set_continuous))
    yield made
    memory.close()
    await backend.aclose()


def switch(on: bool) -> ToolRound:
    arguments = json.dumps({"on": on})
    return ToolRound((ScriptedCall("call_1", CONTINUOUS_CONVERSATION, arguments),))


async def test_the_answer_that_starts_it_keeps_the_speaker_listening(
    pipeline: Pipeline, llm: FakeOpenAI
) -> None:
    llm.script(switch(on=True), "好的，我们接着聊。")
    question = said("机器人我们多聊一会儿")
    answer = await pipeline.handle(question, Recorder())
    assert (answer.outcome, answer.keep_listening) == (Outcome.ANSWERED, True)
    assert pipeline.continuous(question.speaker)


async def test_the_answer_that_stops_it_lets_the_speaker_rest(
    pipeline: Pipeline, llm: FakeOpenAI
) -> None:
    question = said("好了，不聊了，再见")
    pipeline.set_continuous(question.speaker, on=True)
    llm.script(switch(on=False), "好的，再见。")
    answer = await pipeline.handle(question, Recorder())
    assert (answer.outcome, answer.keep_listening) == (Outcome.ANSWERED, False)
    assert not pipeline.continuous(question.speaker)
