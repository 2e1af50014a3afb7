"""Durable record of accepted questions: what the service owes an answer to, across kills."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xiaoai_bridge.models import (
    HomeAssistantRoute,
    ReplyFormat,
    Route,
    Utterance,
    XiaomiRoute,
)

_LOGGER = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    accepted REAL NOT NULL,
    utterance TEXT NOT NULL
);
"""
# Answered entries are deleted in batches: a kill between an answer and its batch costs a
# repeated answer on restart, never a lost one.
DONE_FLUSH_S = 0.05
# SQLite's bound on parameters per statement is far above this; batches stay small.
MAX_IDS_PER_DELETE = 500


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """An accepted utterance and when it was accepted (seconds since the epoch)."""

    id: int
    utterance: Utterance
    accepted: float

    def age(self, now: float) -> float:
        """Seconds since it was said (if the source knows) or else accepted."""
        return now - (self.utterance.said_at or self.accepted)


class Inbox:
    """Accepted utterances on disk until answered; `pending()` is what a restart resumes.

    `add` returns only once the row is committed, so a source may acknowledge the message
    then: a process killed at any later point finds the question here on restart.

    Writes run on the event loop on purpose: a WAL append without fsync takes ~25 us, while a
    hop to a thread costs more than that, and the broker keeps only a small window of
    unacknowledged questions in flight, so intake speed is what keeps its queue from
    overflowing in a burst.
    """

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._done: list[int] = []
        self._flusher: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Create or open the database (in memory when no path was given)."""
        self._db = sqlite3.connect(str(self._path or ":memory:"), isolation_level=None)
        if self._path is not None:
            self._path.chmod(0o600)  # questions are private
        # WAL + NORMAL: a commit survives a killed process (the OS has it); no fsync per row.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    async def close(self) -> None:
        """Write the last answered entries and close."""
        if self._flusher is not None:
            await self._flusher
        self._flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    def add(self, utterance: Utterance) -> InboxEntry:
        """Record an accepted utterance; returns once it is committed."""
        accepted = self._clock()
        cursor = self._connection.execute(
            "INSERT INTO inbox (accepted, utterance) VALUES (?, ?)",
            (accepted, encode_utterance(utterance)),
        )
        if cursor.lastrowid is None:  # sqlite3 always sets it after an INSERT
            raise RuntimeError("inbox insert returned no row id")
        return InboxEntry(cursor.lastrowid, utterance, accepted)

    def done(self, entry_id: int) -> None:
        """The entry is answered; its row goes in the next batch of deletions."""
        self._done.append(entry_id)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_soon(), name="inbox:flush")

    def pending(self) -> list[InboxEntry]:
        """Every entry not yet answered, oldest first; unreadable rows are dropped."""
        rows = self._connection.execute(
            "SELECT id, accepted, utterance FROM inbox ORDER BY id"
        ).fetchall()
        entries: list[InboxEntry] = []
        for row_id, accepted, text in rows:
            try:
                entries.append(InboxEntry(row_id, decode_utterance(text), accepted))
            except (ValueError, KeyError, TypeError) as err:
                _LOGGER.warning("inbox entry %d is unreadable, dropped: %s", row_id, err)
                self.done(row_id)
        return entries

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("inbox is not open")
        return self._db

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(DONE_FLUSH_S)
            self._flush()
        finally:
            self._flusher = None

    def _flush(self) -> None:
        while self._done and self._db is not None:
            batch, self._done = self._done[:MAX_IDS_PER_DELETE], self._done[MAX_IDS_PER_DELETE:]
            marks = ",".join("?" * len(batch))
            self._db.execute(f"DELETE FROM inbox WHERE id IN ({marks})", batch)  # noqa: S608


def encode_utterance(utterance: Utterance) -> str:
    """An utterance as JSON, for the inbox."""
    data: dict[str, Any] = {
        "text": utterance.text,
        "device": utterance.device,
        "id": utterance.id,
        "source": utterance.source,
        "reply_format": utterance.reply_format.value,
        "rejected": utterance.rejected,
        "said_at": utterance.said_at,
        "route": _encode_route(utterance.route),
        "xiaoai_answer": utterance.xiaoai_answer,
    }
    return json.dumps(data, ensure_ascii=False)


def decode_utterance(text: str) -> Utterance:
    """The inverse of `encode_utterance`; ValueError/KeyError/TypeError on bad rows."""
    data = json.loads(text)
    question_id = data["id"]
    if not isinstance(question_id, str | int):
        raise TypeError("id must be a string or an integer")
    said_at = data.get("said_at")
    if "extra" in data:  # a row written before routes were typed
        route, xiaoai_answer = _legacy_route(dict(data["extra"]))
    else:
        route, xiaoai_answer = _decode_route(data.get("route")), str(data.get("xiaoai_answer", ""))
    return Utterance(
        text=str(data["text"]),
        device=str(data["device"]),
        id=question_id,
        source=str(data["source"]),
        reply_format=ReplyFormat(data["reply_format"]),
        rejected=str(data.get("rejected", "")),
        said_at=float(said_at) if said_at is not None else None,
        route=route,
        xiaoai_answer=xiaoai_answer,
    )


_ROUTES: dict[str, type[Route]] = {route.kind: route for route in (HomeAssistantRoute, XiaomiRoute)}


def _encode_route(route: Route | None) -> dict[str, str] | None:
    if route is None:
        return None
    return {"kind": route.kind, **dataclasses.asdict(route)}


def _decode_route(data: Any) -> Route | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise TypeError("route must be an object")
    kind = _ROUTES.get(str(data.get("kind")))
    if kind is None:
        raise ValueError(f"unknown route kind {data.get('kind')!r}")
    return kind(**{field.name: str(data[field.name]) for field in dataclasses.fields(kind)})


def _legacy_route(extra: dict[Any, Any]) -> tuple[Route | None, str]:
    """The route and XiaoAi's answer of the free-form `extra` dict the sources used to write."""
    get = {str(key): str(value) for key, value in extra.items()}.get
    route: Route | None = None
    if get("media_player"):
        route = HomeAssistantRoute(
            media_player=get("media_player", ""),
            sensor=get("sensor", ""),
            timestamp=get("timestamp", ""),
        )
    elif get("device_id"):
        route = XiaomiRoute(
            device_id=get("device_id", ""),
            hardware=get("hardware", ""),
            miot_did=get("miot_did", ""),
            name=get("name", ""),
        )
    return route, get("xiaoai_answer", "")
