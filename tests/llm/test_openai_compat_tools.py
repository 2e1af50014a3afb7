"""Tool calling through the OpenAI-compatible backend, against the fake's exact delta shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from tests.conftest import llm_settings
from tests.fakes.openai_server import FakeOpenAI, RawRound, ScriptedCall, ToolRound
from xiaoai_bridge.errors import LLMError
from xiaoai_bridge.llm.base import (
    AssistantToolCalls,
    ChatMessage,
    Message,
    RoundEvent,
    ToolCall,
    ToolCalls,
    ToolChatBackend,
    ToolResult,
    ToolSpec,
)
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend

TURN_OFF = ToolSpec(
    name="turn_off",
    description="Turn a device off",
    parameters={
        "type": "object",
        "properties": {"entity_id": {"type": "string"}},
        "required": ["entity_id"],
    },
)
NOW = ToolSpec("current_time", "The current date and time", {"type": "object", "properties": {}})
QUESTION = [ChatMessage("system", "be brief"), ChatMessage("user", "把客厅灯和风扇关了")]
LIGHT = ScriptedCall("call_abc", "turn_off", '{"entity_id": "light.客厅"}', pieces=5)
FAN = ScriptedCall("call_def", "turn_off", '{"entity_id": "fan.\\"quoted\\""}', pieces=3)


def expected(*calls: ScriptedCall) -> ToolCalls:
    return ToolCalls(tuple(ToolCall(c.id, c.name, c.arguments) for c in calls))


async def events_of(
    llm: FakeOpenAI,
    messages: Sequence[Message] = QUESTION,
    tools: Sequence[ToolSpec] = (TURN_OFF, NOW),
    **settings: Any,
) -> list[RoundEvent]:
    backend: ToolChatBackend = OpenAICompatBackend(llm_settings(llm, **settings))
    try:
        return [event async for event in backend.stream(messages, tools=tools)]
    finally:
        await backend.aclose()


async def reason_of(llm: FakeOpenAI, **settings: Any) -> str:
    with pytest.raises(LLMError) as caught:
        await events_of(llm, **settings)
    return caught.value.reason


@pytest.mark.parametrize(
    ("round_", "calls"),
    [
        (ToolRound((LIGHT,)), (LIGHT,)),
        (ToolRound((LIGHT, FAN)), (LIGHT, FAN)),
        (ToolRound((LIGHT, FAN), interleave=True), (LIGHT, FAN)),
        (ToolRound((LIGHT, FAN), whole=True), (LIGHT, FAN)),
        # Some compatible servers end a tool round with "stop".
        (ToolRound((LIGHT,), finish_reason="stop"), (LIGHT,)),
    ],
    ids=["split_arguments", "parallel", "interleaved", "whole_call_in_one_delta", "stop"],
)
async def test_tool_calls_come_whole_and_last(
    llm: FakeOpenAI, round_: ToolRound, calls: tuple[ScriptedCall, ...]
) -> None:
    llm.script(round_)
    assert await events_of(llm) == [expected(*calls)]


async def test_text_before_the_calls_is_streamed_first(llm: FakeOpenAI) -> None:
    llm.script(ToolRound((LIGHT,), text="好的，我来关灯。"))
    events = await events_of(llm)
    assert events[-1] == expected(LIGHT)
    text = events[:-1]
    assert all(isinstance(e, str) for e in text)
    assert len(text) > 1  # streamed as it came, not held back for the calls
    assert "".join(str(e) for e in text) == "好的，我来关灯。"


async def test_a_text_answer_with_tools_offered_is_only_text(llm: FakeOpenAI) -> None:
    llm.script("不需要工具。")
    assert "".join(str(e) for e in await events_of(llm)) == "不需要工具。"


async def test_the_request_carries_tools_and_the_tool_round_messages(llm: FakeOpenAI) -> None:
    call = ToolCall("call_abc", "turn_off", '{"entity_id": "light.客厅"}')
    messages: list[Message] = [
        *QUESTION,
        AssistantToolCalls((call,)),
        ToolResult("call_abc", "已关闭"),
    ]
    llm.script("客厅灯关好了。")
    assert "".join(str(e) for e in await events_of(llm, messages)) == "客厅灯关好了。"
    assert llm.last_request.body == {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "把客厅灯和风扇关了"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {
                            "name": "turn_off",
                            "arguments": '{"entity_id": "light.客厅"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc", "content": "已关闭"},
        ],
        "stream": True,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "turn_off",
                    "description": "Turn a device off",
                    "parameters": {
                        "type": "object",
                        "properties": {"entity_id": {"type": "string"}},
                        "required": ["entity_id"],
                    },
                },
            },
            {
                "type": "function",
                "function": {
                    "name": "current_time",
                    "description": "The current date and time",
                    "parameters": {"type": "object", "properties": {}},
                },
            },
        ],
        "tool_choice": "auto",
    }


async def test_assistant_text_next_to_its_calls_is_sent_back(llm: FakeOpenAI) -> None:
    call = ToolCall("call_abc", "current_time", "{}")
    messages: list[Message] = [
        *QUESTION,
        AssistantToolCalls((call,), content="我看一下。"),
        ToolResult("call_abc", "2026-11-29 23:00"),
    ]
    await events_of(llm, messages)
    assert llm.last_request.messages[-2]["content"] == "我看一下。"


async def test_no_tools_means_no_tools_in_the_request(llm: FakeOpenAI) -> None:
    backend = OpenAICompatBackend(llm_settings(llm))
    try:
        text = "".join([delta async for delta in backend.stream(QUESTION)])
    finally:
        await backend.aclose()
    assert text
    assert "tools" not in llm.last_request.body
    assert "tool_choice" not in llm.last_request.body


async def test_a_model_refusing_tools_is_a_distinct_reason_and_not_retried(
    llm: FakeOpenAI,
) -> None:
    llm.reject_tools = True
    assert await reason_of(llm, max_retries=3) == "tools_unsupported"
    assert llm.request_count == 1
    # The same question without tools gets its answer.
    assert "".join(str(e) for e in await events_of(llm, tools=())) != ""


@pytest.mark.parametrize(
    "deltas",
    [
        ({"tool_calls": {"index": 0}},),
        ({"tool_calls": ["call"]},),
        ({"tool_calls": [{"id": "call_1", "function": {"name": "turn_off"}}]},),  # no index
        ({"tool_calls": [{"index": "0", "id": "c", "function": {"name": "turn_off"}}]},),
        ({"tool_calls": [{"index": True, "id": "c", "function": {"name": "turn_off"}}]},),
        ({"tool_calls": [{"index": -1, "id": "c", "function": {"name": "turn_off"}}]},),
        ({"tool_calls": [{"index": 0, "id": 7, "function": {"name": "turn_off"}}]},),
        ({"tool_calls": [{"index": 0, "id": "c", "function": "turn_off"}]},),
        ({"tool_calls": [{"index": 0, "id": "c", "function": {"name": ["turn_off"]}}]},),
        # Arguments as an object, not the JSON string the format requires.
        (
            {
                "tool_calls": [
                    {"index": 0, "id": "c", "function": {"name": "t", "arguments": {"a": 1}}}
                ]
            },
        ),
        ({"tool_calls": [{"index": 0, "id": "c", "type": "code", "function": {"name": "t"}}]},),
        # A call that never says what to call.
        ({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},),
        (
            {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "t"}}]},
            {"tool_calls": [{"index": 0, "id": "c2", "function": {"arguments": "{}"}}]},
        ),
    ],
    ids=[
        "tool_calls_not_a_list",
        "fragment_not_an_object",
        "missing_index",
        "index_a_string",
        "index_a_bool",
        "negative_index",
        "id_not_a_string",
        "function_not_an_object",
        "name_not_a_string",
        "arguments_an_object",
        "unknown_type",
        "no_id_or_name",
        "id_changes_mid_call",
    ],
)
async def test_malformed_tool_deltas_are_a_clean_error(
    llm: FakeOpenAI, deltas: tuple[Any, ...]
) -> None:
    llm.script(RawRound(deltas))
    assert await reason_of(llm) == "malformed"


async def test_a_repeated_id_and_name_are_accepted(llm: FakeOpenAI) -> None:
    same = {"index": 0, "id": "c1", "type": "function"}
    llm.script(
        RawRound(
            (
                {"tool_calls": [{**same, "function": {"name": "t", "arguments": "{"}}]},
                {"tool_calls": [{**same, "function": {"name": "t", "arguments": "}"}}]},
            )
        )
    )
    assert await events_of(llm) == [ToolCalls((ToolCall("c1", "t", "{}"),))]


async def test_a_round_with_neither_text_nor_calls_is_empty(llm: FakeOpenAI) -> None:
    llm.script(RawRound(({"tool_calls": []},), finish_reason="tool_calls"))
    assert await reason_of(llm) == "empty"


async def test_a_400_about_our_tool_messages_is_not_tools_unsupported(llm: FakeOpenAI) -> None:
    # Its message names tools, but it blames a message: asking again without tools won't help.
    messages: list[Message] = [*QUESTION, ToolResult("call_nowhere", "ok")]
    with pytest.raises(LLMError) as caught:
        await events_of(llm, messages)
    assert caught.value.reason == "bad_request"
    assert "tool" in caught.value.detail
