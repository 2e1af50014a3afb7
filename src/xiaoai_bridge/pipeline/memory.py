"""Conversation memory per device, persisted in SQLite so a restart keeps it."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from xiaoai_bridge.errors import DataDirError
from xiaoai_bridge.llm.base import ChatMessage
from xiaoai_bridge.spoken import is_wide

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_device ON turns (device, id);
"""


def estimate_tokens(text: str) -> int:
    """Rough token count: a CJK character is about one token, other text about four chars."""
    wide = sum(1 for char in text if is_wide(char))
    return wide + (len(text) - wide + 3) // 4


class ConversationMemory:
    """The last turns of each device's conversation, bounded by turns and by tokens.

    Calls are synchronous: each is a single indexed SQLite statement on a local file,
    far cheaper than handing it to a thread.
    """

    def __init__(self, path: Path | None, *, max_turns: int, max_tokens: int) -> None:
        self._path = path
        self._max_turns = max_turns
        self._max_tokens = max_tokens
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        """Create or open the database (":memory:" when no path was given)."""
        try:
            if self._path is not None:
                self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(str(self._path or ":memory:"), isolation_level=None)
            if self._path is not None:
                self._path.chmod(0o600)  # conversations are private
            # WAL + NORMAL: a commit costs no fsync; a power cut may lose the last turn only.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as err:
            self.close()
            raise _open_error(self._path, err) from err

    def close(self) -> None:
        """Close the database."""
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def enabled(self) -> bool:
        """False when configured to remember nothing."""
        return self._max_turns > 0

    def history(self, device: str) -> list[ChatMessage]:
        """The remembered turns, oldest first, within the turn and token budgets."""
        if not self.enabled:
            return []
        rows = (
            self._conn()
            .execute(
                "SELECT question, answer FROM turns WHERE device = ? ORDER BY id DESC LIMIT ?",
                (device, self._max_turns),
            )
            .fetchall()
        )
        kept: list[tuple[str, str]] = []
        budget = self._max_tokens
        for question, answer in rows:  # newest first: the most recent turns matter most
            cost = estimate_tokens(question) + estimate_tokens(answer)
            if cost > budget:
                break
            budget -= cost
            kept.append((question, answer))
        messages: list[ChatMessage] = []
        for question, answer in reversed(kept):
            messages.append(ChatMessage("user", question))
            messages.append(ChatMessage("assistant", answer))
        return messages

    def remember(self, device: str, question: str, answer: str) -> None:
        """Store one turn and drop the ones beyond the turn budget."""
        if not self.enabled:
            return
        db = self._conn()
        db.execute("BEGIN")
        db.execute(
            "INSERT INTO turns (device, question, answer, created) VALUES (?, ?, ?, ?)",
            (device, question, answer, time.time()),
        )
        db.execute(
            "DELETE FROM turns WHERE device = ? AND id NOT IN "
            "(SELECT id FROM turns WHERE device = ? ORDER BY id DESC LIMIT ?)",
            (device, device, self._max_turns),
        )
        db.execute("COMMIT")

    def forget(self, device: str) -> int:
        """Clear a device's conversation; return how many turns were dropped."""
        cursor = self._conn().execute("DELETE FROM turns WHERE device = ?", (device,))
        return cursor.rowcount

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("ConversationMemory used before open()")
        return self._db


def _open_error(path: Path | None, err: sqlite3.Error | OSError) -> DataDirError:
    """What the user should do about a memory database that does not open."""
    if isinstance(err, sqlite3.Error) and err.sqlite_errorcode in (
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_CORRUPT,
    ):
        return DataDirError(
            f"the memory database {path} is damaged ({err}): move it aside and start again "
            "(it only holds recent conversations)"
        )
    reason = err.strerror if isinstance(err, OSError) else str(err)
    return DataDirError(
        f"the memory database {path} cannot be opened ({reason}): check that data_dir is a "
        "writable directory"
    )
