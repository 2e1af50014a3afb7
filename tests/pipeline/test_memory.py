"""Conversation memory: bounds, persistence, isolation between devices."""

from __future__ import annotations

import stat
from pathlib import Path

from xiaoai_bridge.llm.base import ChatMessage
from xiaoai_bridge.pipeline.memory import ConversationMemory, estimate_tokens


def open_memory(
    path: Path | None, *, max_turns: int = 3, max_tokens: int = 1000
) -> ConversationMemory:
    memory = ConversationMemory(path, max_turns=max_turns, max_tokens=max_tokens)
    memory.open()
    return memory


def test_keeps_the_last_turns_in_order() -> None:
    memory = open_memory(None, max_turns=2)
    for n in range(4):
        memory.remember("kitchen", f"q{n}", f"a{n}")
    assert memory.history("kitchen") == [
        ChatMessage("user", "q2"),
        ChatMessage("assistant", "a2"),
        ChatMessage("user", "q3"),
        ChatMessage("assistant", "a3"),
    ]
    memory.close()


def test_token_budget_drops_the_oldest_turns_first() -> None:
    memory = open_memory(None, max_turns=10, max_tokens=25)
    memory.remember("d", "旧" * 10, "旧" * 10)  # 20 tokens
    memory.remember("d", "新" * 5, "新" * 5)  # 10 tokens
    history = memory.history("d")
    assert [m.content for m in history] == ["新" * 5, "新" * 5]
    memory.close()


def test_devices_are_separate_and_forget_clears_one() -> None:
    memory = open_memory(None)
    memory.remember("a", "qa", "aa")
    memory.remember("b", "qb", "ab")
    assert memory.forget("a") == 1
    assert memory.history("a") == []
    assert len(memory.history("b")) == 2
    memory.close()


def test_persists_across_reopen_with_private_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "memory.sqlite3"
    memory = open_memory(path)
    memory.remember("d", "你好", "你好呀")
    memory.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = open_memory(path)
    assert again.history("d") == [ChatMessage("user", "你好"), ChatMessage("assistant", "你好呀")]
    again.close()


def test_zero_turns_disables_memory() -> None:
    memory = open_memory(None, max_turns=0)
    memory.remember("d", "q", "a")
    assert memory.history("d") == []
    memory.close()


def test_token_estimate_counts_cjk_per_character() -> None:
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("hello world!") == 3
    assert estimate_tokens("") == 0
