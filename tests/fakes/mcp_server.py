"""A real MCP server built with the `mcp` SDK, over stdio, Streamable HTTP or SSE, for tests.

Run as a program: `python mcp_server.py stdio` or `python mcp_server.py http|sse --fd N`
(serving on an inherited listening socket), with `--token`/`--header` to demand credentials.
`McpHttpServer` starts and kills the HTTP one from a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import ImageContent, TextContent

SCRIPT = Path(__file__)
TOKEN = "mcp-test-token-7f3a9c"
API_KEY_HEADER = "X-Api-Key"
API_KEY = "mcp-test-key-52e1b0"


def build_server(*, stateless: bool = False) -> FastMCP:
    """The server and its tools; stateless: JSON answers and no session, as Home Assistant's."""
    server = FastMCP("fake", stateless_http=stateless, json_response=stateless)

    @server.tool(description="Repeat the text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="Always fails with the given message.")
    def fail(message: str) -> str:
        raise ToolError(message)

    @server.tool(description="Kills the server in the middle of the call.")
    def die() -> str:
        os.kill(os.getpid(), signal.SIGKILL)
        return "unreachable"

    @server.tool(description="The server's process id.")
    def pid() -> int:
        return os.getpid()

    @server.tool(description="A picture and a caption.")
    def picture() -> list[TextContent | ImageContent]:
        return [
            TextContent(type="text", text="a red square"),
            ImageContent(type="image", data="iVBORw0KGgo=", mimeType="image/png"),
        ]

    @server.tool(description="Never answers (until the client cancels the call).")
    async def hang() -> str:
        await anyio.sleep_forever()
        return "unreachable"

    @server.tool(description="Adds the tool 'late' and says the tool list changed.")
    async def grow(ctx: Context) -> str:  # type: ignore[type-arg]
        def late() -> str:
            return "late tool"

        server.add_tool(late, name="late", description="Added while running.")
        await ctx.session.send_tool_list_changed()
        return "grown"

    return server


def _checked(app: Any, token: str | None, headers: dict[str, str]) -> Any:
    """`app` answering 401 to any request without the bearer token and headers asked for."""
    expected = dict(headers)
    if token:
        expected["authorization"] = f"Bearer {token}"
    expected = {name.lower(): value for name, value in expected.items()}

    async def checked(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            sent = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
            if any(sent.get(name) != value for name, value in expected.items()):
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
        await app(scope, receive, send)

    return checked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http", "sse"])
    parser.add_argument("--fd", type=int)
    parser.add_argument("--token")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--stateless", action="store_true")
    args = parser.parse_args()
    server = build_server(stateless=args.stateless)
    if args.transport == "stdio":
        server.run("stdio")
        return
    app = server.streamable_http_app() if args.transport == "http" else server.sse_app()
    headers = dict(item.split("=", 1) for item in args.header)
    config = uvicorn.Config(_checked(app, args.token, headers), log_level="warning")
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


class McpHttpServer:
    """The server over Streamable HTTP (or SSE) in a subprocess on a fixed loopback port.

    The port is bound (not listening) from the start: before `start()` connections are
    refused, as with a server that is down; `kill()` makes it so again.
    """

    def __init__(
        self,
        transport: str = "http",
        *,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
        stateless: bool = False,
    ) -> None:
        self._transport = transport
        self._stateless = stateless
        self._token = token
        self._headers = {API_KEY_HEADER: API_KEY} if headers is None else headers
        self._socket = self._bind(0)
        self.port: int = self._socket.getsockname()[1]
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Where the client connects."""
        path = "/mcp" if self._transport == "http" else "/sse"
        return f"http://127.0.0.1:{self.port}{path}"

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    def start(self) -> None:
        """Serve: connections made from now on are accepted (queued until the server runs)."""
        if self._socket.fileno() == -1:
            self._socket = self._bind(self.port)
        self._socket.listen(16)
        command = [sys.executable, str(SCRIPT), self._transport, "--fd", str(self._socket.fileno())]
        if self._stateless:
            command.append("--stateless")
        if self._token:
            command += ["--token", self._token]
        command += [f"--header={name}={value}" for name, value in self._headers.items()]
        self._process = subprocess.Popen(command, pass_fds=[self._socket.fileno()])  # noqa: S603
        # The child holds the socket now: when it dies, the port refuses connections again.
        self._socket.close()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        """Kill the server if it runs and release the port."""
        self.kill()
        self._socket.close()


if __name__ == "__main__":
    main()
