"""MCP servers as a tool source: each configured server's tools, offered to the model."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import ClientSession, McpError, StdioServerParameters, types
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage

from xiaoai_bridge.errors import BridgeError
from xiaoai_bridge.llm.base import ToolSpec
from xiaoai_bridge.pipeline.tool_ports import SourceHealth, ToolContext, ToolError, ToolOutput
from xiaoai_bridge.reconnect import ReconnectPolicy, ReconnectRunner, Retry, Sleep

_LOGGER = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 15.0
DEFAULT_CHECK_TIMEOUT_S = 10.0
# An idle connection is pinged this often: HTTP transports notice a vanished server only then.
DEFAULT_PING_INTERVAL_S = 30.0
# While a call is in flight the server is pinged this often, so a server that died mid-call
# fails the call in about this time instead of leaving it to the loop's tool timeout.
DEFAULT_BUSY_PING_INTERVAL_S = 1.0
DEFAULT_PING_TIMEOUT_S = 5.0
# The SSE/Streamable HTTP response stream of a long call may stay quiet this long.
HTTP_READ_TIMEOUT_S = 300.0
# Results are read by the model: long ones cost tokens and time, so they are cut.
MAX_RESULT_CHARS = 2000
MAX_TOOLS_PER_SERVER = 128
MAX_LIST_PAGES = 16
MAX_TOOL_NAME_CHARS = 64
# A server's name prefixes its tools' names, which must match ^[a-zA-Z0-9_-]{1,64}$.
SERVER_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,32}$")
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
_NAME_SEPARATOR = "__"


class McpTransport(enum.Enum):
    """How the bridge reaches an MCP server."""

    STDIO = "stdio"
    STREAMABLE_HTTP = "streamable_http"
    SSE = "sse"


@dataclass(frozen=True, slots=True)
class McpServer:
    """How to reach one MCP server and which of its tools to offer (None: all)."""

    name: str
    transport: McpTransport
    command: str = ""
    args: tuple[str, ...] = ()
    # Secrets (API keys, tokens) travel in env and headers: never shown in a repr.
    env: Mapping[str, str] | None = field(default=None, repr=False)
    cwd: str | None = None
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    bearer_token: str | None = field(default=None, repr=False)
    allowed_tools: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not SERVER_NAME_PATTERN.match(self.name):
            raise ValueError(f"MCP server name {self.name!r}: use 1-32 letters, digits, '_' or '-'")
        if self.transport is McpTransport.STDIO:
            if not self.command:
                raise ValueError(f"MCP server {self.name!r}: stdio needs a command")
        elif not self.url.startswith(("http://", "https://")):
            raise ValueError(
                f"MCP server {self.name!r}: {self.transport.value} needs an http(s) url"
            )

    def http_headers(self) -> dict[str, str]:
        """The headers every HTTP request carries, with the bearer token if there is one."""
        headers = dict(self.headers)
        if self.bearer_token:
            headers["Authorization"] = f"Bearer {self.bearer_token}"
        return headers


class McpUnavailableError(BridgeError):
    """The server could not be reached or was lost; `str(err)` is a short, secret-free reason."""

    def __init__(self, reason: str, *, auth: bool = False) -> None:
        super().__init__(reason)
        self.auth = auth


def model_tool_name(server: str, tool: str) -> str:
    """The name the model sees: `<server>__<tool>`, made valid and at most 64 characters."""
    name = _INVALID_NAME_CHARS.sub("_", f"{server}{_NAME_SEPARATOR}{tool}")
    if name != f"{server}{_NAME_SEPARATOR}{tool}" or len(name) > MAX_TOOL_NAME_CHARS:
        # Replaced or cut characters could make two names equal: a digest of the original
        # keeps them apart.
        digest = hashlib.sha256(tool.encode()).hexdigest()[:8]
        name = f"{name[: MAX_TOOL_NAME_CHARS - len(digest) - 1]}_{digest}"
    return name


class McpTool:
    """One MCP tool as the model sees it; calls go through its source's live session."""

    def __init__(self, source: McpToolSource, remote: types.Tool) -> None:
        self._source = source
        self.remote_name = remote.name
        self._spec = ToolSpec(
            name=model_tool_name(source.settings.name, remote.name),
            description=remote.description or remote.title or remote.name,
            parameters=remote.inputSchema,
        )

    @property
    def spec(self) -> ToolSpec:
        """Its prefixed name, the server's description and input schema."""
        return self._spec

    def offered_to(self, context: ToolContext) -> bool:
        """Any question may use it."""
        return True

    async def call(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        """Run it on the server; its text content is the result, `isError` a ToolError."""
        return await self._source.call_tool(self.remote_name, arguments)


class _Live:
    """One connected session: its tools and the task group its calls run in."""

    def __init__(self, session: ClientSession, group: asyncio.TaskGroup) -> None:
        self.session = session
        self.group = group
        self.tools: tuple[McpTool, ...] = ()
        self.in_flight = 0
        self.list_changed = asyncio.Event()


# A call's outcome, handed from the session's task group to the caller's task.
_Outcome = types.CallToolResult | Exception


class McpToolSource:
    """The tools of one MCP server, kept connected: absent while it is down, back when it is."""

    def __init__(
        self,
        settings: McpServer,
        *,
        policy: ReconnectPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        ping_interval_s: float = DEFAULT_PING_INTERVAL_S,
        busy_ping_interval_s: float = DEFAULT_BUSY_PING_INTERVAL_S,
        ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S,
        errlog: TextIO | None = None,
    ) -> None:
        """`errlog` receives a stdio server's stderr (default: ours)."""
        self.settings = settings
        self.policy = policy or ReconnectPolicy(name=f"mcp:{settings.name}", logger=_LOGGER)
        self._runner = ReconnectRunner(self.policy, _classify, sleep=sleep, on_failure=self._down)
        self._connect_timeout_s = connect_timeout_s
        self._ping_interval_s = ping_interval_s
        self._busy_ping_interval_s = min(busy_ping_interval_s, ping_interval_s)
        self._ping_timeout_s = ping_timeout_s
        self._errlog = errlog
        self._live: _Live | None = None
        self._down_reason = "connecting"
        self._missing: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        """`mcp:<server>`."""
        return f"mcp:{self.settings.name}"

    def tools(self) -> Sequence[McpTool]:
        """The server's (allowed) tools while connected; none while it is down."""
        live = self._live
        return live.tools if live is not None else ()

    def health(self) -> SourceHealth:
        """Up with its number of tools, or down with the reason."""
        live = self._live
        if live is not None:
            return SourceHealth(ok=True, detail=f"{len(live.tools)} tools")
        return SourceHealth(ok=False, detail=self._down_reason)

    async def run(self) -> None:
        """Connect, keep the tool list fresh, reconnect with backoff; never returns."""
        try:
            await self._runner.run(self._attempt)
        finally:
            self._live = None
            self._down_reason = "stopped"
            self.policy.stopped()

    def _down(self, error: Exception, delay: float) -> None:
        self._down_reason = f"{error}; retrying in {round(delay, 1):g} s"

    async def _attempt(self) -> None:
        try:
            await self._serve()
        except Exception as err:
            raise _unavailable(err, self.settings) from err

    async def _serve(self) -> None:
        async with _transport(self.settings, self._errlog) as (read, write):
            mine_send, mine_recv = anyio.create_memory_object_stream[SessionMessage | Exception](0)
            # Closed here too: a task cancelled before it started never closes its end.
            async with read, write, mine_send, mine_recv, asyncio.TaskGroup() as group:
                # The SDK's session ends quietly when the server closes the stream; passing
                # messages through here is how that loss becomes known at once.
                group.create_task(_forward(read, mine_send), name=f"{self.name}:read")
                handler = _MessageHandler()
                async with ClientSession(mine_recv, write, message_handler=handler) as session:
                    live = _Live(session, group)
                    handler.live = live
                    async with asyncio.timeout(self._connect_timeout_s):
                        await session.initialize()
                        live.tools = self._make_tools(await _list_tools(session))
                    self._live = live
                    try:
                        _LOGGER.info("%s: %d tools", self.name, len(live.tools))
                        await self._keep(live)
                    finally:
                        self._live = None

    async def _keep(self, live: _Live) -> None:
        # The runner records the connection only now: connecting includes the tool list.
        self._runner.connected()
        refresher = live.group.create_task(self._refresh(live), name=f"{self.name}:list")
        try:
            idle_s = 0.0
            while True:
                await asyncio.sleep(self._busy_ping_interval_s)
                idle_s += self._busy_ping_interval_s
                if live.in_flight or idle_s >= self._ping_interval_s:
                    idle_s = 0.0
                    await self._ping(live.session)
        finally:
            refresher.cancel()

    async def _ping(self, session: ClientSession) -> None:
        try:
            async with asyncio.timeout(self._ping_timeout_s):
                await session.send_ping()
        except TimeoutError as err:
            raise McpUnavailableError("no answer to ping") from err
        except McpError as err:
            # An error answer still proves the server is there.
            _LOGGER.debug("%s: ping answered with an error: %s", self.name, err)

    async def _refresh(self, live: _Live) -> None:
        while True:
            await live.list_changed.wait()
            live.list_changed.clear()
            live.tools = self._make_tools(await _list_tools(live.session))
            _LOGGER.info("%s: tool list changed, %d tools", self.name, len(live.tools))

    def _make_tools(self, remote: Sequence[types.Tool]) -> tuple[McpTool, ...]:
        allowed = self.settings.allowed_tools
        if allowed is not None:
            missing = allowed - {tool.name for tool in remote}
            # Said once, not again on every reconnect or list change.
            if missing and missing != self._missing:
                _LOGGER.warning(
                    "%s: allowed tools the server does not have: %s",
                    self.name,
                    ", ".join(sorted(missing)),
                )
            self._missing = missing
            remote = [tool for tool in remote if tool.name in allowed]
        tools: dict[str, McpTool] = {}
        for item in remote:
            tool = McpTool(self, item)
            if tool.spec.name in tools:
                _LOGGER.warning("%s: tool %r listed twice; keeping the first", self.name, item.name)
                continue
            tools[tool.spec.name] = tool
        return tuple(tools.values())

    async def call_tool(self, name: str, arguments: Mapping[str, object]) -> str:
        """Call the server's tool `name`; raise ToolError if it fails or the server is gone."""
        live = self._live
        if live is None:
            raise ToolError(f"MCP server {self.settings.name} is unavailable")
        try:
            # The call runs in the session's task group, so losing the session ends it.
            task = live.group.create_task(
                _call(live.session, name, dict(arguments)), name=f"{self.name}:call"
            )
        except RuntimeError as err:  # the group is shutting down: the session is going
            raise ToolError(f"MCP server {self.settings.name} is unavailable") from err
        live.in_flight += 1
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            live.in_flight -= 1
        outcome = task.result() if not task.cancelled() else None
        if outcome is None or (
            isinstance(outcome, McpError) and outcome.error.code == types.CONNECTION_CLOSED
        ):
            raise ToolError(f"MCP server {self.settings.name} went away during the call")
        if isinstance(outcome, McpError):
            raise ToolError(_shorten(outcome.error.message or "the server refused the call"))
        if isinstance(outcome, Exception):
            _LOGGER.warning("%s: call %s failed: %r", self.name, name, outcome)
            raise ToolError(f"MCP server {self.settings.name} failed: {type(outcome).__name__}")
        text = result_text(outcome)
        if outcome.isError:
            raise ToolError(text or "the tool reported an error")
        return text or "(no output)"


class _MessageHandler:
    """Hears the server's notifications: a changed tool list is fetched again."""

    def __init__(self) -> None:
        self.live: _Live | None = None

    async def __call__(
        self,
        message: Any,
    ) -> None:
        if isinstance(message, types.ServerNotification):
            if isinstance(message.root, types.ToolListChangedNotification) and self.live:
                self.live.list_changed.set()
        elif isinstance(message, Exception):
            _LOGGER.debug("MCP transport reported: %r", message)
        await anyio.lowlevel.checkpoint()


async def _forward(
    source: MemoryObjectReceiveStream[SessionMessage | Exception],
    sink: MemoryObjectSendStream[SessionMessage | Exception],
) -> None:
    async with source, sink:
        async for item in source:
            await sink.send(item)
    raise McpUnavailableError("the server closed the connection")


async def _call(session: ClientSession, name: str, arguments: dict[str, Any]) -> _Outcome:
    try:
        return await session.call_tool(name, arguments)
    except Exception as err:  # noqa: BLE001 - the caller's task translates it; this one must not fail
        return err


async def _list_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(MAX_LIST_PAGES):
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.nextCursor
        if not cursor or len(tools) >= MAX_TOOLS_PER_SERVER:
            break
    return tools[:MAX_TOOLS_PER_SERVER]


def result_text(result: types.CallToolResult) -> str:
    """A call's content as text for the model: text joined, other content named, long text cut."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.ImageContent | types.AudioContent):
            parts.append(f"[{block.type} {block.mimeType}]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource link {block.uri}]")
        elif isinstance(block.resource, types.TextResourceContents):
            parts.append(block.resource.text)
        else:
            parts.append(f"[resource {block.resource.uri} {block.resource.mimeType or ''}]".strip())
    if not parts and result.structuredContent is not None:
        parts.append(json.dumps(result.structuredContent, ensure_ascii=False))
    return _shorten("\n".join(parts))


def _shorten(text: str) -> str:
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return f"{text[:MAX_RESULT_CHARS]}\n[cut: {len(text)} characters in all]"


@asynccontextmanager
async def _transport(
    settings: McpServer, errlog: TextIO | None
) -> AsyncIterator[
    tuple[
        MemoryObjectReceiveStream[SessionMessage | Exception],
        MemoryObjectSendStream[SessionMessage],
    ]
]:
    if settings.transport is McpTransport.STDIO:
        params = StdioServerParameters(
            command=settings.command,
            args=list(settings.args),
            env=dict(settings.env) if settings.env is not None else None,
            cwd=settings.cwd,
        )
        async with stdio_client(params, errlog=errlog or sys.stderr) as (read, write):
            yield read, write
    elif settings.transport is McpTransport.SSE:
        async with sse_client(
            settings.url, headers=settings.http_headers(), sse_read_timeout=HTTP_READ_TIMEOUT_S
        ) as (read, write):
            yield read, write
    else:
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    headers=settings.http_headers(),
                    timeout=httpx.Timeout(DEFAULT_CONNECT_TIMEOUT_S, read=HTTP_READ_TIMEOUT_S),
                )
            )
            read, write, _ = await stack.enter_async_context(
                streamable_http_client(settings.url, http_client=client)
            )
            yield read, write


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _unavailable(error: Exception, settings: McpServer) -> McpUnavailableError:
    """A foreign error as a short reason that holds no url, header or token."""
    leaves = [leaf for leaf in _leaves(error) if not isinstance(leaf, asyncio.CancelledError)]
    leaf = leaves[0] if leaves else error
    if isinstance(leaf, McpUnavailableError):
        return leaf
    if isinstance(leaf, httpx.HTTPStatusError):
        status = leaf.response.status_code
        if status in (401, 403):
            return McpUnavailableError(f"HTTP {status}: check the token/headers", auth=True)
        return McpUnavailableError(f"HTTP {status}")
    if isinstance(leaf, httpx.ConnectError | ConnectionError):
        return McpUnavailableError("cannot connect")
    if isinstance(leaf, httpx.TimeoutException | TimeoutError):
        return McpUnavailableError("no answer in time")
    if isinstance(leaf, httpx.HTTPError):
        return McpUnavailableError(f"HTTP error ({type(leaf).__name__})")
    if isinstance(leaf, McpError):
        return McpUnavailableError(f"server error: {_shorten(leaf.error.message)}")
    if isinstance(leaf, OSError) and settings.transport is McpTransport.STDIO:
        return McpUnavailableError(f"cannot run {settings.command}: {leaf.strerror or leaf}")
    return McpUnavailableError(f"failed: {type(leaf).__name__}")


def _classify(error: Exception) -> Retry | None:
    if isinstance(error, McpUnavailableError):
        return Retry.SLOWLY if error.auth else Retry.SOON
    return None


async def list_server_tools(
    settings: McpServer,
    *,
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    errlog: TextIO | None = None,
) -> list[McpTool]:
    """Connect once, list the (allowed) tools and disconnect; raise McpUnavailableError.

    The tools are for showing (`check`, `tools`): calling them says the server is unavailable.
    """
    source = McpToolSource(settings, errlog=errlog)
    try:
        async with asyncio.timeout(timeout_s):
            async with (
                _transport(settings, errlog) as (read, write),
                read,
                write,
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                return list(source._make_tools(await _list_tools(session)))
    except Exception as err:
        raise _unavailable(err, settings) from err


async def check_server(
    settings: McpServer,
    *,
    timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
    errlog: TextIO | None = None,
) -> SourceHealth:
    """Connect once and list the tools: a line for `xiaoai-bridge check`."""
    try:
        tools = await list_server_tools(settings, timeout_s=timeout_s, errlog=errlog)
    except McpUnavailableError as err:
        return SourceHealth(ok=False, detail=str(err))
    names = ", ".join(tool.remote_name for tool in tools)
    return SourceHealth(ok=True, detail=f"{len(tools)} tools" + (f": {names}" if names else ""))
