"""Shared fixtures: a real mosquitto, a fake OpenAI server, and the bridge under test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from pydantic import SecretStr

from tests.fakes.homeassistant_server import FakeHomeAssistant
from tests.fakes.mcp_server import SCRIPT, McpHttpServer
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.xiaomi_cloud import FakeXiaomiCloud
from xiaoai_bridge.app import run_service
from xiaoai_bridge.clients.xiaomi.auth import XiaomiAuth
from xiaoai_bridge.config import HttpSettings, LLMSettings, MqttSettings, Settings
from xiaoai_bridge.tools.mcp import McpServer, McpTransport

API_KEY = "sk-test-0123456789abcdef"
# Tests that start a program or a loopback server (mosquitto, the CLI, a browser, the fake
# LLM, Home Assistant or Xiaomi cloud) are "e2e"; the rest are "unit" and run in seconds:
# `pytest -m unit` while working, the whole suite before landing.
_E2E_FOLDERS = ("e2e", "container", "fakes")
_E2E_FIXTURES = frozenset(
    {
        "mosquitto",
        "probe",
        "bridge",
        "start_bridge",
        "browser",
        "llm",
        "ha",
        "cloud",
        "auth",
        "mcp_stdio",
        "mcp_http",
        "mcp_sse",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test "unit" or "e2e" (see `_E2E_FOLDERS`)."""
    for item in items:
        folder = item.path.parent.name
        fixtures = set(getattr(item, "fixturenames", ()))
        e2e = folder in _E2E_FOLDERS or bool(fixtures & _E2E_FIXTURES)
        item.add_marker(pytest.mark.e2e if e2e else pytest.mark.unit)


WAIT_S = 10.0


def stdio_settings(**changes: object) -> McpServer:
    settings = McpServer(
        name="fake",
        transport=McpTransport.STDIO,
        command=sys.executable,
        args=(str(SCRIPT), "stdio"),
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


StdioServer = Callable[..., McpServer]


@pytest.fixture
def mcp_stdio() -> StdioServer:
    """Settings for the fake MCP server over stdio (the source starts it), with changes."""
    return stdio_settings


@pytest.fixture
def mcp_http() -> Iterator[McpHttpServer]:
    """The fake MCP server over Streamable HTTP, not started yet."""
    server = McpHttpServer("http")
    yield server
    server.close()


@pytest.fixture
def mcp_sse() -> Iterator[McpHttpServer]:
    """The fake MCP server over SSE, not started yet."""
    server = McpHttpServer("sse")
    yield server
    server.close()


@pytest.fixture
async def mosquitto() -> AsyncIterator[Mosquitto]:
    """A real broker on a free loopback port."""
    async with Mosquitto() as broker:
        yield broker


@pytest.fixture
async def ha() -> AsyncIterator[FakeHomeAssistant]:
    """A fake Home Assistant websocket API on a free loopback port."""
    async with FakeHomeAssistant() as server:
        yield server


@pytest.fixture
async def llm() -> AsyncIterator[FakeOpenAI]:
    """A fake OpenAI-compatible server on a free loopback port."""
    async with FakeOpenAI(api_key=API_KEY, model="fake-model") as server:
        yield server


def llm_settings(fake_llm: FakeOpenAI, **values: Any) -> LLMSettings:
    """`[llm]` pointing at the fake, with the test key; `values` override."""
    defaults: dict[str, Any] = {
        "base_url": fake_llm.base_url,
        "api_key": SecretStr(API_KEY),
        "model": "fake-model",
        "timeout_s": 5,
        "max_retries": 0,
    }
    return LLMSettings(**(defaults | values))


def make_settings(
    tmp_path: Path, broker: Mosquitto, fake_llm: FakeOpenAI, **sections: Any
) -> Settings:
    """Settings pointing at the test broker and fake LLM; `sections` override whole sections."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "mqtt": MqttSettings(url=broker.url, client_id="bridge-under-test"),
        "llm": llm_settings(fake_llm),
        "http": HttpSettings(port=0),  # a free port: tests run side by side
    }
    values.update(sections)
    return Settings(**values)


@dataclass
class Probe:
    """Plays Node-RED: publishes questions, collects what the bridge publishes."""

    client: aiomqtt.Client
    reply_topic: str = "/xiaomi/reply"
    question_topic: str = "/xiaomi/chatgpt"
    replies: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    errors: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    status: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    stream: list[dict[str, Any]] = field(default_factory=list)
    stream_changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def ask(self, payload: str | bytes | dict[str, Any]) -> None:
        """Publish one question the way Node-RED's mqtt-out node would (QoS 1)."""
        data = json.dumps(payload, ensure_ascii=False) if isinstance(payload, dict) else payload
        await self.client.publish(self.question_topic, data, qos=1)

    async def reply(self, wait_s: float = WAIT_S) -> bytes:
        """The next complete answer on the reply topic."""
        async with asyncio.timeout(wait_s):
            return await self.replies.get()

    async def reply_text(self, wait_s: float = WAIT_S) -> str:
        """The next complete answer, decoded."""
        return (await self.reply(wait_s)).decode()

    async def reply_json(self, wait_s: float = WAIT_S) -> dict[str, Any]:
        """The next complete answer, parsed as JSON."""
        data = json.loads(await self.reply(wait_s))
        assert isinstance(data, dict)
        return data

    async def wait_status(self, value: str, wait_s: float = WAIT_S) -> None:
        """Wait until the availability topic says `value`."""
        async with asyncio.timeout(wait_s):
            while await self.status.get() != value:
                pass

    def chunks(self, question_id: object) -> list[dict[str, Any]]:
        """Stream messages of one answer, in arrival order."""
        return [m for m in self.stream if m["id"] == question_id]

    async def run(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            topic = str(message.topic)
            if topic == self.reply_topic:
                self.replies.put_nowait(payload)
            elif topic == f"{self.reply_topic}/stream":
                self.stream.append(json.loads(payload))
                self.stream_changed.set()
            elif topic == f"{self.reply_topic}/error":
                self.errors.put_nowait(json.loads(payload))
            elif topic == "xiaoai-bridge/status":
                self.status.put_nowait(payload.decode())


@contextlib.asynccontextmanager
async def open_probe(broker: Mosquitto, client_id: str = "probe") -> AsyncIterator[Probe]:
    """A persistent-session subscriber, so replies sent while it reconnects are kept."""
    client = aiomqtt.Client(broker.host, broker.port, identifier=client_id, clean_session=False)
    async with client:
        probe = Probe(client)
        await client.subscribe("/xiaomi/reply/#", qos=1)
        await client.subscribe("/xiaomi/reply", qos=1)
        await client.subscribe("xiaoai-bridge/status", qos=1)
        task = asyncio.create_task(probe.run())
        try:
            yield probe
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


@pytest.fixture
async def probe(mosquitto: Mosquitto) -> AsyncIterator[Probe]:
    """A Node-RED stand-in connected to the test broker."""
    async with open_probe(mosquitto) as connected:
        yield connected


class Bridge:
    """The service under test, run in this event loop and stoppable like SIGTERM would."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, probe: Probe | None = None) -> None:
        """Start; with a probe, wait until the bridge announced itself online."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(run_service(self.settings, stop=self._stop))
        if probe is not None:
            await probe.wait_status("online")

    async def stop(self) -> None:
        """Orderly stop, as on SIGTERM."""
        if self._task is None:
            return
        self._stop.set()
        async with asyncio.timeout(WAIT_S + 5):
            await self._task
        self._task = None

    @property
    def running(self) -> bool:
        """False once the service task ended (for example after a crash)."""
        return self._task is not None and not self._task.done()


@pytest.fixture
async def start_bridge(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await start_bridge(**sections)` runs the bridge until the test ends."""
    bridges: list[Bridge] = []

    async def start(**sections: Any) -> Bridge:
        bridge = Bridge(make_settings(tmp_path, mosquitto, llm, **sections))
        bridges.append(bridge)
        await bridge.start(probe)
        return bridge

    yield start
    for bridge in bridges:
        await bridge.stop()


@pytest.fixture
async def bridge(start_bridge: Callable[..., Any]) -> Bridge:
    """The bridge with default settings, online."""
    started: Bridge = await start_bridge()
    return started


def cloud_auth(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path, **options: Any
) -> XiaomiAuth:
    """A password login to the fake Xiaomi cloud, its tokens cached at `token_path`."""
    return XiaomiAuth(
        session,
        account=cloud.account,
        password=cloud.password,
        token_path=token_path,
        base_url=cloud.endpoints["account"],
        **options,
    )
