"""Soak: a burst of questions at once and a `kill -9` in the middle; nothing may be lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
from tests.fakes.mosquitto import Mosquitto, free_port

from benchmarks.run import (
    API_KEY,
    BROKER_CONFIG,
    NODELAY,
    QUESTION_TOPIC,
    REPLY_TOPIC,
    Row,
    fake_llm,
    wait_online,
)
from xiaoai_bridge.pipeline.pipeline import APOLOGIES

DEVICES = 1_000
# The bridge acknowledges a question only once it is on disk, so in a burst the broker holds
# the backlog; mosquitto's default queue per client (1000 messages) would drop the rest.
# docs/troubleshooting.md tells users the same.
SOAK_BROKER_CONFIG = (*BROKER_CONFIG, "max_queued_messages 100000")
# Sampling the service's resident memory this often catches its peak closely enough.
RSS_SAMPLE_S = 0.05


@dataclass
class Replies:
    """What came back on the reply topic, by question id."""

    texts: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            data = json.loads(message.payload)
            self.texts[str(data["id"])] = data["text"]
            self.changed.set()

    async def wait(self, count: int, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(self.texts) < count:
                    self.changed.clear()
                    await self.changed.wait()


@dataclass
class Service:
    """One `xiaoai-bridge run` process and the peak of its resident memory."""

    proc: asyncio.subprocess.Process
    peak_rss_mb: float = 0.0
    log: list[str] = field(default_factory=list)

    async def read_log(self) -> None:
        # Read as it comes: a full pipe would block the service on its next log line.
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace"))

    async def sample_rss(self) -> None:
        status_file = Path(f"/proc/{self.proc.pid}/status")
        with contextlib.suppress(OSError, StopIteration):
            while True:
                status = status_file.read_text()  # noqa: ASYNC240 - procfs never blocks
                kib = next(int(x.split()[1]) for x in status.splitlines() if x[:6] == "VmRSS:")
                self.peak_rss_mb = max(self.peak_rss_mb, kib / 1024)
                await asyncio.sleep(RSS_SAMPLE_S)


@contextlib.asynccontextmanager
async def service(broker: Mosquitto, llm_url: str, work: Path) -> AsyncIterator[Service]:
    """The bridge with a fixed client id and data dir, so a restart resumes the same run."""
    config = work / "soak.toml"
    config.write_text(
        f'data_dir = "{work / "soak-data"}"\nlog_level = "WARNING"\n'
        f'[mqtt]\nurl = "{broker.url}"\nclient_id = "soak"\n'
        f'[llm]\nbase_url = "{llm_url}"\napi_key = "{API_KEY}"\nmodel = "fake-model"\n'
        "max_retries = 0\n[http]\nport = 0\n",
        encoding="utf-8",
    )
    config.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "XIAOAI_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xiaoai_bridge.cli",
        "run",
        "--config",
        str(config),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Service(proc)
    sampler = asyncio.create_task(running.sample_rss())
    reader = asyncio.create_task(running.read_log())
    try:
        await wait_online(broker)
        yield running
    finally:
        sampler.cancel()
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await reader


async def bench_soak(broker: Mosquitto, llm_url: str, work: Path, count: int) -> list[Row]:
    """`count` questions from DEVICES devices at once; kill -9 at a third of the replies."""
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="soak-probe", clean_session=False
    ) as client:
        await client.subscribe(REPLY_TOPIC, qos=1)
        replies = Replies()
        reader = asyncio.create_task(replies.run(client))
        async with service(broker, llm_url, work) as first:
            start = time.perf_counter()
            async with aiomqtt.Client(
                broker.host, broker.port, socket_options=NODELAY
            ) as publisher:
                for n in range(count):
                    payload = {"id": f"s{n}", "device": f"d{n % DEVICES}", "text": f"问题 s{n}"}
                    await publisher.publish(
                        QUESTION_TOPIC, json.dumps(payload, ensure_ascii=False), qos=1
                    )
            published_s = time.perf_counter() - start
            await replies.wait(count // 3, 120)
            killed_at = len(replies.texts)
            first.proc.send_signal(signal.SIGKILL)
            await first.proc.wait()
        async with service(broker, llm_url, work) as second:
            await replies.wait(count, 300)
            elapsed = time.perf_counter() - start
        log = "".join(second.log)
        reader.cancel()
    texts = replies.texts
    busy = sum(1 for text in texts.values() if text == APOLOGIES["busy"])
    answered = sum(1 for qid, text in texts.items() if f"问题 {qid}" in text)
    lost = count - len(texts)
    stale = _dropped(log)
    peak = max(first.peak_rss_mb, second.peak_rss_mb)
    return [
        Row(
            f"soak: {count} questions from {DEVICES} devices published at once "
            f"(in {published_s:.1f} s), instant fake LLM, kill -9 after {killed_at} replies, "
            "restart",
            f"answered {answered}, busy {busy}, dropped as stale {stale}, lost {lost}; "
            f"all replied {elapsed:.1f} s after the first publish; peak RSS {peak:.0f} MB",
            "lost 0; memory bounded (< 150 MB)",
            lost == 0 and peak < 150,
        )
    ]


def _dropped(log: str) -> int:
    # "resumed N questions left unanswered by the last run; dropped M too old ..."
    for line in log.splitlines():
        if "dropped" in line and "too old" in line:
            return int(line.split("dropped", 1)[1].split()[0])
    return 0


async def run_soak(work: Path, count: int) -> list[Row]:
    """The soak on a broker of its own (with the queue it needs) and an instant fake LLM."""
    async with (
        Mosquitto(port=free_port(), extra_config=SOAK_BROKER_CONFIG) as broker,
        fake_llm(0, 0, 8) as url,
    ):
        return await bench_soak(broker, url, work, count)


async def main(count: int) -> int:
    """Only the soak: `.venv/bin/python -m benchmarks.soak [count]`."""
    import tempfile  # noqa: PLC0415 - only when run on its own

    with tempfile.TemporaryDirectory(prefix="xiaoai-soak-") as tmp:
        rows = await run_soak(Path(tmp), count)
    for row in rows:
        print(f"{'ok ' if row.ok else 'MISS'} {row.measure}\n     {row.result}")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)))
