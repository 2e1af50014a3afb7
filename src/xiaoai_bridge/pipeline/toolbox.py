"""The tools on offer: every tool source's current list, unique names, per question."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from xiaoai_bridge.pipeline.tool_ports import SourceHealth, Tool, ToolContext, ToolSource

_LOGGER = logging.getLogger(__name__)

# OpenAI's rule for function names; other providers follow it.
TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class OfferedTool:
    """A tool with the name of the source it came from."""

    tool: Tool
    source: str


@dataclass(frozen=True, slots=True)
class SourceReport:
    """A tool source as `check`, /healthz, /metrics and the status page show it."""

    name: str
    health: SourceHealth
    # What it offers right now, after the toolbox's name checks.
    tools: tuple[OfferedTool, ...]


class Toolbox:
    """The tool sources, in the order they were added; the first source wins a name clash."""

    def __init__(self) -> None:
        self._sources: list[ToolSource] = []
        # Names already warned about, so a clash or bad name is logged once, not per question.
        self._warned: set[str] = set()

    def add(self, source: ToolSource) -> None:
        """Offer this source's tools from now on."""
        self._sources.append(source)

    @property
    def sources(self) -> Sequence[ToolSource]:
        """Every source, up or down."""
        return tuple(self._sources)

    def health(self) -> dict[str, SourceHealth]:
        """Each source's state, by name."""
        return {source.name: source.health() for source in self._sources}

    def report(self) -> list[SourceReport]:
        """Each source with its state and the tools it offers now, in the order added."""
        listed = self.listing()
        return [
            SourceReport(
                source.name,
                source.health(),
                tuple(entry for entry in listed if entry.source == source.name),
            )
            for source in self._sources
        ]

    def listing(self) -> list[OfferedTool]:
        """Every tool that could be offered right now, whatever the question."""
        found: dict[str, OfferedTool] = {}
        for source in self._sources:
            for tool in source.tools():
                name = tool.spec.name
                if not TOOL_NAME_RE.fullmatch(name):
                    self._warn_once(
                        f"bad:{name}",
                        "tool %r of %s has an invalid name: skipped",
                        name,
                        source.name,
                    )
                elif name in found:
                    self._warn_once(
                        f"clash:{name}",
                        "tool %r of %s clashes with %s's: skipped",
                        name,
                        source.name,
                        found[name].source,
                    )
                else:
                    found[name] = OfferedTool(tool, source.name)
        return list(found.values())

    def offered(self, context: ToolContext) -> dict[str, OfferedTool]:
        """The tools this question may use, by name."""
        return {
            entry.tool.spec.name: entry
            for entry in self.listing()
            if entry.tool.offered_to(context)
        }

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _LOGGER.warning(message, *args)
