"""The ChatBackend seam: one async generator per provider family."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, overload

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One text message of a chat-completions conversation."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call: its name, what it does, a JSON schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model asked for; `arguments` is its JSON text, unparsed and unchecked."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """The calls the model asked for in one round; streamed last, once the round is finished."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class AssistantToolCalls:
    """The assistant's turn that asked for tool calls, sent back so the model sees its request."""

    calls: tuple[ToolCall, ...]
    content: str | None = None


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The outcome of one tool call as text, answering the call with id `tool_call_id`."""

    tool_call_id: str
    content: str


# Everything a conversation can hold once tools take part.
Message = ChatMessage | AssistantToolCalls | ToolResult
# What a tool round streams: text deltas, then at most one ToolCalls at the end.
RoundEvent = str | ToolCalls


class ChatBackend(Protocol):
    """Streams an answer as text deltas; raises LLMError with a short reason on failure."""

    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """Yield the answer's text as it is generated."""
        ...

    async def check(self) -> str:
        """Reach the provider once; return a one-line description or raise LLMError."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class ToolChatBackend(ChatBackend, Protocol):
    """A ChatBackend that can also offer tools to the model.

    With `tools`, `stream` yields text deltas as they come and, if the model asked for calls,
    one ToolCalls after the round finished; it raises LLMError("tools_unsupported") when the
    provider refuses `tools`, so the caller can ask again without them.
    """

    @overload
    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]: ...

    @overload
    def stream(
        self, messages: Sequence[Message], *, tools: Sequence[ToolSpec]
    ) -> AsyncIterator[RoundEvent]: ...
