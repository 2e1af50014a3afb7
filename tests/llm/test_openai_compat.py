"""The OpenAI-compatible backend against a server speaking OpenAI's wire format."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import SecretStr

from tests.conftest import API_KEY, llm_settings
from tests.fakes.openai_server import FakeOpenAI, Fault
from xiaoai_bridge.config import LLMSettings
from xiaoai_bridge.errors import LLMError
from xiaoai_bridge.llm.base import ChatMessage
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend

QUESTION = [ChatMessage("system", "be brief"), ChatMessage("user", '引号"和\n换行\\')]


async def collect(settings: LLMSettings) -> str:
    backend = OpenAICompatBackend(settings)
    try:
        return "".join([delta async for delta in backend.stream(QUESTION)])
    finally:
        await backend.aclose()


async def fails_with(settings: LLMSettings) -> str:
    with pytest.raises(LLMError) as caught:
        await collect(settings)
    return caught.value.reason


async def test_streams_the_answer_and_sends_the_openai_request(llm: FakeOpenAI) -> None:
    llm.answer = "第一句。第二句。"
    assert await collect(llm_settings(llm, temperature=0.3, max_tokens=50)) == "第一句。第二句。"
    request = llm.last_request
    assert request.path == "/v1/chat/completions"
    assert request.body == {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": '引号"和\n换行\\'},
        ],
        "stream": True,
        "temperature": 0.3,
        "max_tokens": 50,
    }
    assert request.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.SERVER_ERROR, "server_error"),
        (Fault.RATE_LIMIT, "rate_limited"),
        (Fault.EMPTY_CHOICES, "empty"),
        (Fault.MALFORMED_FRAME, "malformed"),
        (Fault.DROP_MID_STREAM, "connection"),
        (Fault.HANG, "timeout"),
        (Fault.HANG_MID_STREAM, "timeout"),
    ],
)
async def test_faults_become_short_reasons(llm: FakeOpenAI, fault: Fault, reason: str) -> None:
    llm.set_fault(fault, retry_after=0)
    assert await fails_with(llm_settings(llm, timeout_s=0.3)) == reason


async def test_wrong_key_is_an_auth_error_and_not_retried(llm: FakeOpenAI) -> None:
    settings = llm_settings(llm, api_key=SecretStr("sk-wrong"), max_retries=3)
    assert await fails_with(settings) == "auth"
    assert len(llm.all_requests) == 1


async def test_retries_honour_retry_after_then_succeed(llm: FakeOpenAI) -> None:
    llm.fail_next(Fault.RATE_LIMIT, times=2, retry_after=0.05)
    llm.answer = "好了。"
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await collect(llm_settings(llm, max_retries=2)) == "好了。"
    assert loop.time() - started >= 0.1
    assert llm.request_count == 3


async def test_retries_are_bounded(llm: FakeOpenAI) -> None:
    llm.set_fault(Fault.SERVER_ERROR)
    assert await fails_with(llm_settings(llm, max_retries=1)) == "server_error"
    assert llm.request_count == 2


async def test_connection_refused_is_a_connection_error() -> None:
    settings = LLMSettings(
        base_url="http://127.0.0.1:9/v1", api_key=SecretStr(API_KEY), max_retries=0, timeout_s=2
    )
    assert await fails_with(settings) == "connection"


async def test_hosted_openai_without_key_is_not_configured() -> None:
    backend = OpenAICompatBackend(LLMSettings())
    assert not backend.configured
    with pytest.raises(LLMError) as caught:
        async for _ in backend.stream(QUESTION):
            pass
    assert caught.value.reason == "not_configured"


async def test_local_server_gets_no_authorization_header_without_a_key(llm: FakeOpenAI) -> None:
    settings = llm_settings(llm, api_key=None)
    assert OpenAICompatBackend(settings).configured  # Ollama, vLLM: no key needed
    assert await fails_with(settings) == "auth"  # this fake insists on one
    assert "authorization" not in llm.last_request.headers


async def test_check_reports_model_availability(llm: FakeOpenAI) -> None:
    checks: list[Any] = []
    for model in ("fake-model", "missing-model"):
        backend = OpenAICompatBackend(llm_settings(llm, model=model))
        try:
            checks.append(await backend.check())
        except LLMError as err:
            checks.append(err)
        finally:
            await backend.aclose()
    assert "fake-model available" in checks[0]
    assert isinstance(checks[1], LLMError)
    assert checks[1].reason == "unknown_model"
    assert "fake-model" in checks[1].detail
