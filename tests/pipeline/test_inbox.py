"""The durable inbox: what is added survives a reopen until it is marked done."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xiaoai_bridge.models import HomeAssistantRoute, ReplyFormat, Utterance, XiaomiRoute
from xiaoai_bridge.pipeline.inbox import Inbox, decode_utterance, encode_utterance

names = st.text(max_size=12)
routes = st.one_of(
    st.none(),
    st.builds(HomeAssistantRoute, media_player=names, sensor=names, timestamp=names),
    st.builds(XiaomiRoute, device_id=names, hardware=names, miot_did=names, name=names),
)
utterances = st.builds(
    Utterance,
    text=st.text(max_size=50),
    device=st.text(min_size=1, max_size=20),
    id=st.one_of(st.text(max_size=10), st.integers(-(2**53), 2**53)),
    source=st.sampled_from(["mqtt", "homeassistant", "xiaomi"]),
    reply_format=st.sampled_from(list(ReplyFormat)),
    rejected=st.sampled_from(["", "too_long", "bad_input"]),
    said_at=st.one_of(st.none(), st.floats(0, 2e9)),
    route=routes,
    xiaoai_answer=st.text(max_size=8),
)


@given(utterances)
def test_an_utterance_survives_the_round_trip(utterance: Utterance) -> None:
    assert decode_utterance(encode_utterance(utterance)) == utterance


async def test_entries_survive_a_reopen_until_done(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    box = Inbox(path, clock=lambda: 123.0)
    box.open()
    first = box.add(Utterance("问题一", device="d1", id=1))
    box.add(Utterance("问题二", device="d2", id=2))
    await box.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # questions are private

    box.open()
    pending = box.pending()
    assert [(e.utterance.text, e.accepted) for e in pending] == [
        ("问题一", 123.0),
        ("问题二", 123.0),
    ]
    box.done(first.id)
    await box.close()
    box.open()
    assert [e.utterance.id for e in box.pending()] == [2]
    await box.close()


async def test_an_unreadable_row_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "inbox.sqlite3"
    box = Inbox(path)
    box.open()
    box.add(Utterance("好的", id="ok"))
    await box.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO inbox (accepted, utterance) VALUES (1, '{not json')")
    box.open()
    assert [e.utterance.id for e in box.pending()] == ["ok"]
    await box.close()
    box.open()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT COUNT(*) FROM inbox").fetchone()
    assert rows == (1,)  # the bad row is gone, the good one stays
    await box.close()


def old_row(source: str, extra: dict[str, str]) -> str:
    """An inbox row as written before routes were typed: a free-form `extra` dict."""
    return json.dumps(
        {
            "text": "问题",
            "device": "d1",
            "id": "q1",
            "source": source,
            "reply_format": "plain",
            "rejected": "",
            "said_at": 1.5,
            "extra": extra,
        }
    )


def test_a_row_of_the_old_format_keeps_its_route() -> None:
    home = decode_utterance(
        old_row(
            "homeassistant",
            {
                "media_player": "media_player.lx06",
                "sensor": "sensor.lx06_conversation",
                "timestamp": "2026-11-29T12:00:00+00:00",
                "xiaoai_answer": "今天晴",
            },
        )
    )
    assert home.route == HomeAssistantRoute(
        media_player="media_player.lx06",
        sensor="sensor.lx06_conversation",
        timestamp="2026-11-29T12:00:00+00:00",
    )
    assert home.xiaoai_answer == "今天晴"
    xiaomi = decode_utterance(
        old_row(
            "xiaomi",
            {"device_id": "dev-1", "hardware": "LX06", "miot_did": "123", "name": "小爱音箱Pro"},
        )
    )
    assert xiaomi.route == XiaomiRoute(
        device_id="dev-1", hardware="LX06", miot_did="123", name="小爱音箱Pro"
    )
    assert xiaomi.xiaoai_answer == ""
    plain = decode_utterance(old_row("mqtt", {}))
    assert (plain.route, plain.text, plain.said_at) == (None, "问题", 1.5)


@pytest.mark.parametrize(
    "route",
    [{"kind": "zigbee", "device_id": "x"}, {"kind": "xiaomi", "device_id": "x"}, "xiaomi"],
)
def test_an_unreadable_route_is_an_error(route: object) -> None:
    row = json.loads(encode_utterance(Utterance("问题", id="q1")))
    row["route"] = route
    with pytest.raises((ValueError, KeyError, TypeError)):
        decode_utterance(json.dumps(row))
