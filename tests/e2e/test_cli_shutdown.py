"""`xiaoai-bridge run` stops promptly on SIGINT/SIGTERM even when nothing can be delivered."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.test_cli import spawn_run
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI

# Nothing can be delivered to a broker that refuses us: stopping must not wait for it.
PROMPT_STOP_S = 2.0


@pytest.fixture
async def refusing_broker() -> AsyncIterator[Mosquitto]:
    """A broker that only lets its own user in."""
    async with Mosquitto(username="owner", password="owner-password-1") as broker:
        yield broker


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
async def test_stops_promptly_while_the_broker_refuses_the_login(
    tmp_path: Path, refusing_broker: Mosquitto, llm: FakeOpenAI, signum: signal.Signals
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[mqtt]\nurl = "mqtt://bridge:wrong-password@127.0.0.1:{refusing_broker.port}"\n'
        f'[llm]\nbase_url = "{llm.base_url}"\napi_key = "sk-test-shutdown"\n',
        encoding="utf-8",
    )
    config.chmod(0o600)
    proc = await spawn_run(tmp_path, config, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(20):
            # Refused at least once: the bridge is in its retry loop now.
            while not any("refused" in line or "not authori" in line.lower() for line in log):
                line = await proc.stderr.readline()
                assert line, "".join(log)
                log.append(line.decode())
    finally:
        proc.send_signal(signum)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        async with asyncio.timeout(30):
            rest = await proc.stderr.read()
            await proc.wait()
        took = loop.time() - sent
    assert took < PROMPT_STOP_S, f"stopped {took:.1f} s after the signal\n{''.join(log)}{rest!r}"
    assert proc.returncode == 0
