"""Running the tool calls of one round, and the confirmations they may ask for."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from xiaoai_bridge.jsonwire import parse_json
from xiaoai_bridge.llm.base import ToolCall, ToolResult
from xiaoai_bridge.models import SpeakerId, ToolCallRecord
from xiaoai_bridge.pipeline.tool_ports import NeedsConfirmation, ToolContext, ToolError
from xiaoai_bridge.pipeline.toolbox import OfferedTool

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_MAX_ROUNDS = 4
DEFAULT_CALL_TIMEOUT_S = 10.0
DEFAULT_FILLER = "好的，我查一下。"
DEFAULT_FILLER_AFTER_S = 1.0
DEFAULT_CONFIRM_WINDOW_S = 30.0
DEFAULT_CONFIRM_WORDS = ("确定", "确认", "是", "是的", "对", "好", "好的", "可以", "执行")
DEFAULT_CANCEL_WORDS = ("取消", "不", "不用", "不用了", "不要", "算了", "别")
# What the model reads back: enough for a weather report, not a whole web page.
MAX_RESULT_CHARS = 2000
# What the status page shows of arguments and results.
DISPLAY_CHARS = 160
CANCELLED_REPLY = "好的，已取消。"
CONFIRMED_FAILED_REPLY = "抱歉，没能完成。"


@dataclass(frozen=True, slots=True)
class ToolLoopSettings:
    """The knobs of tool calling, resolved from `[tools]` by the app."""

    max_rounds: int = DEFAULT_MAX_ROUNDS
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    # Spoken when a tool round keeps the speaker silent this long; "" for none.
    filler: str = DEFAULT_FILLER
    filler_after_s: float = DEFAULT_FILLER_AFTER_S
    confirm_window_s: float = DEFAULT_CONFIRM_WINDOW_S
    confirm_words: Iterable[str] = DEFAULT_CONFIRM_WORDS
    cancel_words: Iterable[str] = DEFAULT_CANCEL_WORDS


@dataclass(slots=True)
class RoundResult:
    """What one round of calls produced: results for the model, records, a confirmation."""

    results: list[ToolResult] = field(default_factory=list)
    records: list[ToolCallRecord] = field(default_factory=list)
    confirmation: NeedsConfirmation | None = None
    # The call that asked for it.
    confirming: ToolCallRecord | None = None


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying so."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def run_round(
    calls: Sequence[ToolCall],
    offered: Mapping[str, OfferedTool],
    context: ToolContext,
    *,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> RoundResult:
    """Run one round's calls side by side; every call gets a result, whatever happens."""
    outcomes = await asyncio.gather(
        *(_run_call(call, offered, context, timeout_s, clock) for call in calls)
    )
    round_ = RoundResult()
    for call, (result, record, confirmation) in zip(calls, outcomes, strict=True):
        round_.results.append(ToolResult(call.id, result))
        round_.records.append(record)
        if confirmation is not None and round_.confirmation is None:
            round_.confirmation = confirmation
            round_.confirming = record
    return round_


async def _run_call(
    call: ToolCall,
    offered: Mapping[str, OfferedTool],
    context: ToolContext,
    timeout_s: float,
    clock: Callable[[], float],
) -> tuple[str, ToolCallRecord, NeedsConfirmation | None]:
    started = clock()
    entry = offered.get(call.name)
    source = entry.source if entry else ""
    confirmation: NeedsConfirmation | None = None

    def record(outcome: str, result: str) -> ToolCallRecord:
        return ToolCallRecord(
            name=call.name,
            source=source,
            arguments=shorten(call.arguments, DISPLAY_CHARS),
            outcome=outcome,
            result=shorten(result, DISPLAY_CHARS),
            seconds=clock() - started,
        )

    if entry is None:
        result = f"error: there is no tool named {call.name!r}"
        return result, record("unknown_tool", result), None
    arguments = _parse_arguments(call.arguments)
    if isinstance(arguments, str):
        result = f"error: {arguments}; call it again with a JSON object of arguments"
        return result, record("bad_arguments", result), None
    tried = await attempt(
        entry.tool.call(arguments, context), timeout_s=timeout_s, name=call.name, source=source
    )
    output = tried.value
    if isinstance(output, NeedsConfirmation):
        outcome = "confirm"
        result = f"waiting for the user to confirm: {output.prompt}"
        confirmation = output
    elif output is not None:
        outcome = "ok"
        result = shorten(output, MAX_RESULT_CHARS)
    else:
        outcome = tried.outcome
        result = f"error: {tried.error}"
    if outcome != "ok":
        _LOGGER.info("tool %s of %s: %s", call.name, source, shorten(result, DISPLAY_CHARS))
    return result, record(outcome, result), confirmation


@dataclass(frozen=True, slots=True)
class Attempt(Generic[_T]):
    """How running a tool went: its value, or the outcome and reason of its failure."""

    value: _T | None
    # "ok", "timeout" or "error".
    outcome: str
    # Why it failed, in words for the model.
    error: str = ""


async def attempt(work: Awaitable[_T], *, timeout_s: float, name: str, source: str) -> Attempt[_T]:
    """Run the tool's `work` under `timeout_s`; whatever fails becomes an outcome, not a raise."""
    try:
        async with asyncio.timeout(timeout_s):
            return Attempt(await work, "ok")
    except TimeoutError:
        return Attempt(None, "timeout", f"the tool did not answer within {timeout_s:g} s")
    except ToolError as err:
        return Attempt(None, "error", str(err))
    except Exception:
        # A tool is an adapter to someone else's server: its bug must not silence the answer.
        _LOGGER.exception("tool %s of %s failed", name, source)
        return Attempt(None, "error", "the tool failed unexpectedly")


def _parse_arguments(text: str) -> dict[str, object] | str:
    """The call's arguments as a JSON object, or why they are not one."""
    if not text.strip():
        return {}  # some models send "" for a call without arguments
    try:
        value = parse_json(text)
    except ValueError as err:
        return f"the arguments are not valid JSON ({err})"
    if not isinstance(value, dict):
        return "the arguments are not a JSON object"
    return value


@dataclass(frozen=True, slots=True)
class PendingAction:
    """An action held for a speaker's yes: what runs, and the call that asked for it."""

    confirmation: NeedsConfirmation
    name: str
    source: str
    deadline: float


class Confirmations:
    """Actions waiting for a speaker's yes, each for a short window."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._pending: dict[SpeakerId, PendingAction] = {}

    def ask(
        self, speaker: SpeakerId, confirmation: NeedsConfirmation, *, name: str, source: str
    ) -> None:
        """Hold `confirmation` until the speaker's next words (or the window's end)."""
        deadline = self._clock() + self._window_s
        self._pending[speaker] = PendingAction(confirmation, name, source, deadline)

    def take(self, speaker: SpeakerId) -> PendingAction | None:
        """The speaker's pending action, removed; None if none or expired."""
        pending = self._pending.pop(speaker, None)
        if pending is None or pending.deadline <= self._clock():
            return None
        return pending

    def waiting(self, speaker: SpeakerId) -> bool:
        """True while an action waits for this speaker's yes."""
        pending = self._pending.get(speaker)
        return pending is not None and pending.deadline > self._clock()
