"""Tests for the subscribe_entities mirror: HA's compressed messages back to full states."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest

from tests.fakes.homeassistant_server import compressed_state, state_diff
from xiaoai_bridge.clients.homeassistant_entities import EntityMirror, valid_entity_id


def full_state(
    state: str, attributes: dict[str, Any], at: str, context: dict[str, Any]
) -> dict[str, Any]:
    return {
        "entity_id": "sensor.x",
        "state": state,
        "attributes": attributes,
        "last_changed": at,
        "last_updated": at,
        "context": context,
    }


CTX = {"id": "01A", "parent_id": None, "user_id": None}


def test_adds_and_diffs_rebuild_the_full_states() -> None:
    states = [
        full_state("1", {"a": 1, "b": 2}, "2026-07-20T00:00:00+00:00", CTX),
        # Attributes changed and one removed; state and last_changed kept.
        {
            **full_state("1", {"a": 3}, "2026-07-20T00:00:00+00:00", {**CTX, "id": "01B"}),
            "last_updated": "2026-07-20T00:00:01+00:00",
        },
        # New state, a user in the context.
        full_state(
            "2", {"a": 3}, "2026-07-20T00:00:02+00:00", {**CTX, "id": "01C", "user_id": "u"}
        ),
        full_state("3", {"a": 3, "c": [1]}, "2026-07-20T00:00:03+00:00", {**CTX, "id": "01D"}),
    ]
    mirror = EntityMirror()
    (added,) = mirror.apply({"a": {"sensor.x": compressed_state(states[0])}})
    assert added.old_state is None
    assert added.new_state == states[0]
    for old, new in itertools.pairwise(states):
        (change,) = mirror.apply({"c": {"sensor.x": state_diff(old, new)}})
        assert change.old_state == old
        assert change.new_state == new
    (removed,) = mirror.apply({"r": ["sensor.x"]})
    assert removed.new_state is None
    assert mirror.states == {}
    assert mirror.rejected == 0


@pytest.mark.parametrize(
    "event",
    [
        {"a": []},
        {"a": {"sensor.x": "text"}},
        {"a": {"sensor.x": {"s": 1, "lc": 1.0}}},
        {"a": {"sensor.x": {"s": "on", "a": [], "lc": 1.0}}},
        {"a": {"sensor.x": {"s": "on", "lc": "yesterday"}}},
        {"a": {"sensor.x": {"s": "on", "lc": float("inf")}}},
        {"a": {"sensor.x": {"s": "on", "lc": 10**400}}},
        {"c": {"sensor.unknown": {"+": {"s": "on"}}}},
        {"c": {"sensor.y": {"+": {"s": ["on"]}}}},
        {"c": {"sensor.y": {"+": {"a": "x"}}}},
        {"c": {"sensor.y": {"+": {"lu": True}}}},
        {"c": {"sensor.y": {"-": {"a": "k"}}}},
        {"c": {"sensor.y": {"+": []}}},
        {"r": "sensor.y"},
    ],
)
def test_malformed_parts_are_skipped_in_words(
    event: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    mirror = EntityMirror()
    mirror.apply({"a": {"sensor.y": {"s": "on", "a": {"k": 1}, "c": "01A", "lc": 1.0}}})
    before = dict(mirror.states)
    with caplog.at_level(logging.WARNING):
        assert mirror.apply(event) == []
    assert mirror.states == before
    assert mirror.rejected == 1
    assert "ignoring" in caplog.text


def test_valid_entity_ids_are_what_home_assistant_accepts() -> None:
    assert valid_entity_id("sensor.xiaomi_lx06_dea6_conversation")
    for bad in ("Sensor.X", "sensor", "sensor.", "sensor.a b", "sensor._x", "sensor.a__b", ""):
        assert not valid_entity_id(bad)
