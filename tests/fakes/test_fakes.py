"""The fakes behave like the real services: driven by the real openai SDK and aiomqtt."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiomqtt
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from tests.fakes.mosquitto import HOST, Mosquitto, MosquittoError
from tests.fakes.openai_server import (
    CHAT_PATH,
    DEFAULT_API_KEY,
    TOOL_GAPS_PATH,
    TOOLS_UNSUPPORTED_MESSAGE,
    FakeOpenAI,
    Fault,
    ScriptedCall,
    ToolRound,
    default_answer,
    split_evenly,
    split_tokens,
)

API_KEY = DEFAULT_API_KEY
MODEL = "fake-model"
REPO_ROOT = Path(__file__).resolve().parents[2]
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "今天天气怎么样"}]


@pytest.fixture
async def llm() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=API_KEY, model=MODEL) as fake:
        yield fake


@pytest.fixture
async def client(llm: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=llm.base_url, api_key=API_KEY, max_retries=0, timeout=5.0
    ) as sdk:
        yield sdk


async def _collect_stream(
    client: AsyncOpenAI, messages: list[ChatCompletionMessageParam]
) -> tuple[list[str], BaseException | None]:
    """Content deltas received before the stream ended, and what ended it (None: [DONE])."""
    contents: list[str] = []
    try:
        stream = await client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                contents.append(chunk.choices[0].delta.content)
    except (openai.OpenAIError, ValueError) as err:
        return contents, err
    return contents, None


# -- split_tokens ----------------------------------------------------------------------------


def test_split_tokens_defaults_to_two_characters() -> None:
    assert split_tokens("你问的是天气") == ["你问", "的是", "天气"]
    assert split_tokens("abcde") == ["ab", "cd", "e"]


def test_split_tokens_exact_count_keeps_text_order() -> None:
    pieces = split_tokens("abcdefghij", tokens=3)
    assert pieces == ["abcd", "efg", "hij"]


def test_split_tokens_exact_count_repeats_short_text() -> None:
    pieces = split_tokens("你好。", tokens=60)
    assert len(pieces) == 60
    assert all(pieces)
    assert "".join(pieces) == "你好。" * 20


# -- OpenAI fake through the SDK -------------------------------------------------------------


async def test_non_streaming_completion(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=QUESTION)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "你问的是：今天天气怎么样。这是第二句话。"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(llm.last_request.tokens)
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_stream_deltas_reassemble_answer(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
    chunks = [chunk async for chunk in stream]

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert all(c.choices[0].finish_reason is None for c in middle)
    assert last.choices[0].finish_reason == "stop"
    assert last.choices[0].delta.content is None
    contents = [c.choices[0].delta.content or "" for c in middle]
    assert "".join(contents) == default_answer([{"role": "user", "content": "今天天气怎么样"}])
    assert contents == llm.last_request.tokens
    assert all(len(token) <= 2 for token in contents)


async def test_stream_with_exact_token_count(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    llm.tokens = 60

    contents, ended_by = await _collect_stream(client, QUESTION)

    assert ended_by is None
    assert len(contents) == 60
    assert "".join(contents) == llm.last_request.answer


async def test_stream_include_usage_sends_final_usage_chunk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_fixed_and_callable_answers(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    llm.answer = "固定回答。"
    fixed = await client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert fixed.choices[0].message.content == "固定回答。"

    llm.answer = lambda messages: f"{len(messages)} messages"
    history: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    computed = await client.chat.completions.create(model=MODEL, messages=history)
    assert computed.choices[0].message.content == "4 messages"


async def test_models_list(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    page = await client.models.list()

    assert [model.id for model in page.data] == [MODEL]
    assert page.data[0].object == "model"
    assert page.data[0].owned_by
    assert llm.requests == []


async def test_requests_are_recorded_verbatim(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "你是小爱同学，回答要简短。"},
        {"role": "user", "content": 'He said "hi"\nthen left \\ 😀'},
        {"role": "assistant", "content": "好的。"},
        {"role": "user", "content": "再说一遍"},
    ]

    await client.chat.completions.create(model=MODEL, messages=messages, temperature=0.5)

    record = llm.last_request
    assert record.method == "POST"
    assert record.path == CHAT_PATH
    assert record.messages == messages
    assert record.body["temperature"] == 0.5
    assert record.model == MODEL
    assert record.stream is False
    assert record.last_user_message == "再说一遍"
    assert record.headers["authorization"] == "Bearer <redacted>"
    assert API_KEY not in json.dumps(record.headers)
    assert record.headers["content-type"].startswith("application/json")
    assert record.auth_ok
    assert record.status == 200
    assert record.received_at <= time.monotonic()


async def test_wait_for_requests(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    task = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=QUESTION))
    async with asyncio.timeout(5):
        records = await llm.wait_for_requests(1)
        await task
    assert records[0].last_user_message == "今天天气怎么样"


async def test_wrong_api_key_is_401(llm: FakeOpenAI) -> None:
    async with AsyncOpenAI(base_url=llm.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model=MODEL, messages=QUESTION)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"
    assert not llm.last_request.auth_ok
    assert llm.last_request.status == 401


async def test_missing_api_key_is_401_with_openai_error_shape(llm: FakeOpenAI) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(llm.base_url + "/chat/completions", json={}) as response,
    ):
        assert response.status == 401
        body = await response.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["param"] is None
    assert body["error"]["message"]


async def test_unknown_path_is_openai_404(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.get("/engines", cast_to=ChatCompletion)
    assert caught.value.type == "invalid_request_error"
    assert "Invalid URL (GET /v1/engines)" in caught.value.message


async def test_missing_messages_is_400(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.post("/chat/completions", body={"model": MODEL}, cast_to=ChatCompletion)
    assert caught.value.code == "missing_required_parameter"
    assert caught.value.param == "messages"


@pytest.mark.parametrize(
    ("fault", "error", "code"),
    [
        (Fault.SERVER_ERROR, openai.InternalServerError, None),
        (Fault.RATE_LIMIT, openai.RateLimitError, "rate_limit_exceeded"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_status_faults_map_to_sdk_errors(
    llm: FakeOpenAI,
    client: AsyncOpenAI,
    *,
    fault: Fault,
    error: type[openai.APIStatusError],
    code: str | None,
    stream: bool,
) -> None:
    llm.fail_next(fault, retry_after=7)

    with pytest.raises(error) as caught:
        await client.chat.completions.create(model=MODEL, messages=QUESTION, stream=stream)

    assert caught.value.code == code
    if fault is Fault.RATE_LIMIT:
        assert caught.value.response.headers["retry-after"] == "7"
    assert llm.fault_counts[fault] == 1
    assert llm.last_request.fault is fault
    assert llm.pending_faults == 0


async def test_sdk_retries_honour_retry_after(llm: FakeOpenAI) -> None:
    # The SDK's own backoff is at least 0.375 s, so short gaps prove Retry-After was used.
    llm.fail_next(Fault.RATE_LIMIT, times=2, retry_after=0.05)
    async with AsyncOpenAI(base_url=llm.base_url, api_key=API_KEY, max_retries=2) as sdk:
        completion = await sdk.chat.completions.create(model=MODEL, messages=QUESTION)

    assert completion.choices[0].message.content
    first, second, third = llm.requests
    assert [r.status for r in (first, second, third)] == [429, 429, 200]
    for before, after in ((first, second), (second, third)):
        assert 0.05 <= after.received_at - before.received_at < 0.3
    assert llm.fault_counts[Fault.RATE_LIMIT] == 2


async def test_persistent_fault_until_cleared(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    llm.set_fault(Fault.SERVER_ERROR)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=QUESTION)
    llm.fail_next(Fault.RATE_LIMIT)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model=MODEL, messages=QUESTION)

    llm.set_fault(None)
    await client.chat.completions.create(model=MODEL, messages=QUESTION)

    assert llm.fault_counts == {Fault.SERVER_ERROR: 2, Fault.RATE_LIMIT: 1}
    assert [r.fault for r in llm.requests] == [
        Fault.SERVER_ERROR,
        Fault.SERVER_ERROR,
        Fault.RATE_LIMIT,
        None,
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_hang_times_out_client(llm: FakeOpenAI, client: AsyncOpenAI, stream: bool) -> None:
    llm.fail_next(Fault.HANG)

    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.1).chat.completions.create(
            model=MODEL, messages=QUESTION, stream=stream
        )
    assert llm.fault_counts[Fault.HANG] == 1


async def test_close_releases_hanging_requests() -> None:
    fake = FakeOpenAI(api_key=API_KEY)
    await fake.start()
    try:
        fake.set_fault(Fault.HANG)
        async with AsyncOpenAI(base_url=fake.base_url, api_key=API_KEY, max_retries=0) as sdk:
            task = asyncio.create_task(sdk.chat.completions.create(model=MODEL, messages=QUESTION))
            async with asyncio.timeout(5):
                await fake.wait_for_requests(1)
            started = time.monotonic()
            await fake.close()
            assert time.monotonic() - started < 0.5
            with pytest.raises(openai.APIConnectionError):
                await task
    finally:
        await fake.close()


async def test_hang_mid_stream_stalls_after_some_tokens(
    llm: FakeOpenAI, client: AsyncOpenAI
) -> None:
    llm.fail_next(Fault.HANG_MID_STREAM, after_tokens=3)

    contents, ended_by = await _collect_stream(client.with_options(timeout=0.1), QUESTION)

    assert isinstance(ended_by, openai.APITimeoutError)
    assert contents == llm.last_request.tokens[:3]


async def test_drop_mid_stream_is_connection_error(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    llm.fail_next(Fault.DROP_MID_STREAM)

    contents, ended_by = await _collect_stream(client, QUESTION)

    assert type(ended_by) is openai.APIConnectionError
    assert contents == llm.last_request.tokens[:2]


async def test_drop_without_stream_is_connection_error(
    llm: FakeOpenAI, client: AsyncOpenAI
) -> None:
    llm.fail_next(Fault.DROP_MID_STREAM)

    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model=MODEL, messages=QUESTION)


async def test_malformed_stream_frame(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    llm.fail_next(Fault.MALFORMED_FRAME, after_tokens=1)

    contents, ended_by = await _collect_stream(client, QUESTION)

    assert isinstance(ended_by, json.JSONDecodeError)
    assert contents == llm.last_request.tokens[:1]


async def test_malformed_non_stream_body(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    llm.fail_next(Fault.MALFORMED_FRAME)

    with pytest.raises(json.JSONDecodeError):
        await client.chat.completions.create(model=MODEL, messages=QUESTION)


async def test_empty_choices(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    llm.fail_next(Fault.EMPTY_CHOICES, times=2)

    completion = await client.chat.completions.create(model=MODEL, messages=QUESTION)
    stream = await client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
    chunks = [chunk async for chunk in stream]

    assert completion.choices == []
    assert chunks
    assert all(chunk.choices == [] for chunk in chunks)


# -- OpenAI fake on the wire -----------------------------------------------------------------


async def test_sse_framing_bytes(llm: FakeOpenAI) -> None:
    llm.tokens = 4
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": QUESTION, "stream": True}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(llm.base_url + "/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.read()

    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""
    frames = frames[:-1]
    assert all(frame.startswith(b"data: ") and b"\n" not in frame for frame in frames)
    payloads = [json.loads(frame[len(b"data: ") :]) for frame in frames[:-1]]
    assert len(payloads) == 1 + 4 + 1
    assert payloads[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }
    assert [p["choices"][0]["delta"]["content"] for p in payloads[1:-1]] == llm.last_request.tokens
    assert payloads[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


async def test_stream_frames_are_flushed_as_produced(llm: FakeOpenAI) -> None:
    llm.tokens = 3
    llm.token_delay = 0.04
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": QUESTION, "stream": True}
    arrivals: list[float] = []
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(llm.base_url + "/chat/completions", json=body) as response,
    ):
        while frame := await response.content.readuntil(b"\n\n"):
            arrivals.append(time.monotonic())
            if frame == b"data: [DONE]\n\n":
                break

    assert len(arrivals) == 1 + 3 + 1 + 1
    # Tokens 2 and 3 each wait token_delay, so buffered output would arrive all at once.
    assert arrivals[-1] - arrivals[0] >= 0.07


# -- tool calls ------------------------------------------------------------------------------

TOOLS: list[ChatCompletionToolParam] = [
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
    }
]
CALLS = (
    ScriptedCall("call_abc", "turn_off", '{"entity_id": "light.living_room"}', pieces=3),
    ScriptedCall("call_def", "turn_off", '{"entity_id": "switch.客厅风扇"}', pieces=4),
)


def test_split_evenly_keeps_every_character() -> None:
    assert split_evenly("abcdefg", 3) == ["abc", "de", "fg"]
    assert split_evenly("ab", 5) == ["a", "b"]
    assert split_evenly("", 3) == [""]


@pytest.mark.parametrize(
    "round_",
    [
        ToolRound(CALLS),
        ToolRound(CALLS, interleave=True),
        ToolRound(CALLS, whole=True),
        ToolRound(CALLS[:1], text="好的，我查一下。"),
    ],
    ids=["split", "interleaved", "whole", "text_first"],
)
async def test_sdk_accumulates_the_streamed_tool_calls(
    llm: FakeOpenAI, client: AsyncOpenAI, round_: ToolRound
) -> None:
    llm.script(round_, round_)
    # The SDK's own stream helper joins the deltas with ChatCompletionStreamState.
    async with client.chat.completions.stream(
        model=MODEL, messages=QUESTION, tools=TOOLS
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert (choice.message.content or "") == round_.text
    calls = choice.message.tool_calls or []
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
        (c.id, "function", c.name, c.arguments) for c in round_.calls
    ]
    assert llm.last_request.tools == TOOLS

    # The raw chunks: id, type and name only on a call's first delta, arguments in pieces.
    raw = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, stream=True
    )
    chunks: list[ChatCompletionChunk] = [chunk async for chunk in raw]
    assert chunks[0].choices[0].delta.role == "assistant"
    fragments = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    firsts = {t.index for t in fragments if t.id is not None}
    assert firsts == set(range(len(round_.calls)))
    for call_index, call in enumerate(round_.calls):
        own = [t for t in fragments if t.index == call_index]
        assert own[0].id == call.id
        assert own[0].function is not None
        assert own[0].function.name == call.name
        assert all(t.id is None and t.type is None for t in own[1:])
        assert all(t.function is not None and t.function.name is None for t in own[1:])
        expected = 1 if round_.whole else 1 + min(call.pieces, len(call.arguments))
        assert len(own) == expected
    if round_.interleave:
        assert [t.index for t in fragments[:4]] == [0, 1, 0, 1]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_results_are_recorded_and_the_next_round_is_text(
    llm: FakeOpenAI, client: AsyncOpenAI
) -> None:
    llm.script(ToolRound(CALLS[:1]), "灯关好了。")
    first = await client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    follow_up: list[ChatCompletionMessageParam] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "turn_off", "arguments": CALLS[0].arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "ok"},
    ]
    contents, ended_by = await _collect_stream(client, follow_up)
    assert ended_by is None
    assert "".join(contents) == "灯关好了。"
    assert llm.last_request.tool_messages == [
        {"role": "tool", "tool_call_id": "call_abc", "content": "ok"}
    ]
    assert llm.last_request.messages[1]["tool_calls"][0]["id"] == "call_abc"


async def test_a_model_without_tools_answers_400_naming_tools(
    llm: FakeOpenAI, client: AsyncOpenAI
) -> None:
    llm.reject_tools = True
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
    assert caught.value.status_code == 400
    assert caught.value.param == "tools"
    assert caught.value.code == "unsupported_parameter"
    assert TOOLS_UNSUPPORTED_MESSAGE in caught.value.message
    contents, ended_by = await _collect_stream(client, QUESTION)  # without tools: fine
    assert ended_by is None
    assert contents


async def test_first_token_delay(llm: FakeOpenAI, client: AsyncOpenAI) -> None:
    llm.first_token_delay = 0.05
    started = time.monotonic()
    await client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert time.monotonic() - started >= 0.05


async def test_runs_as_a_process() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.openai_server",
        "--port",
        "0",
        "--tokens",
        "60",
        "--api-key",
        "proc-key",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("READY http://127.0.0.1:")
        base_url = line.split()[1]
        assert base_url.endswith("/v1")
        async with AsyncOpenAI(base_url=base_url, api_key="proc-key", max_retries=0) as sdk:
            stream = await sdk.chat.completions.create(model=MODEL, messages=QUESTION, stream=True)
            contents = [c.choices[0].delta.content async for c in stream if c.choices]
        assert len([c for c in contents if c]) == 60
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await proc.communicate()
    assert proc.returncode == 0


# -- mosquitto -------------------------------------------------------------------------------


async def test_mosquitto_publish_subscribe_round_trip() -> None:
    async with Mosquitto() as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        async with (
            aiomqtt.Client(broker.host, broker.port) as subscriber,
            aiomqtt.Client(broker.host, broker.port) as publisher,
        ):
            await subscriber.subscribe("xiaoai/test", qos=1)
            await publisher.publish("xiaoai/test", "你好".encode(), qos=1)
            async with asyncio.timeout(5):
                message = await anext(subscriber.messages)
        assert message.topic.matches("xiaoai/test")
        assert message.payload == "你好".encode()
    assert not broker.running


async def test_mosquitto_keeps_queued_qos1_messages_across_restart() -> None:
    async with Mosquitto() as broker:
        port = broker.port
        async with aiomqtt.Client(
            HOST, port, identifier="fakes-offline-sub", clean_session=False
        ) as subscriber:
            await subscriber.subscribe("xiaoai/queued", qos=1)
        async with aiomqtt.Client(HOST, port) as publisher:
            await publisher.publish("xiaoai/queued", b"while you were away", qos=1)

        await broker.restart()

        assert broker.port == port
        async with aiomqtt.Client(
            HOST, port, identifier="fakes-offline-sub", clean_session=False
        ) as subscriber:
            async with asyncio.timeout(5):
                message = await anext(subscriber.messages)
        assert message.payload == b"while you were away"
        assert message.qos == 1


async def test_mosquitto_stop_and_start_keep_port() -> None:
    async with Mosquitto() as broker:
        port = broker.port
        await broker.stop()
        assert not broker.running
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(HOST, port, timeout=1):
                pass
        await broker.start()
        assert broker.port == port
        async with aiomqtt.Client(HOST, port):
            pass


async def test_mosquitto_password_auth() -> None:
    async with Mosquitto(username="bridge", password="s3cret") as broker:
        async with aiomqtt.Client(HOST, broker.port, username="bridge", password="s3cret"):
            pass
        with pytest.raises(aiomqtt.MqttCodeError):
            async with aiomqtt.Client(HOST, broker.port, username="bridge", password="wrong"):
                pass
        with pytest.raises(aiomqtt.MqttCodeError):
            async with aiomqtt.Client(HOST, broker.port):
                pass


async def test_mosquitto_reports_busy_port_with_its_log() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((HOST, 0))
        holder.listen()
        broker = Mosquitto(port=holder.getsockname()[1])
        with pytest.raises(MosquittoError, match="Address already in use"):
            async with broker:
                pass


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        # A tool result with no call before it.
        (
            [*QUESTION, {"role": "tool", "tool_call_id": "call_abc", "content": "ok"}],
            "messages.[1].role",
            "must be a response to a preceeding message with 'tool_calls'",
        ),
        # A call left unanswered.
        (
            [
                *QUESTION,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_abc",
                            "type": "function",
                            "function": {"name": "turn_off", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "user", "content": "还有吗"},
            ],
            "messages.[1].role",
            "did not have response messages: call_abc",
        ),
    ],
    ids=["orphan_result", "unanswered_call"],
)
async def test_tool_messages_that_do_not_answer_their_calls_are_400(
    client: AsyncOpenAI, messages: list[ChatCompletionMessageParam], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=messages)
    assert caught.value.param == param
    assert words in caught.value.message


async def test_benchmark_mode_calls_the_named_tool_and_times_the_round(
    llm: FakeOpenAI, client: AsyncOpenAI
) -> None:
    llm.call_tool = "turn_off"
    without = await client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert without.choices[0].finish_reason == "stop"  # no tools offered: a plain answer
    first = await client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
    calls = [
        c
        for c in first.choices[0].message.tool_calls or []
        if isinstance(c, ChatCompletionMessageFunctionToolCall)
    ]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("turn_off", "{}")]
    follow_up: list[ChatCompletionMessageParam] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0].id,
                    "type": "function",
                    "function": {"name": "turn_off", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0].id, "content": "ok"},
    ]
    answer = await client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS)
    assert answer.choices[0].finish_reason == "stop"
    async with aiohttp.ClientSession() as session:
        url = llm.base_url.removesuffix("/v1") + TOOL_GAPS_PATH
        async with session.get(url) as response:
            gaps = await response.json()
    assert len(gaps) == 1
    assert gaps[0] >= 0
