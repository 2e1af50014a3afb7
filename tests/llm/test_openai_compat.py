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
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend, retry_delay

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
        (Fault.DEEP_FRAME, "malformed"),
        (Fault.DEEP_ERROR, "server_error"),
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


RETRIES = 3


@pytest.mark.parametrize(
    ("reason", "attempt", "retry_after", "remaining_s", "expected"),
    [
        # A timeout spent the budget for the first words: never retried.
        ("timeout", 0, None, 100.0, None),
        # Fast failures back off exponentially; jitter 1.0 here means the full step.
        ("connection", 0, None, 10.0, 0.5),
        ("server_error", 1, None, 10.0, 1.0),
        ("server_error", 2, None, 10.0, 2.0),
        ("rate_limited", 0, 0.2, 10.0, 0.2),
        # Out of retries.
        ("server_error", RETRIES, None, 10.0, None),
        # A wait that would end past the deadline is not worth starting.
        ("server_error", 1, None, 0.9, None),
        ("rate_limited", 0, 5.0, 3.0, None),
        # A Retry-After past the cap is not waited for, whatever the budget.
        ("rate_limited", 0, 60.0, 100.0, None),
    ],
)
def test_retry_rules(
    reason: str,
    attempt: int,
    retry_after: float | None,
    remaining_s: float,
    expected: float | None,
) -> None:
    delay = retry_delay(
        reason,
        attempt,
        max_retries=RETRIES,
        retry_after=retry_after,
        remaining_s=remaining_s,
        jitter=1.0,
    )
    assert delay == expected


def test_retry_jitter_shortens_the_backoff_by_at_most_a_quarter() -> None:
    delays = [
        retry_delay(
            "connection", 2, max_retries=RETRIES, retry_after=None, remaining_s=10, jitter=j
        )
        for j in (0.0, 0.5, 1.0)
    ]
    assert delays == [1.5, 1.75, 2.0]


async def test_a_hang_is_not_retried(llm: FakeOpenAI) -> None:
    llm.set_fault(Fault.HANG)
    assert await fails_with(llm_settings(llm, timeout_s=0.3, max_retries=3)) == "timeout"
    assert llm.request_count == 1


async def test_headers_without_words_time_out_at_the_deadline(llm: FakeOpenAI) -> None:
    llm.set_fault(Fault.HANG_MID_STREAM, after_tokens=0)
    assert await fails_with(llm_settings(llm, timeout_s=0.3, max_retries=3)) == "timeout"
    assert llm.request_count == 1


async def test_a_retry_after_beyond_the_budget_is_not_waited_for(llm: FakeOpenAI) -> None:
    llm.set_fault(Fault.RATE_LIMIT, retry_after=3)
    assert await fails_with(llm_settings(llm, timeout_s=1, max_retries=3)) == "rate_limited"
    assert llm.request_count == 1
