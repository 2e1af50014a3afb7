"""The durable inbox: what is added survives a reopen until it is marked done."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from xiaoai_bridge.models import ReplyFormat, Utterance
from xiaoai_bridge.pipeline.inbox import Inbox, decode_utterance, encode_utterance

utterances = st.builds(
    Utterance,
    text=st.text(max_size=50),
    device=st.text(min_size=1, max_size=20),
    id=st.one_of(st.text(max_size=10), st.integers(-(2**53), 2**53)),
    source=st.sampled_from(["mqtt", "homeassistant", "xiaomi"]),
    reply_format=st.sampled_from(list(ReplyFormat)),
    rejected=st.sampled_from(["", "too_long", "bad_input"]),
    said_at=st.one_of(st.none(), st.floats(0, 2e9)),
    extra=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)


@given(utterances)
def test_an_utterance_survives_the_round_trip(utterance: Utterance) -> None:
    assert decode_utterance(encode_utterance(utterance)) == utterance


async def test_entries_survive_a_reopen_until_done(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    box = Inbox(path, clock=lambda: 123.0)
    await box.open()
    first = box.add(Utterance("问题一", device="d1", id=1))
    box.add(Utterance("问题二", device="d2", id=2))
    await box.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # questions are private

    await box.open()
    pending = box.pending()
    assert [(e.utterance.text, e.accepted) for e in pending] == [
        ("问题一", 123.0),
        ("问题二", 123.0),
    ]
    box.done(first.id)
    await box.close()
    await box.open()
    assert [e.utterance.id for e in box.pending()] == [2]
    await box.close()


async def test_an_unreadable_row_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    box = Inbox(path)
    await box.open()
    box.add(Utterance("好的", id="ok"))
    await box.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO inbox (accepted, utterance) VALUES (1, '{not json')")
    await box.open()
    assert [e.utterance.id for e in box.pending()] == ["ok"]
    await box.close()
    await box.open()
    assert box.count() == 1  # the bad row is gone, the good one stays
    await box.close()
