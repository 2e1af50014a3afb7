"""MCP tool source against a real MCP server (the SDK's FastMCP) over stdio and Streamable HTTP."""

from __future__ import annotations

import asyncio
import logging
import stat
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from mcp import types
from pydantic import AnyUrl

from tests.conftest import StdioServer
from tests.fakes.mcp_server import API_KEY, API_KEY_HEADER, SCRIPT, TOKEN, McpHttpServer
from xiaoai_bridge.app import mcp_server
from xiaoai_bridge.config import load_settings
from xiaoai_bridge.models import Utterance
from xiaoai_bridge.pipeline.tool_ports import ToolContext, ToolError
from xiaoai_bridge.tools.mcp import (
    MAX_RESULT_CHARS,
    McpServer,
    McpToolSource,
    McpTransport,
    check_server,
    list_server_tools,
    model_tool_name,
    result_text,
)

WAIT_S = 20.0
TICK_S = 0.01


def http_settings(server: McpHttpServer, **changes: object) -> McpServer:
    settings = McpServer(
        name="web",
        transport=McpTransport.STREAMABLE_HTTP if server.url.endswith("/mcp") else McpTransport.SSE,
        url=server.url,
        headers={API_KEY_HEADER: API_KEY},
        bearer_token=TOKEN,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


def context() -> ToolContext:
    return ToolContext(Utterance(text="问题", device="speaker", source="test"))


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition`; the deadline only stops a broken test from hanging."""
    async with asyncio.timeout(WAIT_S):
        while not condition():  # noqa: ASYNC110 - the state of another task and process
            await asyncio.sleep(TICK_S)


async def quick_sleep(delay: float) -> None:
    """The backoff's sleep, shortened: tests need its delays, not to wait them."""
    await asyncio.sleep(TICK_S)


@asynccontextmanager
async def running(source: McpToolSource) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(), name="tools:mcp")
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def by_name(source: McpToolSource) -> dict[str, object]:
    return {tool.spec.name: tool for tool in source.tools()}


async def call(source: McpToolSource, name: str, **arguments: object) -> str:
    tool = next(tool for tool in source.tools() if tool.spec.name == name)
    result = await tool.call(arguments, context())
    assert isinstance(result, str)
    return result


async def test_stdio_lists_the_allowed_tools_and_calls_them(
    mcp_stdio: StdioServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    allowed = frozenset({"echo", "add", "fail", "picture", "not_there"})
    source = McpToolSource(mcp_stdio(allowed_tools=allowed))
    assert source.name == "mcp:fake"
    assert not source.health().ok
    async with running(source):
        await until(lambda: bool(source.tools()))
        assert set(by_name(source)) == {"fake__echo", "fake__add", "fake__fail", "fake__picture"}
        echo = next(tool for tool in source.tools() if tool.spec.name == "fake__echo")
        assert echo.spec.description == "Repeat the text back."
        assert echo.spec.parameters["type"] == "object"
        assert "text" in echo.spec.parameters["properties"]  # type: ignore[operator]
        assert echo.offered_to(context())
        assert source.health().ok
        assert source.health().detail == "4 tools"
        assert await call(source, "fake__echo", text="你好") == "你好"
        assert await call(source, "fake__add", a=2, b=3) == "5"
        assert await call(source, "fake__picture") == "a red square\n[image image/png]"
        # A changed list with the allowed tool still missing does not say so again.
        assert await source.call_tool("grow", {}) == "grown"
        await until(lambda: "changed" in caplog.text)
    (missing,) = [r for r in caplog.records if "does not have" in r.getMessage()]
    assert missing.getMessage() == "mcp:fake: allowed tools the server does not have: not_there"


async def test_an_error_result_is_a_tool_error_with_its_text(mcp_stdio: StdioServer) -> None:
    source = McpToolSource(mcp_stdio())
    async with running(source):
        await until(lambda: bool(source.tools()))
        with pytest.raises(ToolError, match="the lamp is out of reach"):
            await call(source, "fake__fail", message="the lamp is out of reach")
        with pytest.raises(ToolError, match="nope"):
            await source.call_tool("nope", {})
        # Bad arguments are the server's to refuse, and the source stays up.
        with pytest.raises(ToolError):
            await call(source, "fake__add", a="two")
        assert source.health().ok


async def test_a_changed_tool_list_is_fetched_again(mcp_stdio: StdioServer) -> None:
    source = McpToolSource(mcp_stdio())
    async with running(source):
        await until(lambda: bool(source.tools()))
        assert "fake__late" not in by_name(source)
        assert await call(source, "fake__grow") == "grown"
        await until(lambda: "fake__late" in by_name(source))
        assert await call(source, "fake__late") == "late tool"


async def test_a_server_killed_mid_call_fails_the_call_and_comes_back(
    mcp_stdio: StdioServer,
) -> None:
    source = McpToolSource(mcp_stdio(), sleep=quick_sleep)
    async with running(source):
        await until(lambda: bool(source.tools()))
        with pytest.raises(ToolError, match="fake went away"):
            await call(source, "fake__die")
        # The source is down (tools absent) until the server runs again, then it is back.
        await until(lambda: source.policy.reconnects == 1 and bool(source.tools()))
        assert await call(source, "fake__echo", text="back") == "back"
        assert source.policy.failures == 0


async def test_a_server_missing_at_start_is_retried_with_backoff(
    mcp_stdio: StdioServer, tmp_path: Path
) -> None:
    command = tmp_path / "mcp-server"
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(TICK_S)

    source = McpToolSource(mcp_stdio(command=str(command), args=()), sleep=sleep)
    async with running(source):
        await until(lambda: len(delays) >= 3)
        assert source.tools() == ()
        health = source.health()
        assert not health.ok
        assert f"cannot run {command}" in health.detail
        assert "retrying" in health.detail
        # Exponential backoff: each ceiling doubles; equal jitter keeps it above half.
        assert delays[2] > delays[0]
        command.write_text(f'#!/bin/sh\nexec {sys.executable} {SCRIPT} stdio "$@"\n')
        command.chmod(command.stat().st_mode | stat.S_IXUSR)
        await until(lambda: bool(source.tools()))
        assert source.health().ok


async def test_cancel_stops_a_connected_source_and_its_server(mcp_stdio: StdioServer) -> None:
    source = McpToolSource(mcp_stdio())
    task = asyncio.create_task(source.run())
    await until(lambda: bool(source.tools()))
    server = psutil.Process(int(await call(source, "fake__pid")))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert source.tools() == ()
    assert source.health().detail == "stopped"
    with pytest.raises(ToolError, match="unavailable"):
        await source.call_tool("echo", {"text": "x"})


async def test_streamable_http_sends_token_and_headers(mcp_http: McpHttpServer) -> None:
    mcp_http.start()
    source = McpToolSource(http_settings(mcp_http, allowed_tools=frozenset({"echo"})))
    async with running(source):
        await until(lambda: bool(source.tools()))
        assert list(by_name(source)) == ["web__echo"]
        assert await call(source, "web__echo", text="over http") == "over http"


async def test_a_wrong_token_is_reported_and_retried_slowly(
    mcp_http: McpHttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    mcp_http.start()
    wrong = "wrong-token-9d8c7b6a"
    delays: list[float] = []
    gate = asyncio.Event()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await gate.wait()

    source = McpToolSource(http_settings(mcp_http, bearer_token=wrong), sleep=sleep)
    caplog.set_level(logging.DEBUG)
    async with running(source):
        await until(lambda: bool(delays))
        assert delays == [source.policy.auth_delay_s]
        assert not source.health().ok
        assert "HTTP 401" in source.health().detail
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "HTTP 401" in logged
    assert wrong not in logged
    assert API_KEY not in logged


async def test_http_server_down_at_start_then_up(mcp_http: McpHttpServer) -> None:
    source = McpToolSource(http_settings(mcp_http), sleep=quick_sleep)
    async with running(source):
        await until(lambda: source.policy.failures >= 2)
        assert source.tools() == ()
        assert "cannot connect" in source.health().detail
        mcp_http.start()
        await until(lambda: bool(source.tools()))
        assert await call(source, "web__add", a=1, b=1) == "2"


async def test_http_server_killed_mid_call_fails_fast_and_recovers(
    mcp_http: McpHttpServer,
) -> None:
    mcp_http.start()
    source = McpToolSource(http_settings(mcp_http), sleep=quick_sleep, busy_ping_interval_s=0.05)
    async with running(source):
        await until(lambda: bool(source.tools()))
        with pytest.raises(ToolError, match="web went away"):
            await call(source, "web__die")
        await until(lambda: not source.health().ok)
        assert source.tools() == ()
        mcp_http.kill()  # reap the dead child
        mcp_http.start()
        await until(lambda: bool(source.tools()))
        assert await call(source, "web__echo", text="again") == "again"
        assert source.policy.reconnects == 1


async def test_an_idle_http_server_that_vanishes_is_noticed(mcp_http: McpHttpServer) -> None:
    mcp_http.start()
    source = McpToolSource(
        http_settings(mcp_http), sleep=quick_sleep, ping_interval_s=0.05, busy_ping_interval_s=0.05
    )
    async with running(source):
        await until(lambda: bool(source.tools()))
        mcp_http.kill()
        await until(lambda: not source.health().ok)
        assert source.tools() == ()


async def test_a_stateless_json_server_like_home_assistants() -> None:
    server = McpHttpServer("http", stateless=True)
    try:
        server.start()
        source = McpToolSource(http_settings(server), sleep=quick_sleep, busy_ping_interval_s=0.05)
        async with running(source):
            await until(lambda: bool(source.tools()))
            assert await call(source, "web__add", a=20, b=22) == "42"
            with pytest.raises(ToolError, match="web went away"):
                await call(source, "web__die")
            await until(lambda: not source.health().ok)
    finally:
        server.close()


async def test_sse_transport(mcp_sse: McpHttpServer) -> None:
    mcp_sse.start()
    source = McpToolSource(http_settings(mcp_sse))
    async with running(source):
        await until(lambda: bool(source.tools()))
        assert await call(source, "web__echo", text="sse") == "sse"


async def test_check_connects_once(mcp_stdio: StdioServer, mcp_http: McpHttpServer) -> None:
    down = await check_server(http_settings(mcp_http), timeout_s=WAIT_S)
    assert not down.ok
    assert down.detail == "cannot connect"
    up = await check_server(mcp_stdio(allowed_tools=frozenset({"echo"})), timeout_s=WAIT_S)
    assert up.ok
    assert up.detail == "1 tools: echo"


async def test_a_server_that_never_answers_times_out(mcp_stdio: StdioServer) -> None:
    # It reads its stdin to the end and says nothing: an initialize that never returns.
    silent = mcp_stdio(args=("-c", "import sys; sys.stdin.read()"))
    delays: list[float] = []
    gate = asyncio.Event()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await gate.wait()

    source = McpToolSource(silent, connect_timeout_s=0.1, sleep=sleep)
    async with running(source):
        await until(lambda: bool(delays))
        assert source.health().detail.startswith("no answer in time; retrying in ")
    checked = await check_server(silent, timeout_s=0.1)
    assert (checked.ok, checked.detail) == (False, "no answer in time")


async def test_listing_once_gives_the_specs_the_model_would_see(mcp_stdio: StdioServer) -> None:
    tools = await list_server_tools(mcp_stdio(allowed_tools=frozenset({"add"})), timeout_s=WAIT_S)
    assert [tool.spec.name for tool in tools] == ["fake__add"]
    assert tools[0].spec.description == "Add two integers."
    with pytest.raises(ToolError, match="unavailable"):
        await tools[0].call({"a": 1, "b": 2}, context())


def test_settings_are_checked_and_hide_secrets() -> None:
    with pytest.raises(ValueError, match="name"):
        McpServer(name="has space", transport=McpTransport.STDIO, command="x")
    with pytest.raises(ValueError, match="command"):
        McpServer(name="a", transport=McpTransport.STDIO)
    with pytest.raises(ValueError, match="url"):
        McpServer(name="a", transport=McpTransport.STREAMABLE_HTTP, url="ftp://x")
    settings = McpServer(
        name="a",
        transport=McpTransport.STREAMABLE_HTTP,
        url="http://127.0.0.1:1/mcp",
        headers={"X-Key": "header-secret"},
        bearer_token="token-secret",
    )
    assert "secret" not in repr(settings)
    assert settings.http_headers() == {
        "X-Key": "header-secret",
        "Authorization": "Bearer token-secret",
    }


def test_model_tool_names_are_valid_and_distinct() -> None:
    assert model_tool_name("ha", "HassTurnOn") == "ha__HassTurnOn"
    dotted = model_tool_name("ha", "light.turn_on")
    underscored = model_tool_name("ha", "light_turn_on")
    assert dotted != underscored
    assert dotted.startswith("ha__light_turn_on_")
    long = model_tool_name("search", "x" * 100)
    assert len(long) == 64
    assert long != model_tool_name("search", "x" * 101)
    for name in (dotted, underscored, long, model_tool_name("s", "查询天气")):
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
        assert 1 <= len(name) <= 64


def test_results_are_text_summaries_cut_to_length() -> None:
    long = types.CallToolResult(content=[types.TextContent(type="text", text="字" * 5000)])
    text = result_text(long)
    assert text.startswith("字" * MAX_RESULT_CHARS)
    assert text.endswith("[cut: 5000 characters in all]")
    structured = types.CallToolResult(content=[], structuredContent={"温度": 21})
    assert result_text(structured) == '{"温度": 21}'
    resource = types.CallToolResult(
        content=[
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(uri=AnyUrl("file:///a.txt"), text="inside"),
            ),
            types.EmbeddedResource(
                type="resource",
                resource=types.BlobResourceContents(
                    uri=AnyUrl("file:///a.bin"), blob="AAAA", mimeType="application/octet-stream"
                ),
            ),
        ]
    )
    assert result_text(resource) == "inside\n[resource file:///a.bin application/octet-stream]"


def test_config_tables_become_server_settings(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(
        '[[tools.mcp]]\nname = "ha"\nurl = "http://127.0.0.1:8123/api/mcp"\ntoken = "t0ken-abc"\n'
        'headers = { "X-Key" = "k3y-abc" }\nallow = ["HassTurnOn"]\n'
        '[[tools.mcp]]\nname = "local"\ncommand = "uvx"\nargs = ["server"]\n'
        'env = { API_KEY = "s3cret-abc" }\n',
        encoding="utf-8",
    )
    path.chmod(0o600)
    ha, local = (mcp_server(entry) for entry in load_settings(path).tools.mcp)
    assert ha.transport is McpTransport.STREAMABLE_HTTP
    assert ha.http_headers() == {"X-Key": "k3y-abc", "Authorization": "Bearer t0ken-abc"}
    assert ha.allowed_tools == frozenset({"HassTurnOn"})
    assert local.transport is McpTransport.STDIO
    assert (local.command, local.args, local.env) == ("uvx", ("server",), {"API_KEY": "s3cret-abc"})
    assert local.allowed_tools is None
