"""Benchmark tool rounds: the bridge's own time per round, and when the filler is heard.

Run alone with `.venv/bin/python -m benchmarks.tools`; `benchmarks.run` includes it.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import aiohttp
import aiomqtt
from tests.fakes.mosquitto import Mosquitto, free_port
from tests.fakes.openai_server import TOOL_GAPS_PATH

from benchmarks.run import (
    BROKER_CONFIG,
    Listener,
    Row,
    ask,
    bridge,
    fake_llm,
    listener,
    pct,
)
from xiaoai_bridge.pipeline.tool_loop import DEFAULT_FILLER

# A built-in tool that does next to nothing, so a round's gap is the bridge's own time.
TOOL = "get_current_time"
TOOLS_CONFIG = '[tools]\nbuiltin = true\ntimezone = "Asia/Shanghai"\n'
# The second round's model takes this long: the filler must come first, at ~1 s.
SLOW_AFTER_TOOLS_MS = 2500
FILLER_TARGET_S = 1.2


async def ask_all(
    client: aiomqtt.Client, replies: Listener, prefix: str, count: int, timeout_s: float
) -> dict[str, float]:
    """Ask `count` questions one after the other; when each was sent."""
    sent: dict[str, float] = {}
    for n in range(count):
        qid = f"{prefix}{n}"
        sent[qid] = await ask(client, qid, "tools")
        await replies.wait_replies(len(replies.replied) + 1, timeout_s)
    return sent


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
        listener(broker) as (client, replies),
    ):
        await ask_all(client, replies, "warm", 20, 10)
        warm = len(await tool_gaps(url))
        await ask_all(client, replies, "t", count, 10)
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
        listener(broker) as (client, replies),
    ):
        sent = await ask_all(client, replies, "f", count, 15)
    delays = [replies.first_chunk[qid] - at for qid, at in sent.items()]
    texts = {replies.first_text[qid] for qid in sent}
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
