"""Conversation memory per speaker, persisted in SQLite so a restart keeps it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from xiaoai_bridge.errors import DataDirError
from xiaoai_bridge.llm.base import ChatMessage
from xiaoai_bridge.models import SpeakerId
from xiaoai_bridge.spoken import is_wide

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
# Speakers whose recent turns stay in memory; beyond it the least recently active are read
# from disk again when they next speak.
MAX_CACHED_SPEAKERS = 1_024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL DEFAULT '',
    device TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL
);
"""
_INDEX = "CREATE INDEX IF NOT EXISTS turns_by_speaker ON turns (source, device, id);"
# Rows written before memory was kept per (source, device) name only a device. Whose it was
# shows in the name: Home Assistant entity ids, Xiaomi's device UUIDs, the rest MQTT's.
_XIAOMI_DEVICE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def source_of_legacy_device(device: str) -> str:
    """The source a device of a pre-(source, device) memory row most likely belongs to."""
    if device.startswith(("media_player.", "sensor.")):
        return "homeassistant"
    if _XIAOMI_DEVICE_ID.fullmatch(device.lower()):
        return "xiaomi"
    return "mqtt"


def estimate_tokens(text: str) -> int:
    """Rough token count: a CJK character is about one token, other text about four chars."""
    wide = sum(1 for char in text if is_wide(char))
    return wide + (len(text) - wide + 3) // 4


class ConversationMemory:
    """The last turns of each speaker's conversation, bounded by turns and by tokens.

    The async methods run on one thread of their own, in call order: a slow disk (an SD
    card during a checkpoint) never stalls the event loop that carries every answer.
    """

    def __init__(self, path: Path | None, *, max_turns: int, max_tokens: int) -> None:
        self._path = path
        self._max_turns = max_turns
        self._max_tokens = max_tokens
        self._db: sqlite3.Connection | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        # Turns waiting to be written, and whether a batch job is queued or running.
        self._writes: list[tuple[SpeakerId, str, str, float]] = []
        self._writes_lock = threading.Lock()
        self._writing = False
        # The turns of recently active speakers, oldest first: most questions need no read.
        self._recent: OrderedDict[SpeakerId, list[tuple[str, str]]] = OrderedDict()

    def open(self) -> None:
        """Create or open the database (":memory:" when no path was given)."""
        try:
            if self._path is not None:
                self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(
                str(self._path or ":memory:"), isolation_level=None, check_same_thread=False
            )
            if self._path is not None:
                self._path.chmod(0o600)  # conversations are private
            # WAL + NORMAL: a commit costs no fsync; a power cut may lose the last turn only.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate(self._db)
            self._db.execute(_INDEX)
        except (sqlite3.Error, OSError) as err:
            self.close()
            raise _open_error(self._path, err) from err
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memory")

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        columns = {row[1] for row in db.execute("PRAGMA table_info(turns)")}
        if "source" in columns:
            return
        db.execute("BEGIN")
        db.execute("ALTER TABLE turns ADD COLUMN source TEXT NOT NULL DEFAULT ''")
        db.execute("DROP INDEX IF EXISTS turns_by_device")
        devices = [row[0] for row in db.execute("SELECT DISTINCT device FROM turns")]
        for device in devices:
            db.execute(
                "UPDATE turns SET source = ? WHERE device = ?",
                (source_of_legacy_device(device), device),
            )
        db.execute("COMMIT")
        if devices:
            _LOGGER.info("memory: %d speakers' turns now kept per source and device", len(devices))

    def close(self) -> None:
        """Finish pending writes and close the database."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def enabled(self) -> bool:
        """False when configured to remember nothing."""
        return self._max_turns > 0

    async def history(self, speaker: SpeakerId) -> list[ChatMessage]:
        """The remembered turns, oldest first, within the turn and token budgets."""
        if not self.enabled:
            return []
        turns = self._recent.get(speaker)
        if turns is None:
            turns = await self._run(self._load, speaker)
            self._keep(speaker, turns)
        else:
            self._recent.move_to_end(speaker)
        return self._within_budget(turns)

    async def remember(self, speaker: SpeakerId, question: str, answer: str) -> None:
        """Store one turn and drop the ones beyond the turn budget.

        The write is queued on the memory's thread, not awaited: the next question of this
        speaker reads the turns kept in memory, and queued writes run in order.
        """
        if not self.enabled:
            return
        turns = self._recent.get(speaker)
        if turns is not None:
            turns.append((question, answer))
            del turns[: -self._max_turns]
        with self._writes_lock:
            self._writes.append((speaker, question, answer, time.time()))
            if self._writing:
                return  # the running batch takes it
            self._writing = True
        self._submit(self._write_batches)

    async def forget(self, speaker: SpeakerId) -> int:
        """Clear a speaker's conversation; return how many turns were dropped."""
        self._recent.pop(speaker, None)
        return await self._run(self._forget, speaker)

    async def _run(self, call: Callable[..., _T], *args: object) -> _T:
        return await asyncio.wrap_future(self._submit(call, *args))

    def _submit(self, call: Callable[..., _T], *args: object) -> concurrent.futures.Future[_T]:
        if self._thread is None:
            raise RuntimeError("ConversationMemory used before open()")
        future = self._thread.submit(call, *args)
        future.add_done_callback(_log_failure)
        return future

    def _keep(self, speaker: SpeakerId, turns: list[tuple[str, str]]) -> None:
        self._recent[speaker] = turns
        while len(self._recent) > MAX_CACHED_SPEAKERS:
            self._recent.popitem(last=False)

    def _load(self, speaker: SpeakerId) -> list[tuple[str, str]]:
        rows = (
            self._conn()
            .execute(
                "SELECT question, answer FROM turns WHERE source = ? AND device = ? "
                "ORDER BY id DESC LIMIT ?",
                (speaker.source, speaker.device, self._max_turns),
            )
            .fetchall()
        )
        return [(question, answer) for question, answer in reversed(rows)]

    def _within_budget(self, turns: list[tuple[str, str]]) -> list[ChatMessage]:
        kept: list[tuple[str, str]] = []
        budget = self._max_tokens
        for question, answer in reversed(turns):  # newest first: recent turns matter most
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

    def _write_batches(self) -> None:
        # On the memory thread: every turn queued meanwhile goes in one transaction, so a
        # busy bridge pays one thread hand-over and one commit per batch, not per answer.
        while True:
            with self._writes_lock:
                batch, self._writes = self._writes, []
                if not batch:
                    self._writing = False
                    return
            db = self._conn()
            db.execute("BEGIN")
            try:
                for speaker, question, answer, created in batch:
                    self._insert(db, speaker, question, answer, created)
            finally:
                db.execute("COMMIT")

    def _insert(
        self, db: sqlite3.Connection, speaker: SpeakerId, question: str, answer: str, at: float
    ) -> None:
        key = (speaker.source, speaker.device)
        db.execute(
            "INSERT INTO turns (source, device, question, answer, created) VALUES (?, ?, ?, ?, ?)",
            (*key, question, answer, at),
        )
        db.execute(
            "DELETE FROM turns WHERE source = ? AND device = ? AND id NOT IN "
            "(SELECT id FROM turns WHERE source = ? AND device = ? ORDER BY id DESC LIMIT ?)",
            (*key, *key, self._max_turns),
        )

    def _forget(self, speaker: SpeakerId) -> int:
        cursor = self._conn().execute(
            "DELETE FROM turns WHERE source = ? AND device = ?", (speaker.source, speaker.device)
        )
        return cursor.rowcount

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("ConversationMemory used before open()")
        return self._db


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    error = None if future.cancelled() else future.exception()
    if error is not None:
        _LOGGER.warning("memory: a database call failed: %s", error)


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
