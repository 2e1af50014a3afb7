"""The pipeline's tool ports: what a tool and a tool source look like to its tool loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from xiaoai_bridge.llm.base import ToolSpec
from xiaoai_bridge.models import SpeakerId, Utterance


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Who is asking: the utterance (its speaker and route) a tool call serves."""

    utterance: Utterance

    @property
    def speaker(self) -> SpeakerId:
        """The speaker that asked."""
        return self.utterance.speaker


class ToolError(Exception):
    """A tool could not do what was asked; `str(err)` is told to the model, so keep it short.

    Raised for expected failures (an entity that is not exposed, a service that refused,
    bad arguments); the loop turns it into the call's result and the model apologises.
    """


@dataclass(frozen=True, slots=True)
class NeedsConfirmation:
    """A call that must not run before the user says yes (locks, alarm panels, garage doors).

    The loop speaks `prompt` ("确定要打开前门锁吗？") and ends the answer; if the same speaker's
    next words confirm, `action` runs and the text it returns is spoken.
    """

    prompt: str
    action: Callable[[], Awaitable[str]]


# A call's result: text for the model, or a question for the user first.
ToolOutput = str | NeedsConfirmation


class Tool(Protocol):
    """One function offered to the model."""

    @property
    def spec(self) -> ToolSpec:
        """Its name (unique among offered tools), description and JSON schema."""
        ...

    def offered_to(self, context: ToolContext) -> bool:
        """Whether this question may use it (e.g. XiaoAi's skills need a speaker route)."""
        ...

    async def call(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        """Run it; raise ToolError for an expected failure. The loop applies the timeout."""
        ...


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """What `check`, /healthz and the status page say about a tool source."""

    ok: bool
    detail: str


class ToolSource(Protocol):
    """Where tools come from; its list may change while running (an MCP server going away).

    A source that keeps a connection is a ConnectedToolSource.
    """

    @property
    def name(self) -> str:
        """Short name shown with each tool ("homeassistant", "mcp:search", "builtin")."""
        ...

    def tools(self) -> Sequence[Tool]:
        """The tools available right now; empty while the source is down."""
        ...

    def health(self) -> SourceHealth:
        """Up or down, in a line."""
        ...


@runtime_checkable
class ConnectedToolSource(ToolSource, Protocol):
    """A tool source with a connection to keep; the app runs `run` as task "tools:<name>"."""

    async def run(self) -> None:
        """Connect, keep the tool list fresh, reconnect with backoff; return only when cancelled."""
        ...
