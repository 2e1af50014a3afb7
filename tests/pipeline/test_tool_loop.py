"""The tool loop: rounds of model and tools over the real client and the fake OpenAI wire."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import llm_settings
from tests.fakes.openai_server import FakeOpenAI, ScriptedCall, ToolRound
from tests.pipeline.test_pipeline import Recorder
from xiaoai_bridge.llm.base import ToolSpec
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend
from xiaoai_bridge.models import Outcome, Utterance
from xiaoai_bridge.pipeline.memory import ConversationMemory
from xiaoai_bridge.pipeline.pipeline import TOOL_LIMIT_APOLOGY, Pipeline, PipelineSettings
from xiaoai_bridge.pipeline.tool_loop import CANCELLED_REPLY, ToolLoopSettings
from xiaoai_bridge.pipeline.tool_ports import (
    NeedsConfirmation,
    SourceHealth,
    Tool,
    ToolContext,
    ToolError,
    ToolOutput,
)
from xiaoai_bridge.pipeline.trigger import Trigger

Handler = Callable[[Mapping[str, object]], Awaitable[ToolOutput]]


@dataclass
class FunctionTool:
    """A tool whose body is an async function of its arguments."""

    name: str
    handler: Handler
    calls: list[Mapping[str, object]] = field(default_factory=list)
    offered: bool = True

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, f"test tool {self.name}", {"type": "object"})

    def offered_to(self, context: ToolContext) -> bool:
        return self.offered

    async def call(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        self.calls.append(arguments)
        return await self.handler(arguments)


@dataclass
class Shelf:
    """A tool source holding FunctionTools."""

    name: str = "shelf"
    items: list[FunctionTool] = field(default_factory=list)
    # Why it is down (its tools are then absent); "" while up.
    down: str = ""

    def tools(self) -> Sequence[Tool]:
        return [] if self.down else self.items

    def health(self) -> SourceHealth:
        return SourceHealth(False, self.down) if self.down else SourceHealth(True, "on the shelf")

    def add(self, name: str, handler: Handler) -> FunctionTool:
        tool = FunctionTool(name, handler)
        self.items.append(tool)
        return tool


class Lights:
    """A house of lights the tools switch."""

    def __init__(self) -> None:
        self.on = {"客厅灯": True, "卧室灯": True}

    async def turn_off(self, arguments: Mapping[str, object]) -> ToolOutput:
        name = arguments.get("name")
        if name not in self.on:
            raise ToolError(f"no light named {name!r}")
        self.on[str(name)] = False
        return f"{name} is off"


def call(name: str, arguments: object, *, id_: str = "call_1", pieces: int = 1) -> ScriptedCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ScriptedCall(id_, name, text, pieces)


@dataclass
class Rig:
    pipeline: Pipeline
    shelf: Shelf
    memory: ConversationMemory
    llm: FakeOpenAI


def make_rig(
    llm: FakeOpenAI, memory: ConversationMemory, backend: OpenAICompatBackend, **loop: Any
) -> Rig:
    values: dict[str, Any] = {"filler_after_s": 30.0, "call_timeout_s": 5.0}
    settings = PipelineSettings(system_prompt="系统", tools=ToolLoopSettings(**(values | loop)))
    trigger = Trigger(strip_regex="(.*机器人)", mode="keyword", keywords=("机器人",))
    pipeline = Pipeline(backend=backend, memory=memory, settings=settings, default_trigger=trigger)
    shelf = Shelf()
    pipeline.tools.add(shelf)
    return Rig(pipeline, shelf, memory, llm)


@pytest.fixture
async def parts(
    llm: FakeOpenAI,
) -> AsyncIterator[tuple[FakeOpenAI, ConversationMemory, OpenAICompatBackend]]:
    backend = OpenAICompatBackend(llm_settings(llm))
    memory = ConversationMemory(None, max_turns=5, max_tokens=2000)
    memory.open()
    yield llm, memory, backend
    memory.close()
    await backend.aclose()


@pytest.fixture
def rig(parts: tuple[FakeOpenAI, ConversationMemory, OpenAICompatBackend]) -> Rig:
    return make_rig(*parts)


def said(text: str, device: str = "kitchen") -> Utterance:
    return Utterance(text=text, device=device, id=text, source="test")


async def test_a_tool_round_acts_and_the_answer_is_spoken(rig: Rig) -> None:
    lights = Lights()
    tool = rig.shelf.add("turn_off", lights.turn_off)
    rig.llm.script(
        ToolRound((call("turn_off", {"name": "客厅灯"}, pieces=4),)), "好的，客厅灯已经关了。"
    )
    sink = Recorder()
    answer = await rig.pipeline.handle(said("小爱机器人，把客厅灯关了"), sink)

    assert lights.on == {"客厅灯": False, "卧室灯": True}
    assert tool.calls == [{"name": "客厅灯"}]
    assert (answer.outcome, answer.text) == (Outcome.ANSWERED, "好的，客厅灯已经关了。")
    assert [c.text for c in sink.chunks if c.text] == ["好的，客厅灯已经关了。"]
    first, second = rig.llm.requests
    assert [t["function"]["name"] for t in first.tools] == ["turn_off"]
    assert second.tool_messages == [
        {"role": "tool", "tool_call_id": "call_1", "content": "客厅灯 is off"}
    ]
    (record,) = answer.tool_calls
    assert (record.name, record.source, record.outcome) == ("turn_off", "shelf", "ok")
    # Memory keeps the question and the spoken answer, not the tool chatter.
    history = await rig.memory.history(said("x").speaker)
    assert [(m.role, m.content) for m in history] == [
        ("user", "，把客厅灯关了"),
        ("assistant", "好的，客厅灯已经关了。"),
    ]


async def test_calls_of_one_round_run_side_by_side(rig: Rig) -> None:
    both_running = asyncio.Barrier(2)

    async def meet(arguments: Mapping[str, object]) -> ToolOutput:
        # Returns only once the other call is running too: sequential calls would hang.
        async with asyncio.timeout(2):
            await both_running.wait()
        return f"met {arguments['who']}"

    rig.shelf.add("meet", meet)
    rig.llm.script(
        ToolRound(
            (
                call("meet", {"who": "a"}, id_="c_a", pieces=2),
                call("meet", {"who": "b"}, id_="c_b", pieces=2),
            ),
            interleave=True,
        ),
        "都见到了。",
    )
    answer = await rig.pipeline.handle(said("机器人，见两个人"), Recorder())

    assert [r.outcome for r in answer.tool_calls] == ["ok", "ok"]
    assert rig.llm.requests[1].tool_messages == [
        {"role": "tool", "tool_call_id": "c_a", "content": "met a"},
        {"role": "tool", "tool_call_id": "c_b", "content": "met b"},
    ]


async def test_failures_become_results_the_model_reads(
    parts: tuple[FakeOpenAI, ConversationMemory, OpenAICompatBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = make_rig(*parts, call_timeout_s=0.05)
    hang = asyncio.Event()

    async def hangs(arguments: Mapping[str, object]) -> ToolOutput:
        await hang.wait()
        return "never"

    async def breaks(arguments: Mapping[str, object]) -> ToolOutput:
        raise RuntimeError("a bug in someone's server")

    rig.shelf.add("hangs", hangs)
    rig.shelf.add("breaks", breaks)
    rig.shelf.add("refuses", Lights().turn_off)
    rig.llm.script(
        ToolRound(
            (
                call("hangs", {}, id_="c1"),
                call("breaks", {}, id_="c2"),
                call("refuses", {"name": "车库灯"}, id_="c3"),
                call("refuses", '{"name": "客厅', id_="c4"),
                call("nope", {}, id_="c5"),
                call("refuses", "[1, 2]", id_="c6"),
            )
        ),
        "抱歉，都没办成。",
    )
    answer = await rig.pipeline.handle(said("机器人，试试"), Recorder())

    assert answer.outcome is Outcome.ANSWERED
    assert answer.text == "抱歉，都没办成。"
    outcomes = [r.outcome for r in answer.tool_calls]
    assert outcomes == [
        "timeout",
        "error",
        "error",
        "bad_arguments",
        "unknown_tool",
        "bad_arguments",
    ]
    results = {m["tool_call_id"]: m["content"] for m in rig.llm.requests[1].tool_messages}
    assert results["c1"] == "error: the tool did not answer within 0.05 s"
    assert results["c2"] == "error: the tool failed unexpectedly"
    assert results["c3"] == "error: no light named '车库灯'"
    assert results["c4"].startswith("error: the arguments are not valid JSON")
    assert results["c5"] == "error: there is no tool named 'nope'"
    assert results["c6"].startswith("error: the arguments are not a JSON object")
    assert any(r.exc_info and "breaks" in r.getMessage() for r in caplog.records)


async def test_a_model_looping_on_tools_is_stopped_at_the_round_limit(
    parts: tuple[FakeOpenAI, ConversationMemory, OpenAICompatBackend],
) -> None:
    rig = make_rig(*parts, max_rounds=2)

    async def again(arguments: Mapping[str, object]) -> ToolOutput:
        return "try again"

    tool = rig.shelf.add("again", again)
    rig.llm.script(*(ToolRound((call("again", {}, id_=f"c{n}"),)) for n in range(5)))
    sink = Recorder()
    answer = await rig.pipeline.handle(said("机器人，转圈"), sink)

    assert (answer.outcome, answer.reason) == (Outcome.FAILED, "tool_rounds")
    assert [c.text for c in sink.chunks if c.text] == [TOOL_LIMIT_APOLOGY]
    assert sink.chunks[-1].final
    assert len(tool.calls) == 2
    assert rig.llm.request_count == 3


async def test_a_provider_refusing_tools_still_answers_and_is_not_asked_again(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.shelf.add("turn_off", Lights().turn_off)
    rig.llm.reject_tools = True
    first = await rig.pipeline.handle(said("机器人你好"), Recorder())
    second = await rig.pipeline.handle(said("机器人，再见"), Recorder())

    assert first.outcome is second.outcome is Outcome.ANSWERED
    assert first.text == "你问的是：你好。这是第二句话。"
    assert [bool(r.tools) for r in rig.llm.requests] == [True, False, False]
    refusals = [r for r in caplog.records if "refused tools" in r.getMessage()]
    assert len(refusals) == 1


async def test_a_slow_tool_gets_a_filler_which_memory_leaves_out(
    parts: tuple[FakeOpenAI, ConversationMemory, OpenAICompatBackend],
) -> None:
    rig = make_rig(*parts, filler_after_s=0.02, filler="好的，我查一下。")
    spoken = asyncio.Event()
    sink = Recorder()

    async def slow(arguments: Mapping[str, object]) -> ToolOutput:
        # Finishes only once the filler was handed to the speaker.
        async with asyncio.timeout(2):
            while not any(c.text == "好的，我查一下。" for c in sink.chunks):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        spoken.set()
        return "晴，25度"

    rig.shelf.add("weather", slow)
    rig.llm.script(ToolRound((call("weather", {"city": "上海"}),)), "上海今天晴，25度。")
    answer = await rig.pipeline.handle(said("机器人，上海天气"), sink)

    assert spoken.is_set()
    assert [c.text for c in sink.chunks if c.text] == ["好的，我查一下。", "上海今天晴，25度。"]
    assert [c.seq for c in sink.chunks] == list(range(len(sink.chunks)))
    assert (answer.outcome, answer.text) == (Outcome.ANSWERED, "上海今天晴，25度。")
    history = await rig.memory.history(said("x").speaker)
    assert history[-1].content == "上海今天晴，25度。"


async def test_a_quick_tool_needs_no_filler(rig: Rig) -> None:
    async def quick(arguments: Mapping[str, object]) -> ToolOutput:
        return "done"

    rig.shelf.add("quick", quick)
    rig.llm.script(ToolRound((call("quick", {}),), text="我看看。"), "好了。")
    sink = Recorder()
    answer = await rig.pipeline.handle(said("机器人，快点"), sink)

    assert [c.text for c in sink.chunks if c.text] == ["我看看。", "好了。"]
    # Words said before the calls go back to the model with its calls.
    assistant = [m for m in rig.llm.requests[1].messages if m.get("tool_calls")]
    assert assistant[0]["content"] == "我看看。"
    assert answer.text == "我看看。好了。"


class Lock:
    """A front door lock whose opening needs a spoken yes."""

    def __init__(self) -> None:
        self.opened = 0

    async def open(self, arguments: Mapping[str, object]) -> ToolOutput:
        async def really_open() -> str:
            self.opened += 1
            return "前门锁已打开。"

        return NeedsConfirmation("确定要打开前门锁吗？", really_open)


async def test_a_lock_asks_first_and_acts_on_yes(rig: Rig) -> None:
    lock = Lock()
    rig.shelf.add("open_lock", lock.open)
    rig.llm.script(ToolRound((call("open_lock", {}),)))
    sink = Recorder()
    asked = await rig.pipeline.handle(said("小爱机器人，打开前门锁"), sink)

    assert (asked.outcome, asked.reason, asked.keep_listening) == (
        Outcome.ANSWERED,
        "confirm",
        True,
    )
    assert sink.chunks[-1].text == "确定要打开前门锁吗？"
    assert sink.chunks[-1].final
    assert lock.opened == 0
    # The yes needs no wake keyword, and goes to no model.
    done = await rig.pipeline.handle(said("确定。"), sink)

    assert lock.opened == 1
    assert (done.outcome, done.text) == (Outcome.ANSWERED, "前门锁已打开。")
    assert done.tool_calls[0].name == "open_lock"
    assert rig.llm.request_count == 1
    # Said once only: a second yes finds nothing waiting and is not a question.
    again = await rig.pipeline.handle(said("确定"), sink)
    assert again.outcome is Outcome.IGNORED
    assert lock.opened == 1


async def test_a_lock_is_left_alone_on_no_or_on_other_words(rig: Rig) -> None:
    lock = Lock()
    rig.shelf.add("open_lock", lock.open)
    rig.llm.script(ToolRound((call("open_lock", {}),)), ToolRound((call("open_lock", {}),)))
    sink = Recorder()
    await rig.pipeline.handle(said("机器人，开门"), sink)
    cancelled = await rig.pipeline.handle(said("算了"), sink)
    assert (cancelled.outcome, cancelled.text) == (Outcome.COMMAND, CANCELLED_REPLY)

    await rig.pipeline.handle(said("机器人，开门"), sink)
    moved_on = await rig.pipeline.handle(said("机器人今天几号"), sink)
    assert moved_on.text == "你问的是：今天几号。这是第二句话。"
    late_yes = await rig.pipeline.handle(said("确定"), sink)
    assert late_yes.outcome is Outcome.IGNORED
    assert lock.opened == 0


async def test_another_speaker_cannot_confirm(rig: Rig) -> None:
    lock = Lock()
    rig.shelf.add("open_lock", lock.open)
    rig.llm.script(ToolRound((call("open_lock", {}),)))
    await rig.pipeline.handle(said("机器人，开门", device="hall"), Recorder())
    other = await rig.pipeline.handle(said("确定", device="bedroom"), Recorder())
    assert other.outcome is Outcome.IGNORED
    assert lock.opened == 0


async def test_tools_not_offered_to_a_question_are_not_sent(rig: Rig) -> None:
    tool = rig.shelf.add("hidden", Lights().turn_off)
    tool.offered = False
    answer = await rig.pipeline.handle(said("机器人你好"), Recorder())
    assert answer.outcome is Outcome.ANSWERED
    assert rig.llm.requests[0].tools == []


async def test_with_tools_off_the_model_is_offered_none(
    parts: tuple[FakeOpenAI, ConversationMemory, OpenAICompatBackend],
) -> None:
    llm, memory, backend = parts
    settings = PipelineSettings(system_prompt="系统", tools=None)
    trigger = Trigger(strip_regex="(.*机器人)", mode="keyword", keywords=("机器人",))
    pipeline = Pipeline(backend=backend, memory=memory, settings=settings, default_trigger=trigger)
    shelf = Shelf()
    shelf.add("turn_off", Lights().turn_off)
    pipeline.tools.add(shelf)
    await pipeline.handle(said("机器人你好"), Recorder())
    assert llm.requests[0].tools == []


async def test_tool_results_are_cut_for_the_model(rig: Rig) -> None:
    async def chatty(arguments: Mapping[str, object]) -> ToolOutput:
        return "字" * 5000

    rig.shelf.add("chatty", chatty)
    rig.llm.script(ToolRound((call("chatty", {}),)), "好。")
    await rig.pipeline.handle(said("机器人，说吧"), Recorder())
    (message,) = rig.llm.requests[1].tool_messages
    assert 1000 < len(message["content"]) <= 2000
    assert message["content"].endswith("…")
