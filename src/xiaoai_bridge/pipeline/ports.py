"""The pipeline's ports: the Sink protocol it drives, which every sink adapter implements."""

from __future__ import annotations

from typing import Protocol

from xiaoai_bridge.models import Answer, SpeechChunk, Utterance


class Sink(Protocol):
    """Receives one answer's life cycle: begin, its chunks in order, end.

    Calls for one device arrive in order and never overlap; calls for different devices may
    interleave. A sink must not block the pipeline for long: pacing speech belongs in the
    sink's own per-device queue.
    """

    @property
    def name(self) -> str:
        """Registry key; matches the `Utterance.source` (an `adapters` name) it answers."""
        ...

    async def begin(self, utterance: Utterance) -> None:
        """A question was accepted for answering (e.g. silence XiaoAi, cancel stale speech)."""
        ...

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """One sentence is ready to be spoken."""
        ...

    async def end(self, answer: Answer) -> None:
        """The answer is complete (or the utterance was ignored or failed)."""
        ...
