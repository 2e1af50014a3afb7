"""Benchmark tool rounds: the bridge's own time per round, and when the filler is heard.

Run alone with `.venv/bin/python -m benchmarks.tools`; `benchmarks.run` includes it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiomqtt
from tests.fakes.mosquitto import Mosquitto, free_port
from tests.fakes.openai_server import TOOL_GAPS_PATH

from benchmarks.run import (
    BROKER_CONFIG,
    NODELAY,
    QUESTION_TOPIC,
    REPLY_TOPIC,
    Row,
    bridge,
    fake_llm,
    pct,
)
from xiaoai_bridge.pipeline.tool_loop import DEFAULT_FILLER

# A built-in tool that does next to nothing, so a round's gap is the bridge's own time.
TOOL = "get_current_time"
TOOLS_CONFIG = '[tools]\nbuiltin = true\ntimezone = "Asia/Shanghai"\n'
# The second round's model takes this long: the filler must come first, at ~1 s.
SLOW_AFTER_TOOLS_MS = 2500
FILLER_TARGET_S = 1.2


@dataclass
class Chunks:
    """Stream chunks and replies by question id, with when they arrived."""

    first: dict[str, tuple[float, str]] = field(default_factory=dict)
    replied: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            now = time.perf_counter()
            assert isinstance(message.payload, bytes)
            data = json.loads(message.payload)
            qid = str(data["id"])
            if message.topic.matches(f"{REPLY_TOPIC}/stream"):
                self.first.setdefault(qid, (now, str(data.get("text", ""))))
            else:
                self.replied[qid] = now
                self.changed.set()

    async def wait(self, qid: str, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while qid not in self.replied:
                self.changed.clear()
                await self.changed.wait()


async def ask_all(
    broker: Mosquitto, prefix: str, count: int, timeout_s: float
) -> tuple[dict[str, float], Chunks]:
    """Ask `count` questions one after the other; their send times and what came back."""
    sent: dict[str, float] = {}
    async with aiomqtt.Client(broker.host, broker.port, socket_options=NODELAY) as client:
        await client.subscribe(REPLY_TOPIC, qos=1)
        await client.subscribe(f"{REPLY_TOPIC}/stream", qos=1)
        chunks = Chunks()
        task = asyncio.create_task(chunks.run(client))
        try:
            for n in range(count):
                qid = f"{prefix}{n}"
                payload = json.dumps(
                    {"text": f"现在几点 {qid}", "device": "tools", "id": qid}, ensure_ascii=False
                )
                sent[qid] = time.perf_counter()
                await client.publish(QUESTION_TOPIC, payload, qos=1)
                await chunks.wait(qid, timeout_s)
        finally:
            task.cancel()
    return sent, chunks


async def tool_gaps(llm_url: str) -> list[float]:
    """The fake LLM's measured gaps, in seconds."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(llm_url.removesuffix("/v1") + TOOL_GAPS_PATH) as response,
    ):
        gaps: list[float] = await response.json()
        return gaps


async def bench_tool_round(broker: Mosquitto, work: Path, count: int) -> list[Row]:
    """End of a tool round's response -> its results' request arriving, at the fake LLM."""
    async with (
        fake_llm(0, 0, 8, call_tool=TOOL) as url,
        bridge(broker, url, work, extra=TOOLS_CONFIG),
    ):
        await ask_all(broker, "warm", 20, 10)
        warm = len(await tool_gaps(url))
        await ask_all(broker, "t", count, 10)
        gaps = [gap * 1000 for gap in (await tool_gaps(url))[warm:]]
    if len(gaps) != count:
        return [Row("tool round", f"{len(gaps)} of {count} rounds seen", "all", ok=False)]
    p50, p95 = pct(gaps, 50), pct(gaps, 95)
    return [
        Row(
            f"bridge time per tool round, {count} questions with one built-in tool call "
            "(fake LLM's end of the calls -> the results' request, loopback HTTP included)",
            f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(gaps):.1f} ms",
            "p95 < 20 ms",
            p95 < 20,
        )
    ]


async def bench_filler(broker: Mosquitto, work: Path, count: int) -> list[Row]:
    """A tool round whose next model answer is slow: when is the filler heard?"""
    async with (
        fake_llm(0, 0, 8, call_tool=TOOL, after_tools_ms=SLOW_AFTER_TOOLS_MS) as url,
        bridge(broker, url, work, extra=TOOLS_CONFIG),
    ):
        sent, chunks = await ask_all(broker, "f", count, 15)
    delays = [chunks.first[qid][0] - at for qid, at in sent.items()]
    texts = {chunks.first[qid][1] for qid in sent}
    worst = max(delays)
    return [
        Row(
            f"filler with one tool round, the model's next answer {SLOW_AFTER_TOOLS_MS} ms late, "
            f"{count} questions (publish -> the filler's stream message)",
            f"p50 {pct(delays, 50):.2f} s, max {worst:.2f} s; first words {sorted(texts)}",
            f"<= {FILLER_TARGET_S} s, the filler",
            worst <= FILLER_TARGET_S and texts == {DEFAULT_FILLER},
        )
    ]


async def run_tools(work: Path, rounds: int, *, fillers: int) -> list[Row]:
    """Both measures on a broker of their own."""
    async with Mosquitto(port=free_port(), extra_config=BROKER_CONFIG) as broker:
        rows = await bench_tool_round(broker, work, rounds)
        rows += await bench_filler(broker, work, fillers)
    return rows


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xiaoai-bench-tools-") as tmp:
        rows = await run_tools(Path(tmp), 200, fillers=5)
    for row in rows:
        print(
            f"{'ok ' if row.ok else 'MISS'} {row.measure}\n     {row.result} (target {row.target})"
        )
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
