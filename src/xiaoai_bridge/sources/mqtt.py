"""MQTT source: the seed's plain-text questions and richer JSON ones."""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable

from xiaoai_bridge import adapters
from xiaoai_bridge.clients.mqtt import MqttConnection, Received
from xiaoai_bridge.jsonwire import parse_json
from xiaoai_bridge.models import DEFAULT_DEVICE, QuestionId, ReplyFormat, Utterance

_LOGGER = logging.getLogger(__name__)

SOURCE_NAME = adapters.MQTT
# Matched with fullmatch: `$` would also accept a trailing newline.
_DEVICE_RE = re.compile(r"[\w.:@-]{1,64}")
MAX_ID_CHARS = 128


class MqttSource:
    """Turns messages on the question topic into utterances, accepted as they arrive.

    Unlike the other sources it is not polled by a pump: the connection calls it for each
    message before acknowledging it, and it hands the utterance to `accept` at once.
    """

    def __init__(
        self,
        connection: MqttConnection,
        *,
        question_topic: str,
        max_payload_bytes: int,
        accept: Callable[[Utterance], None],
    ) -> None:
        self._connection = connection
        self._topic = question_topic
        self._accept = accept
        # Handled as each message is read: `accept` records it on disk before the broker is
        # acknowledged, so a kill at any moment loses nothing (the broker redelivers).
        connection.subscribe(question_topic, handler=self._on_message)
        self._max_bytes = max_payload_bytes
        # Ids for plain-text questions: unique across restarts thanks to the time prefix.
        self._ids = (f"q{int(time.time())}-{n}" for n in itertools.count(1))

    def _on_message(self, message: Received) -> None:
        if message.retained:
            # The broker replays a retained message at every subscribe, i.e. every restart
            # and reconnect: it was answered when it was first published.
            _LOGGER.warning(
                "ignored a retained question on %s; publish questions without the retain flag "
                "(clear it with: mosquitto_pub -r -n -t '%s')",
                message.topic,
                message.topic,
            )
            return
        utterance = self.parse(message)
        if utterance is not None:
            self._accept(utterance)

    def parse(self, message: Received) -> Utterance | None:
        """One message to one utterance; None for messages with nothing to answer."""
        payload = message.payload
        if len(payload) > self._max_bytes:
            _LOGGER.warning(
                "question of %d bytes exceeds the %d byte limit", len(payload), self._max_bytes
            )
            return self._rejected("too_long", payload)
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            _LOGGER.warning("question is not valid UTF-8 (%s)", err.reason)
            return self._rejected("bad_input", payload)
        stripped = text.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            return self._parse_json(stripped)
        if not stripped:
            _LOGGER.info("ignored an empty question")
            return None
        return Utterance(
            text=stripped,
            device=DEFAULT_DEVICE,
            id=next(self._ids),
            source=SOURCE_NAME,
            reply_format=ReplyFormat.PLAIN,
        )

    def _parse_json(self, text: str) -> Utterance | None:
        try:
            data = parse_json(text)
        except ValueError as err:
            _LOGGER.warning("question looks like JSON but is not: %s", err)
            return self._rejected("bad_input", b"", ReplyFormat.JSON)
        if not isinstance(data, dict):
            return self._rejected("bad_input", b"", ReplyFormat.JSON)
        question_id = data.get("id")
        if question_id is None:
            question_id = next(self._ids)
        device = data.get("device", DEFAULT_DEVICE)
        problem = _check_json_fields(data.get("text"), device, question_id)
        if problem:
            _LOGGER.warning("JSON question rejected: %s", problem)
            safe_device = (
                device
                if isinstance(device, str) and _DEVICE_RE.fullmatch(device)
                else DEFAULT_DEVICE
            )
            safe_id = question_id if _valid_id(question_id) else ""
            return Utterance(
                text="",
                device=safe_device,
                id=safe_id,
                source=SOURCE_NAME,
                reply_format=ReplyFormat.JSON,
                rejected="bad_input",
            )
        question = str(data["text"]).strip()
        if not question:
            _LOGGER.info("ignored an empty JSON question from %s", device)
            return None
        return Utterance(
            text=question,
            device=device,
            id=question_id,
            source=SOURCE_NAME,
            reply_format=ReplyFormat.JSON,
        )

    def _rejected(
        self, reason: str, payload: bytes, reply_format: ReplyFormat | None = None
    ) -> Utterance:
        # Too long or unreadable: still answered (with an apology) in the format it came in.
        if reply_format is None:
            reply_format = ReplyFormat.JSON if payload.lstrip()[:1] == b"{" else ReplyFormat.PLAIN
        return Utterance(
            text="",
            device=DEFAULT_DEVICE,
            id=next(self._ids),
            source=SOURCE_NAME,
            reply_format=reply_format,
            rejected=reason,
        )


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _check_json_fields(text: object, device: object, question_id: QuestionId | object) -> str:
    if not isinstance(text, str):
        return '"text" must be a string'
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        return '"device" must be 1-64 letters, digits or . : @ _ -'
    if not _valid_id(question_id):
        return f'"id" must be a string of at most {MAX_ID_CHARS} characters or an integer'
    return ""
