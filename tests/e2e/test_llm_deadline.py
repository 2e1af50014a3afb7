"""A hung LLM is apologised for within `timeout_s` + 1 s, whatever `max_retries` says."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.conftest import Probe, llm_settings
from tests.fakes.openai_server import FakeOpenAI, Fault
from xiaoai_bridge.pipeline.pipeline import APOLOGIES

TIMEOUT_S = 1.0


async def test_a_hung_provider_gets_an_apology_within_timeout_s(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    await start_bridge(llm=llm_settings(llm, timeout_s=TIMEOUT_S, max_retries=3))
    llm.set_fault(Fault.HANG)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    await probe.ask("会卡住的问题")
    assert await probe.reply_text() == APOLOGIES["timeout"]
    took = loop.time() - asked
    assert took < TIMEOUT_S + 1, f"apology after {took:.2f} s"
    assert llm.request_count == 1  # a timeout spends the whole budget: no retry


async def test_backoff_that_cannot_fit_the_budget_is_not_waited_for(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    await start_bridge(llm=llm_settings(llm, timeout_s=TIMEOUT_S, max_retries=3))
    # Backoff waits about 0.5 s, then 1 s: the second wait would end past the budget.
    llm.fail_next(Fault.SERVER_ERROR, times=2)
    llm.fail_next(Fault.HANG_MID_STREAM, after_tokens=0)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    await probe.ask("会失败的问题")
    assert await probe.reply_text() == APOLOGIES["server_error"]
    took = loop.time() - asked
    assert took < TIMEOUT_S + 1, f"apology after {took:.2f} s"
    assert llm.request_count == 2


async def test_fast_failures_are_still_retried(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    await start_bridge(llm=llm_settings(llm, timeout_s=TIMEOUT_S, max_retries=3))
    llm.fail_next(Fault.SERVER_ERROR)
    llm.fail_next(Fault.RATE_LIMIT, retry_after=0.1)
    llm.answer = "第三次成功。"
    await probe.ask("问题")
    assert await probe.reply_text() == "第三次成功。"
    assert llm.request_count == 3
