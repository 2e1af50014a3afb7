"""The seed's MQTT contract and its richer extensions, driven over a real mosquitto."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.conftest import WAIT_S, Bridge, Probe
from tests.fakes.openai_server import FakeOpenAI
from xiaoai_bridge.config import DEFAULT_SYSTEM_PROMPT, TriggerSettings


async def wait_final(probe: Probe, question_id: object) -> list[dict[str, Any]]:
    """The stream messages of one answer, once its final message arrived."""
    async with asyncio.timeout(WAIT_S):
        while not any(m["final"] for m in probe.chunks(question_id)):
            probe.stream_changed.clear()
            await probe.stream_changed.wait()
    return probe.chunks(question_id)


async def test_seed_round_trip_strips_prefix_and_replies_plain_text(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.answer = "今天北京晴，最高气温二十五度。适合出门散步。"
    await probe.ask("小爱同学机器人今天北京天气怎么样".encode())
    assert await probe.reply_text() == "今天北京晴，最高气温二十五度。适合出门散步。"
    sent = llm.last_request.messages
    assert sent[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert sent[-1] == {"role": "user", "content": "今天北京天气怎么样"}
    assert llm.last_request.stream is True


async def test_json_question_gets_json_reply_with_id_and_device(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.answer = "好的。"
    await probe.ask({"text": "你好", "device": "kitchen", "id": "abc-1"})
    assert await probe.reply_json() == {"id": "abc-1", "device": "kitchen", "text": "好的。"}
    await probe.ask({"text": "再见", "device": "kitchen", "id": 42})
    assert (await probe.reply_json())["id"] == 42


async def test_stream_sentences_in_order_with_final_flag(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.answer = "第一句话在这里。第二句话也来了！第三句话结束了吗？"
    llm.token_delay = 0.01
    await probe.ask({"text": "讲三句话", "id": "s1"})
    chunks = await wait_final(probe, "s1")
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert [c["final"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    spoken = [c["text"] for c in chunks if c["text"]]
    assert spoken == ["第一句话在这里。", "第二句话也来了！", "第三句话结束了吗？"]
    assert all(c["device"] == "default" for c in chunks)
    assert (await probe.reply_json())["text"] == "".join(spoken)


async def test_plain_question_stream_uses_an_assigned_id(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.answer = "一句。两句。"
    await probe.ask("问一个问题")
    await probe.reply()
    ids = {m["id"] for m in probe.stream}
    assert len(ids) == 1
    assigned = ids.pop()
    assert isinstance(assigned, str)
    assert assigned


async def test_first_sentence_is_published_before_the_answer_is_complete(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.answer = "这是第一句话。" + "后面还有很多很多内容。" * 10
    llm.token_delay = 0.02  # ~55 tokens: the whole answer takes over a second
    loop = asyncio.get_running_loop()
    await probe.ask({"text": "长回答", "id": "long"})
    async with asyncio.timeout(WAIT_S):
        while not probe.chunks("long"):
            probe.stream_changed.clear()
            await probe.stream_changed.wait()
    first_at = loop.time()
    await probe.reply()
    done_at = loop.time()
    assert probe.chunks("long")[0]["text"] == "这是第一句话。"
    assert done_at - first_at > 0.5


async def test_quotes_backslashes_newlines_and_unicode_reach_the_llm_intact(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    question = '他说："你好"\\n\n第二行 {"json": true} 😀 \u200b émoji'
    await probe.ask(question.encode())
    await probe.reply()
    assert llm.last_request.messages[-1]["content"] == question.strip()


async def test_markdown_and_emoji_are_cleaned_before_speaking(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.answer = (
        "## 答案\n**北京**是中国的首都😀。\n"
        "```python\nprint('hi')\n```\n"
        "详见 https://example.com 。"
    )
    await probe.ask({"text": "首都", "id": "md"})
    text = (await probe.reply_json())["text"]
    for unwanted in ("#", "*", "`", "print", "http", "😀"):
        assert unwanted not in text
    assert "北京是中国的首都" in text


async def test_keyword_mode_answers_only_triggered_messages(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    await start_bridge(trigger=TriggerSettings(mode="keyword", keywords=("机器人",)))
    llm.answer = "在的。"
    await probe.ask({"text": "打开客厅的灯", "id": "light"})
    await probe.ask({"text": "机器人你好", "id": "hi"})
    reply = await probe.reply_json()
    assert reply["id"] == "hi"
    assert len(llm.requests) == 1
    assert probe.chunks("light") == []


async def test_devices_are_answered_concurrently_and_each_in_order(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.first_token_delay = 0.3
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(10):
        await probe.ask({"text": f"问题{n}", "device": f"d{n}", "id": n})
    replies = [await probe.reply_json() for _ in range(10)]
    elapsed = loop.time() - started
    assert sorted(r["id"] for r in replies) == list(range(10))
    assert elapsed < 2.5  # one by one would take 3 s or more
    # Same device: strictly in order, even though each answer takes a while.
    for n in range(3):
        await probe.ask({"text": f"顺序{n}", "device": "same", "id": f"o{n}"})
    assert [(await probe.reply_json())["id"] for _ in range(3)] == ["o0", "o1", "o2"]
