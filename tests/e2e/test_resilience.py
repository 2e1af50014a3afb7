"""Failures never mean silence or a crash; nothing is lost across restarts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Bridge, Probe, llm_settings, make_settings, open_probe
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI, Fault
from xiaoai_bridge.config import LLMSettings
from xiaoai_bridge.pipeline.pipeline import APOLOGIES, FORGET_REPLY, INTERRUPTED_APOLOGY


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.SERVER_ERROR, "server_error"),
        (Fault.RATE_LIMIT, "rate_limited"),
        (Fault.EMPTY_CHOICES, "empty"),
        (Fault.HANG, "timeout"),
    ],
)
async def test_llm_failure_gets_an_apology_and_the_next_question_an_answer(
    start_bridge: Callable[..., Any],
    probe: Probe,
    llm: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    *,
    fault: Fault,
    reason: str,
) -> None:
    await start_bridge(llm=llm_settings(llm, timeout_s=0.5))
    llm.fail_next(fault, retry_after=0)
    await probe.ask("会失败的问题")
    assert await probe.reply_text() == APOLOGIES[reason]
    assert any(reason in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    llm.answer = "这次好了。"
    await probe.ask("再问一次")
    assert await probe.reply_text() == "这次好了。"


async def test_retries_with_backoff_before_apologising(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    await start_bridge(llm=llm_settings(llm, max_retries=2))
    llm.fail_next(Fault.RATE_LIMIT, times=2, retry_after=0)
    llm.answer = "重试成功。"
    await probe.ask("问题")
    assert await probe.reply_text() == "重试成功。"
    assert llm.request_count == 3


async def test_failure_mid_stream_keeps_what_was_said_and_apologises(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    await start_bridge(llm=llm_settings(llm, timeout_s=0.5))
    llm.answer = "第一句已经说了。第二句还在路上，永远不会到达。"
    llm.fail_next(Fault.HANG_MID_STREAM, after_tokens=6)
    await probe.ask({"text": "问题", "id": "mid"})
    reply = await probe.reply_json()
    assert reply["text"] == "第一句已经说了。" + INTERRUPTED_APOLOGY
    assert [c["text"] for c in probe.chunks("mid")][-1] == INTERRUPTED_APOLOGY


async def test_malformed_stream_gets_an_apology(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.fail_next(Fault.MALFORMED_FRAME, after_tokens=0)
    await probe.ask("问题")
    reply = await probe.reply_text()
    assert reply.startswith("抱歉")
    await probe.ask("问题")
    assert not (await probe.reply_text()).startswith("抱歉")


async def test_no_api_key_gets_a_spoken_explanation(
    start_bridge: Callable[..., Any], probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    await start_bridge(llm=LLMSettings())
    await probe.ask("你好")
    assert await probe.reply_text() == APOLOGIES["not_configured"]
    assert any("OPENAI_API_KEY" in r.getMessage() for r in caplog.records)


async def test_memory_is_sent_and_survives_a_restart(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    bridge = await start_bridge()
    llm.answer = "记住了，你叫小明。"
    await probe.ask("我叫小明")
    await probe.reply()
    await bridge.stop()
    await probe.wait_status("offline")
    await bridge.start(probe)
    llm.answer = "你叫小明。"
    await probe.ask("我叫什么")
    assert await probe.reply_text() == "你叫小明。"
    assert llm.last_request.messages[1:] == [
        {"role": "user", "content": "我叫小明"},
        {"role": "assistant", "content": "记住了，你叫小明。"},
        {"role": "user", "content": "我叫什么"},
    ]


async def test_forget_command_clears_memory_without_calling_the_llm(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    await probe.ask({"text": "第一个问题", "device": "den"})
    await probe.reply()
    await probe.ask({"text": "机器人，清空对话。", "device": "den"})
    assert (await probe.reply_json())["text"] == FORGET_REPLY
    assert llm.request_count == 1
    await probe.ask({"text": "新问题", "device": "den"})
    await probe.reply()
    assert len(llm.last_request.messages) == 2  # system prompt and the question only


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\xff\xfe not utf-8", "bad_input"),
        ("长" * 3000, "too_long"),
        (b'{"text": 5}', "bad_input"),
        (b'{"text": "hi", "device": "bad device name with spaces"}', "bad_input"),
        (b"{not json}", "bad_input"),
    ],
)
async def test_bad_payloads_are_reported_and_never_reach_the_llm(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI, payload: bytes | str, error: str
) -> None:
    await probe.ask(payload)
    reported = await asyncio.wait_for(probe.errors.get(), 10)
    assert reported["error"] == error
    spoken = await probe.reply()
    assert "抱歉".encode() in spoken
    assert llm.request_count == 0
    await probe.ask("正常的问题")
    assert "抱歉".encode() not in await probe.reply()


async def test_empty_and_blank_payloads_are_ignored(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    for payload in (b"", b"   \n\t ", b'{"text": "  "}'):
        await probe.ask(payload)
    llm.answer = "只回答这一个。"
    await probe.ask("真正的问题")
    assert await probe.reply_text() == "只回答这一个。"
    assert llm.request_count == 1


async def test_questions_sent_while_the_bridge_is_down_are_answered_on_return(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    bridge = await start_bridge()
    await bridge.stop()
    await probe.wait_status("offline")
    for n in range(5):
        await probe.ask({"text": f"离线问题{n}", "device": f"d{n}", "id": n})
    await bridge.start()
    replies = [await probe.reply_json() for _ in range(5)]
    assert sorted(r["id"] for r in replies) == list(range(5))


async def test_broker_restart_with_questions_in_flight_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    llm.first_token_delay = 0.5
    async with open_probe(mosquitto, "restart-probe") as probe:
        bridge = Bridge(make_settings(tmp_path, mosquitto, llm))
        await bridge.start(probe)
        for n in range(5):
            await probe.ask({"text": f"问题{n}", "device": f"d{n}", "id": n})
        await llm.wait_for_requests(5)
    # The answers are being written while the broker goes away and comes back.
    await mosquitto.restart()
    async with open_probe(mosquitto, "restart-probe") as probe:
        # QoS 1 is at least once: a reply whose PUBACK the restart cut off comes twice.
        seen: set[int] = set()
        while seen != set(range(5)):
            seen.add((await probe.reply_json(wait_s=20))["id"])
        # ...and the bridge reconnected for good: a new question still gets answered.
        llm.first_token_delay = 0
        await probe.ask({"text": "之后的问题", "id": "after"})
        while (reply := await probe.reply_json(wait_s=20))["id"] != "after":
            assert reply["id"] in seen  # only a late duplicate may come before it
        await bridge.stop()
