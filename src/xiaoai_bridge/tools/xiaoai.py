"""XiaoAi's own skills as a tool: the speaker that heard the question carries out a command."""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xiaoai_bridge.clients.homeassistant import (
    HomeAssistantClient,
    HomeAssistantCommandError,
    HomeAssistantError,
    refuses_responses,
)
from xiaoai_bridge.clients.xiaomi.errors import XiaomiError
from xiaoai_bridge.clients.xiaomi.miot import MiotClient, SpeakerActions, speaker_actions
from xiaoai_bridge.llm.base import ToolSpec
from xiaoai_bridge.models import HomeAssistantRoute, SpeakerId, Utterance, XiaomiRoute
from xiaoai_bridge.pipeline.tool_ports import (
    SourceHealth,
    Tool,
    ToolContext,
    ToolError,
    ToolOutput,
    ToolSource,
)

_LOGGER = logging.getLogger(__name__)

SOURCE_NAME = "xiaoai"
TOOL_NAME = "xiaoai_execute"
# A spoken command is a sentence; hass-xiaomi-miot's own text entity stops at 255 characters.
MAX_COMMAND_CHARS = 200
# Errors from Home Assistant or the cloud are passed to the model, which only needs the gist.
_MAX_ERROR_CHARS = 200
# hass-xiaomi-miot's service that speaks or, with `execute`, acts on a text.
SPEAKER_DOMAIN = "xiaomi_miot"
SPEAKER_SERVICE = "intelligent_speaker"

# XiaoAi logs a command it was handed like one it heard, so the speaker's conversation record
# comes back through the bridge's own source; within this window the same words are that echo.
ECHO_WINDOW_S = 30.0
# Commands remembered per speaker for recognising their echoes.
MAX_REMEMBERED_COMMANDS = 8
_NOT_WORDS = re.compile(r"[\W_]+")

ACCEPTED = "XiaoAi accepted the command and is carrying it out; it answers aloud by itself."
ACCEPTED_SILENTLY = "XiaoAi accepted the command and is carrying it out without speaking."

SPEC = ToolSpec(
    name=TOOL_NAME,
    description=(
        "Ask the XiaoAi speaker the user is talking to to carry out a command with its own "
        "skills: alarms, reminders, timers, music and radio, volume, and Mi Home devices "
        "bound to the speaker. Write the command as the user would say it to XiaoAi, in "
        "Chinese, e.g. '明天早上七点叫我起床', '音量调到30', '播放周杰伦的歌', '打开客厅的灯'. "
        "XiaoAi confirms aloud in its own voice, so keep your own reply to a few words."
    ),
    parameters={
        "type": "object",
        "properties": {
            "command": {
                "type": "string",
                "description": "The command for XiaoAi, in Chinese, one request per call.",
                "maxLength": MAX_COMMAND_CHARS,
            }
        },
        "required": ["command"],
        "additionalProperties": False,
    },
)


def _short(text: object) -> str:
    line = " ".join(str(text).split())
    if len(line) <= _MAX_ERROR_CHARS:
        return line
    return line[: _MAX_ERROR_CHARS - 1] + "…"


def _plain(text: str) -> str:
    """Text without spaces and punctuation, case-folded: how an echo is matched."""
    return _NOT_WORDS.sub("", text).casefold()


def _command(arguments: Mapping[str, object]) -> str:
    """The command text of a call, checked."""
    command = arguments.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ToolError("'command' must be a non-empty string")
    command = command.strip()
    if len(command) > MAX_COMMAND_CHARS:
        raise ToolError(f"'command' is too long: at most {MAX_COMMAND_CHARS} characters")
    return command


class XiaoAiExecuteTool(Tool):
    """Hands a command to the asking speaker's XiaoAi, through Home Assistant or the cloud.

    Offered only to questions whose route names a speaker this tool can reach: a Home
    Assistant media_player (with a Home Assistant client), or a Xiaomi speaker whose model
    has the MIoT execute-text-directive action (with a MIoT client).
    """

    def __init__(
        self,
        *,
        homeassistant: HomeAssistantClient | None = None,
        miot: MiotClient | None = None,
        models: Mapping[str, SpeakerActions] | None = None,
        silent: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`models` overrides the MIoT action table per hardware, as the Xiaomi sink's does;
        `silent` makes XiaoAi act without answering aloud."""
        self._homeassistant = homeassistant
        self._miot = miot
        self._models = dict(models or {})
        self._silent = silent
        self._clock = clock
        # Speaker -> (plain command, when it was handed over), oldest first.
        self._handed: dict[SpeakerId, deque[tuple[str, float]]] = {}
        # Cleared once the service refuses return_response (hass-xiaomi-miot < 0.7.18).
        self._ask_response = True

    @property
    def spec(self) -> ToolSpec:
        """The `xiaoai_execute` function."""
        return SPEC

    def offered_to(self, context: ToolContext) -> bool:
        """Whether the question came from a speaker this tool can command."""
        route = context.utterance.route
        if isinstance(route, HomeAssistantRoute):
            return self._homeassistant is not None and bool(route.media_player)
        if isinstance(route, XiaomiRoute):
            return (
                self._miot is not None
                and bool(route.miot_did)
                and self._actions(route).execute_text_directive is not None
            )
        return False

    async def call(self, arguments: Mapping[str, object], context: ToolContext) -> ToolOutput:
        """Send the command; raises ToolError when XiaoAi cannot be reached or refuses it."""
        command = _command(arguments)
        route = context.utterance.route
        # Before sending: the echo may be polled before the call returns.
        self._remember(context.speaker, command)
        if isinstance(route, HomeAssistantRoute) and self._homeassistant is not None:
            await self._execute_by_homeassistant(self._homeassistant, route, command)
        elif isinstance(route, XiaomiRoute) and self._miot is not None:
            await self._execute_by_cloud(self._miot, route, command)
        else:
            raise ToolError("this question did not come from a XiaoAi speaker the bridge reaches")
        return ACCEPTED_SILENTLY if self._silent else ACCEPTED

    def is_echo(self, utterance: Utterance) -> bool:
        """Whether `utterance` is XiaoAi's record of a command this tool just handed it.

        Each command is recognised once, on the speaker it went to, within ECHO_WINDOW_S;
        the source's pump drops it, so a continuous conversation does not take it for a
        question (and hand it to XiaoAi again).
        """
        handed = self._handed.get(utterance.speaker)
        if not handed:
            return False
        oldest = self._clock() - ECHO_WINDOW_S
        while handed and handed[0][1] < oldest:
            handed.popleft()
        text = _plain(utterance.text)
        for entry in handed:
            if entry[0] == text:
                handed.remove(entry)
                return True
        return False

    def _remember(self, speaker: SpeakerId, command: str) -> None:
        handed = self._handed.setdefault(speaker, deque(maxlen=MAX_REMEMBERED_COMMANDS))
        handed.append((_plain(command), self._clock()))

    def _actions(self, route: XiaomiRoute) -> SpeakerActions:
        return speaker_actions(route.hardware, self._models)

    async def _execute_by_homeassistant(
        self, client: HomeAssistantClient, route: HomeAssistantRoute, command: str
    ) -> None:
        service_data = {
            "entity_id": route.media_player,
            "text": command,
            "execute": True,
            "silent": self._silent,
        }
        _LOGGER.debug("XiaoAi on %s: executing %r", route.media_player, command)
        try:
            response = await self._call_speaker(client, service_data)
        except HomeAssistantCommandError as err:
            _LOGGER.warning(
                "XiaoAi on %s: %s.%s failed: %s (%s)",
                route.media_player,
                SPEAKER_DOMAIN,
                SPEAKER_SERVICE,
                err.message,
                err.code,
            )
            if err.code == "not_found":
                raise ToolError(
                    "Home Assistant has no xiaomi_miot.intelligent_speaker service "
                    "(the hass-xiaomi-miot integration is needed)"
                ) from err
            raise ToolError(f"Home Assistant refused the command: {_short(err.message)}") from err
        except HomeAssistantError as err:
            _LOGGER.warning("XiaoAi on %s: Home Assistant unreachable: %s", route.media_player, err)
            raise ToolError(f"Home Assistant is unreachable: {_short(err)}") from err
        error = _response_error(response)
        if error:
            _LOGGER.warning("XiaoAi on %s: the command failed: %s", route.media_player, error)
            raise ToolError(f"XiaoAi could not carry out the command: {_short(error)}")

    async def _call_speaker(
        self, client: HomeAssistantClient, service_data: Mapping[str, Any]
    ) -> Any:
        try:
            return await client.call_service(
                SPEAKER_DOMAIN, SPEAKER_SERVICE, service_data, return_response=self._ask_response
            )
        except HomeAssistantCommandError as err:
            if not (self._ask_response and refuses_responses(err)):
                raise
        self._ask_response = False
        _LOGGER.warning(
            "%s.%s does not support responses (hass-xiaomi-miot older than 0.7.18?); "
            "executing without asking for one, so XiaoAi's own errors go unnoticed",
            SPEAKER_DOMAIN,
            SPEAKER_SERVICE,
        )
        return await client.call_service(SPEAKER_DOMAIN, SPEAKER_SERVICE, service_data)

    async def _execute_by_cloud(self, miot: MiotClient, route: XiaomiRoute, command: str) -> None:
        actions = self._actions(route)
        label = route.name or route.hardware
        if actions.execute_text_directive is None:
            raise ToolError(f"this speaker model ({route.hardware}) cannot take commands")
        _LOGGER.debug("XiaoAi on %s: executing %r", label, command)
        try:
            await miot.execute_text_directive(route.miot_did, actions, command, silent=self._silent)
        except XiaomiError as err:
            _LOGGER.warning("XiaoAi on %s: execute-text-directive failed: %s", label, err)
            raise ToolError(f"the Xiaomi cloud refused the command: {_short(err.message)}") from err


def _response_error(response: Any) -> str:
    """What went wrong, from hass-xiaomi-miot's response; "" when it worked or said nothing."""
    if not isinstance(response, Mapping):
        return ""
    # hass-xiaomi-miot catches its own exceptions and returns them in the response.
    if error := response.get("error"):
        return str(error)
    # Otherwise the response is the MIoT action result, whose `code` is 0 when it worked.
    code = response.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        return f"the speaker refused (MIoT code {code})"
    return ""


class XiaoAiSkills(ToolSource):
    """The tool source of XiaoAi's own skills: one tool, `xiaoai_execute`."""

    def __init__(
        self,
        *,
        homeassistant: HomeAssistantClient | None = None,
        miot: MiotClient | None = None,
        models: Mapping[str, SpeakerActions] | None = None,
        silent: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Give the clients of the modes in use; a mode without its client is not offered."""
        self._homeassistant = homeassistant
        self._miot = miot
        self._tool = XiaoAiExecuteTool(
            homeassistant=homeassistant, miot=miot, models=models, silent=silent, clock=clock
        )

    @property
    def name(self) -> str:
        """ "xiaoai"."""
        return SOURCE_NAME

    def is_echo(self, utterance: Utterance) -> bool:
        """Whether a source heard XiaoAi's record of a command handed to it (see the tool)."""
        return self._tool.is_echo(utterance)

    def tools(self) -> Sequence[Tool]:
        """The execute tool, when any speaker can be reached."""
        if self._homeassistant is None and self._miot is None:
            return ()
        return (self._tool,)

    def health(self) -> SourceHealth:
        """Down only while Home Assistant is the sole way to the speakers and not connected."""
        parts: list[str] = []
        ok = self._miot is not None
        if self._miot is not None:
            parts.append("through the Xiaomi cloud")
        if self._homeassistant is not None:
            if self._homeassistant.connected:
                ok = True
                parts.append("through Home Assistant")
            else:
                parts.append("Home Assistant not connected")
        if not parts:
            return SourceHealth(ok=False, detail="no speaker mode configured")
        return SourceHealth(ok=ok, detail="XiaoAi's skills " + ", ".join(parts))
