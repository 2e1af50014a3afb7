"""Built-in tools: the current date and time, and the bridge's own voice commands."""

from __future__ import annotations

import os
import time
import zoneinfo
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, tzinfo
from pathlib import Path

from xiaoai_bridge.llm.base import ToolSpec
from xiaoai_bridge.models import SpeakerId
from xiaoai_bridge.pipeline.tool_ports import (
    SourceHealth,
    Tool,
    ToolContext,
    ToolError,
    ToolOutput,
    ToolSource,
)

SOURCE_NAME = "builtin"
CURRENT_TIME = "get_current_time"
FORGET_CONVERSATION = "forget_conversation"
CONTINUOUS_CONVERSATION = "continuous_conversation"

# Forgets one speaker's conversation memory.
Forget = Callable[[SpeakerId], Awaitable[None]]
# Switches one speaker's continuous conversation on (True) or off.
SetContinuous = Callable[[SpeakerId, bool], None]
# Seconds since the epoch.
Clock = Callable[[], float]

# Monday first, as datetime.weekday() counts.
_WEEKDAYS_ZH = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")
_MAX_ZONE_CHARS = 64
_NO_ARGUMENTS: Mapping[str, object] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}


def local_time_zone(localtime: Path = Path("/etc/localtime")) -> tzinfo:
    """The system's time zone, with its daylight-saving rules where the system has them.

    `$TZ` when it names a zone, else `localtime`'s rules, else the offset in force now (which
    a long-running process would keep across a daylight-saving change).
    """
    name = os.environ.get("TZ", "").removeprefix(":")
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass  # a POSIX rule like "CST-8": the C library applies it to local time below
    else:
        try:
            with localtime.open("rb") as file:
                return zoneinfo.ZoneInfo.from_file(file, key=_zone_key(localtime))
        except (OSError, ValueError):
            pass  # no such file (slim containers), or not a TZif file
    return datetime.now().astimezone().tzinfo or zoneinfo.ZoneInfo("UTC")


def _zone_key(localtime: Path) -> str | None:
    # /etc/localtime is usually a link into a zoneinfo folder: its target names the zone.
    target = str(localtime.resolve())
    _, found, key = target.rpartition("zoneinfo/")
    return key if found and key else None


def describe_now(now: datetime) -> str:
    """An aware datetime as the model reads it: Chinese date and weekday, English, ISO, zone."""
    offset = now.strftime("%z")
    zone = getattr(now.tzinfo, "key", None) or now.tzname() or "local"
    return (
        f"{now.year}年{now.month}月{now.day}日 {_WEEKDAYS_ZH[now.weekday()]} "
        f"{now:%H:%M:%S} ({now:%A}; {now.isoformat(timespec='seconds')}; "
        f"time zone {zone}, UTC{offset[:3]}:{offset[3:]})"
    )


class CurrentTimeTool(Tool):
    """Tells the date, weekday and time: in the configured zone, or another one asked for."""

    def __init__(self, tz: tzinfo, clock: Clock = time.time) -> None:
        """`tz` is the household's zone; `clock` gives seconds since the epoch."""
        self._tz = tz
        self._clock = clock
        self._spec = ToolSpec(
            name=CURRENT_TIME,
            description=(
                "Get the current date, weekday and time. Use it for any question about "
                "today, now, dates or how long until something. Without arguments it gives "
                "the user's own local time."
            ),
            parameters={
                "type": "object",
                "properties": {
                    "time_zone": {
                        "type": "string",
                        "description": "Only for another place's time: an IANA time zone, "
                        "e.g. 'America/New_York' or 'Europe/London'.",
                    }
                },
                "additionalProperties": False,
            },
        )

    @property
    def spec(self) -> ToolSpec:
        """The `get_current_time` function."""
        return self._spec

    def offered_to(self, context: ToolContext) -> bool:
        """Every question may ask the time."""
        return True

    async def call(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        """The date and time now, described."""
        tz = self._zone(arguments.get("time_zone"))
        return describe_now(datetime.fromtimestamp(self._clock(), tz))

    def _zone(self, name: object) -> tzinfo:
        if name is None or (isinstance(name, str) and not name.strip()):
            return self._tz
        if not isinstance(name, str) or len(name) > _MAX_ZONE_CHARS:
            raise ToolError("'time_zone' must be an IANA time zone name, e.g. 'Asia/Tokyo'")
        try:
            return zoneinfo.ZoneInfo(name.strip())
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
            # ValueError: a name that is not a relative path ("../x", "/etc/x").
            raise ToolError(
                f"unknown time zone {name.strip()!r}: use an IANA name, e.g. 'Asia/Tokyo'"
            ) from err


class ForgetConversationTool(Tool):
    """The "forget" voice command as a tool: drops what this speaker's conversation remembers."""

    _SPEC = ToolSpec(
        name=FORGET_CONVERSATION,
        description=(
            "Forget everything said so far in this conversation, when the user asks to start "
            "over, change the subject completely or forget what they said."
        ),
        parameters=_NO_ARGUMENTS,
    )

    def __init__(self, forget: Forget) -> None:
        """`forget` drops one speaker's memory."""
        self._forget = forget

    @property
    def spec(self) -> ToolSpec:
        """The `forget_conversation` function."""
        return self._SPEC

    def offered_to(self, context: ToolContext) -> bool:
        """Every speaker has a conversation to forget."""
        return True

    async def call(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        """Forget the asking speaker's conversation (never another speaker's)."""
        await self._forget(context.speaker)
        return "The conversation so far is forgotten; the next question starts afresh."


class ContinuousConversationTool(Tool):
    """The start/stop continuous conversation voice commands as one tool."""

    _SPEC = ToolSpec(
        name=CONTINUOUS_CONVERSATION,
        description=(
            "Start or stop continuous conversation on this speaker. While it is on, the user "
            "can keep talking without saying the trigger keyword first, and the speaker listens "
            "again after each answer; it ends by itself when the user stays quiet. Start it when "
            "the user wants to keep chatting, stop it when they say goodbye or are done."
        ),
        parameters={
            "type": "object",
            "properties": {
                "on": {"type": "boolean", "description": "true to start, false to stop."}
            },
            "required": ["on"],
            "additionalProperties": False,
        },
    )

    def __init__(self, set_continuous: SetContinuous) -> None:
        """`set_continuous` switches one speaker's continuous conversation."""
        self._set_continuous = set_continuous

    @property
    def spec(self) -> ToolSpec:
        """The `continuous_conversation` function."""
        return self._SPEC

    def offered_to(self, context: ToolContext) -> bool:
        """Every speaker can converse continuously."""
        return True

    async def call(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        """Switch the asking speaker's continuous conversation."""
        on = arguments.get("on")
        if not isinstance(on, bool):
            raise ToolError("'on' must be true or false")
        self._set_continuous(context.speaker, on)
        if on:
            return (
                "Continuous conversation is on: the user may go on talking without the "
                "keyword until they stay quiet."
            )
        return "Continuous conversation is off: the keyword is needed again."


class BuiltinTools(ToolSource):
    """The bridge's own tools; each voice command is offered only when its callable is given."""

    def __init__(
        self,
        *,
        tz: tzinfo,
        clock: Clock = time.time,
        forget: Forget | None = None,
        set_continuous: SetContinuous | None = None,
    ) -> None:
        """`tz`: the household's time zone; the callables come from the pipeline."""
        tools: list[Tool] = [CurrentTimeTool(tz, clock)]
        if forget is not None:
            tools.append(ForgetConversationTool(forget))
        if set_continuous is not None:
            tools.append(ContinuousConversationTool(set_continuous))
        self._tools = tuple(tools)

    @property
    def name(self) -> str:
        """ "builtin"."""
        return SOURCE_NAME

    def tools(self) -> Sequence[Tool]:
        """Always the same: nothing here goes away."""
        return self._tools

    def health(self) -> SourceHealth:
        """Always up: these tools live in the bridge."""
        return SourceHealth(ok=True, detail=f"{len(self._tools)} built-in tools")
