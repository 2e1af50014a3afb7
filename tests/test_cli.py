"""The command line's brief start of tool sources, for `tools` and `check`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tests.pipeline.test_tool_loop import FunctionTool, Shelf
from xiaoai_bridge.cli import one_line, start_briefly
from xiaoai_bridge.pipeline.tool_ports import SourceHealth, Tool, ToolOutput
from xiaoai_bridge.pipeline.toolbox import Toolbox


async def found(arguments: Mapping[str, object]) -> ToolOutput:
    return "found"


@dataclass
class Server:
    """A tool source with a connection: up once `run` has connected, when `reachable`."""

    name: str
    reachable: bool = True
    breaks: bool = False
    connected: bool = False
    stopped: bool = False
    items: list[Tool] = field(default_factory=list)

    def tools(self) -> Sequence[Tool]:
        return self.items if self.connected else []

    def health(self) -> SourceHealth:
        if self.connected:
            return SourceHealth(True, "connected")
        return SourceHealth(False, "connection refused; retrying in 5 s")

    async def run(self) -> None:
        try:
            await asyncio.sleep(0)  # connecting takes a turn of the loop at least
            if self.breaks:
                raise RuntimeError("the SDK broke")
            self.connected = self.reachable
            await asyncio.Event().wait()
        finally:
            self.connected = False
            self.stopped = True


async def test_sources_are_reported_while_running_then_stopped() -> None:
    toolbox = Toolbox()
    shelf = Shelf("builtin")
    shelf.add("get_time", found)
    search = Server("mcp:search", items=[FunctionTool("web_search", found)])
    toolbox.add(shelf)
    toolbox.add(search)
    reports = await start_briefly(toolbox, wait_s=30)
    # Everything came up: no need to wait out the 30 s.
    assert [(r.name, r.health.ok, [e.tool.spec.name for e in r.tools]) for r in reports] == [
        ("builtin", True, ["get_time"]),
        ("mcp:search", True, ["web_search"]),
    ]
    assert search.stopped
    assert search.tools() == []  # it offers nothing once stopped: the report was taken before


async def test_a_source_that_stays_down_or_breaks_says_why() -> None:
    toolbox = Toolbox()
    away = Server("mcp:away", reachable=False, items=[FunctionTool("away_tool", found)])
    broken = Server("mcp:broken", breaks=True)
    toolbox.add(away)
    toolbox.add(broken)
    reports = await start_briefly(toolbox, wait_s=0.3)
    assert [(r.name, r.health, r.tools) for r in reports] == [
        ("mcp:away", SourceHealth(False, "connection refused; retrying in 5 s"), ()),
        ("mcp:broken", SourceHealth(False, "stopped: the SDK broke"), ()),
    ]
    assert away.stopped
    assert broken.stopped


def test_descriptions_are_one_short_line_without_terminal_controls() -> None:
    hostile = "\x1b]0;pwned\x07Search\x1b[2J the web.\nSecond line."
    assert one_line(hostile) == " ]0;pwned Search [2J the web."
    assert one_line("x" * 300) == "x" * 99 + "…"
    assert one_line("") == ""
