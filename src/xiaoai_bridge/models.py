"""Types that flow through the pipeline, shared by every source and sink."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

DEFAULT_DEVICE = "default"

QuestionId = str | int


@dataclass(frozen=True, slots=True, order=True)
class SpeakerId:
    """Who is speaking: the source that heard it and its own name for the device.

    Per-speaker state (memory, order, continuous conversation) is keyed by both, so a
    device name on one adapter can never reach another adapter's speaker.
    """

    source: str
    device: str

    def __str__(self) -> str:
        return f"{self.source}/{self.device}"


class ReplyFormat(enum.Enum):
    """How the source expects the complete answer: the seed's plain text or JSON."""

    PLAIN = "plain"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class HomeAssistantRoute:
    """Where a Home Assistant question was heard: what its sink needs to answer it."""

    kind: ClassVar[str] = "homeassistant"
    # The speaker to answer on, and the conversation sensor that reported the question.
    media_player: str
    sensor: str
    # The sensor's own timestamp attribute, as Home Assistant wrote it.
    timestamp: str


@dataclass(frozen=True, slots=True)
class XiaomiRoute:
    """Which Xiaomi speaker heard a question: what the Xiaomi sink needs to answer it."""

    kind: ClassVar[str] = "xiaomi"
    device_id: str
    # The model (e.g. "LX06"), which picks the speaker's MIoT actions.
    hardware: str
    miot_did: str
    # As the Mi Home app shows it, for logs.
    name: str


# What a source tells its own sink about where an utterance came from (None: nothing).
Route = HomeAssistantRoute | XiaomiRoute


@dataclass(frozen=True, slots=True)
class Utterance:
    """One thing said to a speaker, as a source heard it."""

    text: str
    device: str = DEFAULT_DEVICE
    id: QuestionId = ""
    source: str = "mqtt"
    reply_format: ReplyFormat = ReplyFormat.PLAIN
    # Set by a source that could not read the message (e.g. "too_long"): apologise, don't ask.
    rejected: str = ""
    # Seconds since the epoch when it was said, if the source knows (for latency figures).
    said_at: float | None = None
    # Set by a source whose sink needs to know more than the device to answer.
    route: Route | None = None
    # What XiaoAi itself answered, when the source saw it (the bridge speaks over it).
    xiaoai_answer: str = ""

    @property
    def speaker(self) -> SpeakerId:
        """The identity of the speaker that heard it."""
        return SpeakerId(self.source, self.device)


@dataclass(frozen=True, slots=True)
class SpeechChunk:
    """One sentence of an answer, ready to be spoken."""

    question_id: QuestionId
    device: str
    seq: int
    text: str
    final: bool


class Outcome(enum.Enum):
    """How the pipeline dealt with an utterance."""

    ANSWERED = "answered"
    COMMAND = "command"
    IGNORED = "ignored"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    """One tool call made while answering, as the status page and metrics show it."""

    name: str
    # Which tool source offered it ("homeassistant", "mcp:search", "builtin", ...).
    source: str
    # The arguments and the result as text, cut short for display.
    arguments: str
    # "ok", "error", "timeout", "unknown_tool", "bad_arguments" or "confirm".
    outcome: str
    result: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Answer:
    """The end of one utterance's journey: what was spoken, and how it went."""

    utterance: Utterance
    outcome: Outcome
    text: str = ""
    # Machine-readable reason for FAILED/IGNORED outcomes, e.g. "timeout", "rate_limited".
    reason: str = ""
    # Seconds from the pipeline receiving the utterance to the first chunk / the end.
    first_chunk_s: float | None = None
    total_s: float | None = None
    # Continuous conversation is on for this device: a sink that can should wake the speaker
    # to listen again once the answer has been spoken.
    keep_listening: bool = False
    # The tools the model called on the way, in order.
    tool_calls: tuple[ToolCallRecord, ...] = ()
