"""Web source: questions typed into the status page's "ask" box."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from xiaoai_bridge import adapters
from xiaoai_bridge.models import Utterance


class WebSource:
    """Hands each question asked on the status page to the dispatcher as it is asked.

    Not a pumped source: the HTTP request that asks is the event, and its 202 says the
    question was taken.
    """

    def __init__(
        self, submit: Callable[[Utterance], None], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._submit = submit
        self._clock = clock

    @property
    def name(self) -> str:
        """Answered by the web sink."""
        return adapters.WEB

    def ask(self, text: str, device: str) -> Utterance:
        """Take one question for `device`; the utterance as submitted."""
        utterance = Utterance(
            text=text,
            device=device,
            id=f"{adapters.WEB}-{uuid.uuid4().hex[:12]}",
            source=adapters.WEB,
            said_at=self._clock(),
        )
        self._submit(utterance)
        return utterance
