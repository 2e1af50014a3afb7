"""MQTT sink: sentences on <reply>/stream as they come, the whole answer on the reply topic."""

from __future__ import annotations

import json
import logging

from xiaoai_bridge import adapters
from xiaoai_bridge.clients.mqtt import MqttConnection
from xiaoai_bridge.models import Answer, Outcome, ReplyFormat, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.ports import Sink

_LOGGER = logging.getLogger(__name__)


def _dumps(data: object) -> bytes:
    # ensure_ascii=False: consumers (Node-RED, TTS) get readable Chinese, not \\u escapes.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


class MqttSink(Sink):
    """Publishes every answer twice: streamed per sentence, then whole."""

    def __init__(
        self, connection: MqttConnection, *, reply_topic: str, stream_topic: str, error_topic: str
    ) -> None:
        self._connection = connection
        self._reply_topic = reply_topic
        self._stream_topic = stream_topic
        self._error_topic = error_topic

    @property
    def name(self) -> str:
        """Answers the MQTT source."""
        return adapters.MQTT

    async def begin(self, utterance: Utterance) -> None:
        """Nothing to prepare: MQTT consumers only see the chunks."""

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """Publish one sentence on the stream topic."""
        self._connection.publish(
            self._stream_topic,
            _dumps(
                {
                    "id": chunk.question_id,
                    "device": chunk.device,
                    "seq": chunk.seq,
                    "text": chunk.text,
                    "final": chunk.final,
                }
            ),
        )

    async def end(self, answer: Answer) -> None:
        """Publish the whole answer in the format the question came in."""
        utterance = answer.utterance
        if answer.outcome is Outcome.IGNORED:
            return
        if utterance.rejected:
            self._connection.publish(
                self._error_topic,
                _dumps(
                    {
                        "id": utterance.id,
                        "device": utterance.device,
                        "error": utterance.rejected,
                    }
                ),
            )
        if utterance.reply_format is ReplyFormat.PLAIN:
            # Exactly what the seed's Node-RED flow speaks: the answer as plain UTF-8 text.
            delivered = self._connection.publish(self._reply_topic, answer.text)
        else:
            delivered = self._connection.publish(
                self._reply_topic,
                _dumps(
                    {
                        "id": utterance.id,
                        "device": utterance.device,
                        "text": answer.text,
                    }
                ),
            )
        # The question counts as answered (and leaves the inbox) once the broker has the reply.
        await delivered
