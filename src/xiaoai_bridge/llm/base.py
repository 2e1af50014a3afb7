"""The ChatBackend seam: one async generator per provider family."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a chat-completions conversation."""

    role: Role
    content: str


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
