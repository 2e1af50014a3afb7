"""Mirror of `subscribe_entities` messages: compressed adds and diffs become full state objects."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_LOGGER = logging.getLogger(__name__)

# core's valid_entity_id: `cv.entity_ids` rejects the whole command if one id fails it.
_ENTITY_ID = re.compile(r"^(?!.+__)(?!_)[\da-z_]+(?<!_)\.(?!_)[\da-z_]+(?<!_)$")
# Compressed keys (core websocket_api/const.py COMPRESSED_STATE_*) and diff sides.
_STATE, _ATTRIBUTES, _CONTEXT, _LAST_CHANGED, _LAST_UPDATED = "s", "a", "c", "lc", "lu"
_ADDED, _CHANGED, _REMOVED = "a", "c", "r"
_DIFF_PLUS, _DIFF_MINUS = "+", "-"


def valid_entity_id(entity_id: str) -> bool:
    """Whether Home Assistant would accept this entity id in a command."""
    return bool(_ENTITY_ID.match(entity_id))


@dataclass(frozen=True, slots=True)
class EntityChange:
    """One entity's state before and after a change (None: it did not exist / was removed)."""

    entity_id: str
    old_state: dict[str, Any] | None
    new_state: dict[str, Any] | None


def _iso(value: Any) -> str | None:
    """An epoch float from HA as the ISO string a full state object carries; None if unusable."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        # A huge JSON integer overflows float(); inf and nan are no moment either.
        if not math.isfinite(value):
            return None
        return datetime.fromtimestamp(value, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def _context(value: Any, old: Mapping[str, Any] | None = None) -> dict[str, Any]:
    # A bare string is the context id alone: parent_id and user_id are unchanged (or None).
    context: dict[str, Any] = dict(old) if old else {"id": "", "parent_id": None, "user_id": None}
    if isinstance(value, str):
        context["id"] = value
    elif isinstance(value, Mapping):
        context.update(
            (key, item)
            for key, item in value.items()
            if key in ("id", "parent_id", "user_id") and (item is None or isinstance(item, str))
        )
    return context


class EntityMirror:
    """The states of one `subscribe_entities` connection, kept whole from its compressed events.

    Anything malformed (a wrong type anywhere) is skipped for that entity with a warning;
    the rest of the message still applies.
    """

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.rejected = 0

    def apply(self, event: Mapping[str, Any]) -> list[EntityChange]:
        """Apply one event (`a`, `c` and/or `r`); returns what changed, in message order."""
        changes: list[EntityChange] = []
        added = event.get(_ADDED)
        if added is not None:
            for entity_id, compressed in self._items(added, "a"):
                new = self._expand(entity_id, compressed)
                if new is not None:
                    changes.append(EntityChange(entity_id, self.states.get(entity_id), new))
                    self.states[entity_id] = new
        changed = event.get(_CHANGED)
        if changed is not None:
            for entity_id, diff in self._items(changed, "c"):
                old = self.states.get(entity_id)
                if old is None:
                    self._reject("a change of %s, which was never added", entity_id)
                    continue
                new = self._patch(entity_id, old, diff)
                if new is not None:
                    changes.append(EntityChange(entity_id, old, new))
                    self.states[entity_id] = new
        removed = event.get(_REMOVED)
        if removed is not None:
            if not isinstance(removed, list):
                self._reject("an 'r' that is a %s, not a list", type(removed).__name__)
            else:
                for entity_id in removed:
                    if isinstance(entity_id, str) and entity_id in self.states:
                        changes.append(EntityChange(entity_id, self.states.pop(entity_id), None))
        return changes

    def _items(self, value: Any, key: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
        if not isinstance(value, Mapping):
            self._reject("an %r that is a %s, not an object", key, type(value).__name__)
            return
        for entity_id, body in value.items():
            if not isinstance(entity_id, str) or not isinstance(body, Mapping):
                self._reject("an %r entry that is not entity id -> object", key)
                continue
            yield entity_id, body

    def _expand(self, entity_id: str, compressed: Mapping[str, Any]) -> dict[str, Any] | None:
        state, attributes = compressed.get(_STATE), compressed.get(_ATTRIBUTES, {})
        last_changed = _iso(compressed.get(_LAST_CHANGED))
        last_updated = _iso(compressed.get(_LAST_UPDATED, compressed.get(_LAST_CHANGED)))
        if (
            not isinstance(state, str)
            or not isinstance(attributes, Mapping)
            or last_changed is None
            or last_updated is None
        ):
            self._reject("a malformed state of %s", entity_id)
            return None
        return {
            "entity_id": entity_id,
            "state": state,
            "attributes": dict(attributes),
            "last_changed": last_changed,
            "last_updated": last_updated,
            "context": _context(compressed.get(_CONTEXT)),
        }

    def _patch(
        self, entity_id: str, old: Mapping[str, Any], diff: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        plus, minus = diff.get(_DIFF_PLUS, {}), diff.get(_DIFF_MINUS, {})
        if not isinstance(plus, Mapping) or not isinstance(minus, Mapping):
            self._reject("a malformed change of %s", entity_id)
            return None
        new = dict(old)
        if _STATE in plus:
            if not isinstance(plus[_STATE], str):
                self._reject("a non-string state of %s", entity_id)
                return None
            new["state"] = plus[_STATE]
        attributes = _patched_attributes(old["attributes"], plus, minus)
        moments = _patched_moments(plus)
        if attributes is None or moments is None:
            self._reject("malformed attributes or timestamps of %s", entity_id)
            return None
        new["attributes"] = attributes
        new.update(moments)
        if _CONTEXT in plus:
            new["context"] = _context(plus[_CONTEXT], old.get("context"))
        return new

    def _reject(self, what: str, *args: Any) -> None:
        self.rejected += 1
        _LOGGER.warning("ignoring %s in a subscribe_entities message", what % args)


def _patched_attributes(
    old: Mapping[str, Any], plus: Mapping[str, Any], minus: Mapping[str, Any]
) -> dict[str, Any] | None:
    attributes = dict(old)
    added, removed = plus.get(_ATTRIBUTES, {}), minus.get(_ATTRIBUTES, [])
    if not isinstance(added, Mapping) or not isinstance(removed, list):
        return None
    attributes.update(added)
    for key in removed:
        if isinstance(key, str):
            attributes.pop(key, None)
    return attributes


def _patched_moments(plus: Mapping[str, Any]) -> dict[str, str] | None:
    # A new last_changed implies the same last_updated; otherwise only lu is sent.
    if _LAST_CHANGED in plus:
        moment = _iso(plus[_LAST_CHANGED])
        return None if moment is None else {"last_changed": moment, "last_updated": moment}
    if _LAST_UPDATED in plus:
        moment = _iso(plus[_LAST_UPDATED])
        return None if moment is None else {"last_updated": moment}
    return {}
