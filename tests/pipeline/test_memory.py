"""Conversation memory: bounds, persistence, isolation between devices."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from xiaoai_bridge.llm.base import ChatMessage
from xiaoai_bridge.models import SpeakerId
from xiaoai_bridge.pipeline.memory import (
    ConversationMemory,
    estimate_tokens,
    source_of_legacy_device,
)


def open_memory(
    path: Path | None, *, max_turns: int = 3, max_tokens: int = 1000
) -> ConversationMemory:
    memory = ConversationMemory(path, max_turns=max_turns, max_tokens=max_tokens)
    memory.open()
    return memory


async def test_keeps_the_last_turns_in_order() -> None:
    memory = open_memory(None, max_turns=2)
    for n in range(4):
        await memory.remember(SpeakerId("mqtt", "kitchen"), f"q{n}", f"a{n}")
    assert await memory.history(SpeakerId("mqtt", "kitchen")) == [
        ChatMessage("user", "q2"),
        ChatMessage("assistant", "a2"),
        ChatMessage("user", "q3"),
        ChatMessage("assistant", "a3"),
    ]
    memory.close()


async def test_token_budget_drops_the_oldest_turns_first() -> None:
    memory = open_memory(None, max_turns=10, max_tokens=25)
    await memory.remember(SpeakerId("mqtt", "d"), "旧" * 10, "旧" * 10)  # 20 tokens
    await memory.remember(SpeakerId("mqtt", "d"), "新" * 5, "新" * 5)  # 10 tokens
    history = await memory.history(SpeakerId("mqtt", "d"))
    assert [m.content for m in history] == ["新" * 5, "新" * 5]
    memory.close()


async def test_devices_are_separate_and_forget_clears_one() -> None:
    memory = open_memory(None)
    await memory.remember(SpeakerId("mqtt", "a"), "qa", "aa")
    await memory.remember(SpeakerId("mqtt", "b"), "qb", "ab")
    assert await memory.forget(SpeakerId("mqtt", "a")) == 1
    assert await memory.history(SpeakerId("mqtt", "a")) == []
    assert len(await memory.history(SpeakerId("mqtt", "b"))) == 2
    memory.close()


async def test_persists_across_reopen_with_private_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "memory.sqlite3"
    memory = open_memory(path)
    await memory.remember(SpeakerId("mqtt", "d"), "你好", "你好呀")
    memory.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = open_memory(path)
    assert await again.history(SpeakerId("mqtt", "d")) == [
        ChatMessage("user", "你好"),
        ChatMessage("assistant", "你好呀"),
    ]
    again.close()


async def test_zero_turns_disables_memory() -> None:
    memory = open_memory(None, max_turns=0)
    await memory.remember(SpeakerId("mqtt", "d"), "q", "a")
    assert await memory.history(SpeakerId("mqtt", "d")) == []
    memory.close()


def test_token_estimate_counts_cjk_per_character() -> None:
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("hello world!") == 3
    assert estimate_tokens("") == 0


async def test_one_device_name_on_two_sources_is_two_speakers() -> None:
    memory = open_memory(None)
    mqtt, ha = SpeakerId("mqtt", "media_player.x"), SpeakerId("homeassistant", "media_player.x")
    await memory.remember(ha, "家里的问题", "家里的回答")
    assert await memory.history(mqtt) == []  # a JSON question naming HA's speaker sees nothing
    assert await memory.forget(mqtt) == 0  # and cannot wipe it
    assert len(await memory.history(ha)) == 2
    memory.close()


async def test_rows_from_before_sources_migrate_to_the_source_their_device_names(
    tmp_path: Path,
) -> None:
    path = tmp_path / "memory.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE turns (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, "
            "question TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL);"
            "CREATE INDEX turns_by_device ON turns (device, id);"
        )
        rows = [
            ("media_player.xiaomi_lx06", "q1", "a1"),
            ("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0", "q2", "a2"),
            ("default", "q3", "a3"),
        ]
        db.executemany(
            "INSERT INTO turns (device, question, answer, created) VALUES (?, ?, ?, 0)", rows
        )
    memory = open_memory(path)
    expected = {
        SpeakerId("homeassistant", "media_player.xiaomi_lx06"): "q1",
        SpeakerId("xiaomi", "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"): "q2",
        SpeakerId("mqtt", "default"): "q3",
    }
    for speaker, question in expected.items():
        assert [m.content for m in await memory.history(speaker)] == [question, "a" + question[1:]]
    memory.close()
    assert source_of_legacy_device("kitchen") == "mqtt"


async def test_the_database_keeps_only_the_last_turns_of_each_speaker(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    memory = open_memory(path, max_turns=3)
    a, b = SpeakerId("mqtt", "a"), SpeakerId("mqtt", "b")
    for n in range(7):  # written in batches on the memory thread, trimmed per batch
        await memory.remember(a, f"qa{n}", f"aa{n}")
        await memory.remember(b, f"qb{n}", f"ab{n}")
    memory.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT device, question FROM turns ORDER BY id").fetchall()
    assert rows == [(d, f"q{d}{n}") for n in (4, 5, 6) for d in "ab"]
