"""Web sink: answers to the status page's "ask" box, which the page shows as an observer."""

from __future__ import annotations

from xiaoai_bridge import adapters
from xiaoai_bridge.models import Answer, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.ports import Sink


class WebSink(Sink):
    """Delivers nowhere: the page follows every answer through the dispatcher's observers."""

    @property
    def name(self) -> str:
        """Answers the web source."""
        return adapters.WEB

    async def begin(self, utterance: Utterance) -> None:
        """Nothing to prepare."""

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """The status page shows it through its observer."""

    async def end(self, answer: Answer) -> None:
        """The status page shows it through its observer."""
