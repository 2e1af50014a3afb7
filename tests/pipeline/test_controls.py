"""The shared switches: one owner for answering and forgetting, every view told of a change."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from xiaoai_bridge.models import SpeakerId
from xiaoai_bridge.pipeline.controls import Controls
from xiaoai_bridge.pipeline.memory import ConversationMemory


@pytest.fixture
def memory() -> Iterator[ConversationMemory]:
    memory = ConversationMemory(None, max_turns=5, max_tokens=1000)
    memory.open()
    yield memory
    memory.close()


def test_every_view_hears_a_switch_whoever_made_it(memory: ConversationMemory) -> None:
    controls = Controls(memory)
    page: list[bool] = []
    home_assistant: list[bool] = []
    controls.on_answering(page.append)
    controls.on_answering(home_assistant.append)
    assert controls.answering is True
    controls.set_answering(False, by="Home Assistant")
    assert controls.answering is False
    controls.set_answering(True, by="the status page")
    assert page == home_assistant == [False, True]


async def test_forget_drops_one_conversation_and_tells_the_views(
    memory: ConversationMemory,
) -> None:
    controls = Controls(memory)
    told: list[tuple[SpeakerId, int]] = []
    controls.on_forget(lambda speaker, turns: told.append((speaker, turns)))
    kitchen, den = SpeakerId("homeassistant", "kitchen"), SpeakerId("mqtt", "den")
    await memory.remember(kitchen, "q1", "a1")
    await memory.remember(kitchen, "q2", "a2")
    await memory.remember(den, "q", "a")
    # The same device name on another adapter is another speaker: not forgotten.
    assert await controls.forget(SpeakerId("mqtt", "kitchen"), by="the status page") == 0
    assert await controls.forget(kitchen, by="voice") == 2
    assert await memory.history(kitchen) == []
    assert len(await memory.history(den)) == 2
    assert told == [(SpeakerId("mqtt", "kitchen"), 0), (kitchen, 2)]


def test_a_failing_view_neither_stops_the_switch_nor_the_others(
    memory: ConversationMemory, caplog: pytest.LogCaptureFixture
) -> None:
    controls = Controls(memory)

    def broken(_on: bool) -> None:
        raise RuntimeError("view gone")

    seen: list[bool] = []
    controls.on_answering(broken)
    controls.on_answering(seen.append)
    with caplog.at_level(logging.ERROR):
        controls.set_answering(False, by="voice")
    assert controls.answering is False
    assert seen == [False]
    assert "listener of the shared switches failed" in caplog.text
