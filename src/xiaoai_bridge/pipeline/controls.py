"""The switches every way of asking shares: answering on/off, and forgetting a conversation."""

from __future__ import annotations

import logging
from collections.abc import Callable

from xiaoai_bridge.models import SpeakerId
from xiaoai_bridge.pipeline.memory import ConversationMemory

_LOGGER = logging.getLogger(__name__)

AnsweringListener = Callable[[bool], None]
# (speaker, turns forgotten)
ForgetListener = Callable[[SpeakerId, int], None]


class Controls:
    """One owner for the shared switches, whoever asks: a voice command, the status page, HA.

    Whoever shows a switch (the status page, Home Assistant's entities) listens here, so every
    view stays in step with a change made through any other.
    """

    def __init__(self, memory: ConversationMemory) -> None:
        self._memory = memory
        self._answering = True
        self._answering_listeners: list[AnsweringListener] = []
        self._forget_listeners: list[ForgetListener] = []

    @property
    def answering(self) -> bool:
        """False while the bridge leaves every question to XiaoAi."""
        return self._answering

    def set_answering(self, on: bool, *, by: str) -> None:
        """Switch answering on or off; `by` says who asked, for the log."""
        self._answering = on
        _LOGGER.info("answering switched %s by %s", "on" if on else "off", by)
        for listener in list(self._answering_listeners):
            self._tell(listener, on)

    def on_answering(self, listener: AnsweringListener) -> None:
        """Call `listener(on)` after every switch, whoever asked."""
        self._answering_listeners.append(listener)

    async def forget(self, speaker: SpeakerId, *, by: str) -> int:
        """Drop `speaker`'s conversation; how many turns were dropped."""
        turns = await self._memory.forget(speaker)
        _LOGGER.info("forgot %d turns of %s's conversation (asked by %s)", turns, speaker, by)
        for listener in list(self._forget_listeners):
            self._tell(listener, speaker, turns)
        return turns

    def on_forget(self, listener: ForgetListener) -> None:
        """Call `listener(speaker, turns)` after every forget, whoever asked."""
        self._forget_listeners.append(listener)

    @staticmethod
    def _tell(listener: Callable[..., None], *args: object) -> None:
        # A view that fails to update is its own problem: the switch itself has changed.
        try:
            listener(*args)
        except Exception:
            _LOGGER.exception("a listener of the shared switches failed")
