"""The Source seam: anything that hears utterances (MQTT, Home Assistant, Xiaomi cloud)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from xiaoai_bridge.models import Utterance


class Source(Protocol):
    """Yields utterances for as long as it runs; reconnects on its own.

    `name` is also the key of the sink that answers this source's utterances
    (`Utterance.source` carries it).
    """

    @property
    def name(self) -> str:
        """Registry key, e.g. "mqtt" or "homeassistant"."""
        ...

    def utterances(self) -> AsyncIterator[Utterance]:
        """Every utterance heard, forever; cancelled on shutdown."""
        ...
