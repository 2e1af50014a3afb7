"""Command line: run the service, ask one question, check the setup."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
from pydantic import SecretStr

from xiaoai_bridge import __version__
from xiaoai_bridge.app import (
    mcp_server,
    mina_client,
    open_pipeline,
    open_tools,
    prepare_data_dir,
    run_service,
    xiaomi_auth,
)
from xiaoai_bridge.clients.homeassistant import ProbeResult, probe
from xiaoai_bridge.clients.xiaomi import is_known_model, new_session, parse_pasted_login
from xiaoai_bridge.config import (
    DEFAULT_EMBEDDED_HOST,
    XIAOMI_TOKEN_FILE,
    Settings,
    find_config_file,
    load_settings,
)
from xiaoai_bridge.errors import BridgeError, ConfigError, DataDirError, LLMError
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend
from xiaoai_bridge.log import register_secrets_of, setup_logging
from xiaoai_bridge.models import Answer, Outcome, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.tool_ports import ConnectedToolSource, SourceHealth, Tool
from xiaoai_bridge.pipeline.toolbox import SourceReport, Toolbox

# Exit codes, documented in the README.
if TYPE_CHECKING:
    from xiaoai_bridge.tools.mcp import McpToolSource

EXIT_OK = 0
EXIT_FAILED = 1  # `check` or `tools` found a problem, or `ask` got no answer
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_CONFIG = 3  # the configuration is invalid
EXIT_RUNTIME = 4  # the service stopped on an error
EXIT_DATA = 5  # the data dir or the memory database in it cannot be used

CHECK_TIMEOUT_S = 15.0
# Tool sources with a connection (an MCP server) are started this long at most, to list them.
# `ask` waits this long for tool sources to connect; one that is away is simply left out.
ASK_WAIT_S = 3.0
TOOLS_WAIT_S = 10.0
TOOLS_POLL_S = 0.1
# One line per tool: its description's first line, cut to this.
DESCRIPTION_CHARS = 100


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xiaoai-bridge",
        description="Make a XiaoAi speaker answer with any OpenAI-compatible LLM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="debug logging, and tracebacks on errors"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help="TOML config file (default: $XIAOAI_BRIDGE_CONFIG, "
            "./xiaoai-bridge.toml, ~/.config/xiaoai-bridge/config.toml)",
        )

    run = commands.add_parser(
        "run", help="run the service", description="Run the service until SIGINT/SIGTERM."
    )
    config_arg(run)
    ask = commands.add_parser(
        "ask",
        help="ask one question through the pipeline",
        description="Ask one question through the same pipeline as the service (trigger, "
        "memory, LLM, speech cleanup); print the answer sentence by sentence.",
    )
    ask.add_argument("question", help="what you would say to the speaker")
    ask.add_argument("--device", default="default", help="whose memory to use (default: default)")
    config_arg(ask)
    check = commands.add_parser(
        "check",
        help="validate the config and reach the broker and the LLM",
        description="Validate the config, reach the MQTT broker and the LLM; exit non-zero "
        "when something is wrong.",
    )
    config_arg(check)
    tools = commands.add_parser(
        "tools",
        help="list the tools the model would be offered",
        description="Build the tool sources from the config as the service does, ask each "
        "MCP server once for its tools and start the other sources that need a connection "
        "(each for at most --wait seconds), and print every tool the model would be offered "
        "with its source, then each source's state; exit 1 when a source is down.",
    )
    tools.add_argument(
        "--wait",
        type=float,
        default=TOOLS_WAIT_S,
        metavar="SECONDS",
        help=f"how long to wait for sources to connect (default: {TOOLS_WAIT_S:g})",
    )
    config_arg(tools)
    speakers = commands.add_parser(
        "ha-speakers",
        help="list Home Assistant's XiaoAi speakers",
        description="Connect to Home Assistant ([homeassistant] url and token) and print its "
        "XiaoAi conversation sensors and speakers, as config lines to copy.",
    )
    config_arg(speakers)
    login = commands.add_parser(
        "login",
        help="log in to the Xiaomi cloud and cache the token",
        description="Log in to the Xiaomi account ([xiaomi] account, asked if unset) and store "
        "the tokens in the data dir (owner-only file), so the service needs no password. "
        "Past a 2FA or captcha wall, log in at account.xiaomi.com in a browser and paste "
        "its cookies with --cookie.",
    )
    login.add_argument("--account", help="Xiaomi ID, phone or e-mail")
    login.add_argument(
        "--cookie",
        metavar="TEXT",
        help='browser cookies "userId=...; passToken=..." instead of a password',
    )
    config_arg(login)
    devices = commands.add_parser(
        "devices",
        help="list the Xiaomi account's speakers",
        description="List the speakers of the Xiaomi account: name, hardware model, MiNA "
        "deviceID, MIoT did, and whether the model is in the action table.",
    )
    config_arg(devices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `xiaoai-bridge` command."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(find_config_file(args.config))
    except BridgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    level = "DEBUG" if args.debug else settings.log_level
    register_secrets_of(settings)
    try:
        if args.command == "run":
            setup_logging(level)
            return asyncio.run(_run(settings))
        if args.command == "ask":
            setup_logging("DEBUG" if args.debug else "WARNING")
            return asyncio.run(_ask(settings, args.question, args.device))
        setup_logging("DEBUG" if args.debug else "ERROR")
        if args.command == "ha-speakers":
            return asyncio.run(_ha_speakers(settings))
        if args.command == "login":
            return asyncio.run(_login(*_login_settings(settings, args.account, args.cookie)))
        if args.command == "devices":
            return asyncio.run(_devices(settings))
        if args.command == "tools":
            return asyncio.run(_tools(settings, args.wait))
        return asyncio.run(_check(settings))
    except BridgeError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, DataDirError):
            return EXIT_DATA
        # Xiaomi login failures each have their own documented code.
        code = getattr(err, "exit_code", EXIT_RUNTIME)
        return code if isinstance(code, int) else EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_OK


async def _run(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await run_service(settings, stop=stop)
    return EXIT_OK


class _PrintSink:
    """Prints each sentence as it streams, for `ask`."""

    name = "cli"

    async def begin(self, utterance: Utterance) -> None:
        """Nothing to prepare."""

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """One line per sentence, flushed at once so streaming is visible."""
        if chunk.text:
            print(chunk.text, flush=True)

    async def end(self, answer: Answer) -> None:
        """Explain an answer that did not happen."""
        if answer.outcome is Outcome.IGNORED:
            print("(not triggered: the speaker would leave this to XiaoAi)", file=sys.stderr)
        elif answer.outcome is Outcome.FAILED:
            print(f"(failed: {answer.reason})", file=sys.stderr)


async def _ask(settings: Settings, question: str, device: str) -> int:
    utterance = Utterance(text=question, device=device, id="cli", source="cli")
    try:
        async with open_tools(settings) as service, sources_running(service.tools, ASK_WAIT_S):
            answer = await service.pipeline.handle(utterance, _PrintSink())
    except BridgeError as err:
        if isinstance(err, LLMError | ConfigError | DataDirError):
            raise
        # A tool source that cannot start (e.g. Home Assistant away) must not cost the answer.
        print(f"warning: asking without tools: {err}", file=sys.stderr)
        async with open_pipeline(settings) as pipeline:
            answer = await pipeline.handle(utterance, _PrintSink())
    return EXIT_OK if answer.outcome in (Outcome.ANSWERED, Outcome.COMMAND) else EXIT_FAILED


async def _check(settings: Settings) -> int:
    problems = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")

    try:
        prepare_data_dir(settings.data_dir)
    except DataDirError as err:
        report(False, "config", str(err))
    else:
        report(True, "config", f"valid; data in {settings.data_dir}")
    if settings.mqtt_enabled:
        ok, detail = await _check_broker(settings)
        report(ok, "mqtt", detail)
    if settings.homeassistant.enabled:
        ok, detail = await _check_homeassistant(settings)
        report(ok, "homeassistant", detail)
    if settings.xiaomi.enabled:
        ok, detail = await _check_xiaomi(settings)
        report(ok, "xiaomi", detail)
    if settings.tools.enabled:
        for ok, what, detail in await _check_tools(settings):
            report(ok, what, detail)
        if settings.tools.mcp:
            # The MCP SDK is heavy: loaded only when servers are configured (as by the app).
            from xiaoai_bridge.tools.mcp import check_server  # noqa: PLC0415
        for entry in settings.tools.mcp:
            health = await check_server(mcp_server(entry), timeout_s=CHECK_TIMEOUT_S)
            report(health.ok, f"mcp {entry.name}", health.detail)
    backend = OpenAICompatBackend(settings.llm)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            report(True, "llm", await backend.check())
    except LLMError as err:
        hint = " (set [llm] api_key or OPENAI_API_KEY)" if err.reason == "not_configured" else ""
        report(False, "llm", f"{err.detail}{hint}")
    except TimeoutError:
        report(False, "llm", f"{settings.llm.base_url} did not answer in {CHECK_TIMEOUT_S:g} s")
    finally:
        await backend.aclose()
    return EXIT_OK if problems == 0 else EXIT_FAILED


async def tool_reports(
    settings: Settings, wait_s: float, *, with_mcp: bool = True
) -> list[SourceReport]:
    """Each tool source the service would have, with the tools it offers once started.

    An MCP server is asked once for its tools (its one-shot listing), so one that is away
    is reported at once; other sources with a connection get a brief start.
    """
    async with open_tools(settings) as service:
        kept = list(service.tools.sources)
        mcp: list[McpToolSource] = []
        if settings.tools.mcp:
            from xiaoai_bridge.tools.mcp import McpToolSource  # noqa: PLC0415 - heavy SDK

            mcp = [source for source in kept if isinstance(source, McpToolSource)]
            if not with_mcp:
                kept = [source for source in kept if source not in mcp]
                mcp = []
        listed = await asyncio.gather(*(_listed_once(source, wait_s) for source in mcp))
        once = {source.name: source for source in listed}
        shown = Toolbox()
        for source in kept:
            shown.add(once.get(source.name, source))
        return await start_briefly(shown, wait_s)


@dataclasses.dataclass(frozen=True)
class _Listed:
    """A tool source as one listing found it, for showing only."""

    name: str
    found: Sequence[Tool]
    state: SourceHealth

    def tools(self) -> Sequence[Tool]:
        return self.found

    def health(self) -> SourceHealth:
        return self.state


async def _listed_once(source: McpToolSource, wait_s: float) -> _Listed:
    from xiaoai_bridge.tools.mcp import McpUnavailableError, list_server_tools  # noqa: PLC0415

    try:
        found = await list_server_tools(source.settings, timeout_s=wait_s)
    except McpUnavailableError as err:
        return _Listed(source.name, (), SourceHealth(False, str(err)))
    return _Listed(source.name, tuple(found), SourceHealth(True, f"{len(found)} tools"))


async def start_briefly(toolbox: Toolbox, wait_s: float) -> list[SourceReport]:
    """Run the sources that keep a connection until all are up or `wait_s` has passed.

    The report is taken while they still run: a source offers its tools only while connected.
    """
    async with sources_running(toolbox, wait_s) as failed:
        reports = toolbox.report()
    return [
        dataclasses.replace(entry, health=SourceHealth(False, failed[entry.name]))
        if entry.name in failed
        else entry
        for entry in reports
    ]


@contextlib.asynccontextmanager
async def sources_running(toolbox: Toolbox, wait_s: float) -> AsyncIterator[dict[str, str]]:
    """Run the sources that keep a connection while the block runs, once all are up or
    `wait_s` has passed; yields why each source that stopped did so, by name."""
    connected = [source for source in toolbox.sources if isinstance(source, ConnectedToolSource)]
    failed: dict[str, str] = {}

    async def keep(source: ConnectedToolSource) -> None:
        try:
            await source.run()
        except Exception as err:  # noqa: BLE001 - a source that breaks is a line of the report
            failed[source.name] = f"stopped: {err or type(err).__name__}"

    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(keep(source), name=f"tools:{source.name}") for source in connected
        ]
        try:
            async with asyncio.timeout(wait_s):
                # The port has no "up" event: health is read, as /healthz reads it.
                while not all(  # noqa: ASYNC110
                    task.done() or source.health().ok
                    for source, task in zip(connected, tasks, strict=True)
                ):
                    await asyncio.sleep(TOOLS_POLL_S)
        except TimeoutError:
            pass  # the ones still down say why in their health
        try:
            yield failed
        finally:
            for task in tasks:
                task.cancel()


async def _check_tools(settings: Settings) -> list[tuple[bool, str, str]]:
    """`check`'s lines for the tool sources: (ok, what, detail)."""
    try:
        # MCP servers have a one-shot check of their own, which names their tools: `_check`
        # reports each with it instead of starting its source here.
        sources = await tool_reports(settings, TOOLS_WAIT_S, with_mcp=False)
    except BridgeError as err:
        return [(False, "tools", str(err))]
    if not sources and not settings.tools.mcp:
        return [(True, "tools", "no tool source configured: the model is offered none")]
    return [
        (source.health.ok, f"tools {source.name}", _source_detail(source)) for source in sources
    ]


def _source_detail(source: SourceReport) -> str:
    count = len(source.tools)
    return f"{printable(source.health.detail)} ({count} tool{'' if count == 1 else 's'})"


def one_line(text: str) -> str:
    """A tool description's first line, cut short and safe for a terminal."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = printable(line)
    return line if len(line) <= DESCRIPTION_CHARS else line[: DESCRIPTION_CHARS - 1] + "…"


def printable(text: str) -> str:
    """`text` without control characters: what MCP servers say must not drive the terminal."""
    return "".join(char if char.isprintable() else " " for char in text)


async def _tools(settings: Settings, wait_s: float) -> int:
    if not settings.tools.enabled:
        print("tool calling is off ([tools] enabled = false): the model is offered no tools")
        return EXIT_OK
    sources = await tool_reports(settings, wait_s)
    if not sources:
        print("no tool source is configured: the model is offered no tools")
        return EXIT_OK
    offered = [entry for source in sources for entry in source.tools]
    if offered:
        name_width = max(len(entry.tool.spec.name) for entry in offered)
        source_width = max(len(entry.source) for entry in offered)
        for entry in offered:
            spec = entry.tool.spec
            print(
                f"{spec.name:<{name_width}}  {entry.source:<{source_width}}  "
                f"{one_line(spec.description)}"
            )
        print(f"{len(offered)} tool{'' if len(offered) == 1 else 's'} offered to the model\n")
    else:
        print("no tool is offered to the model right now\n")
    for source in sources:
        print(f"{'ok  ' if source.health.ok else 'FAIL'} {source.name}: {_source_detail(source)}")
    return EXIT_OK if all(source.health.ok for source in sources) else EXIT_FAILED


async def _probe_homeassistant(settings: Settings) -> ProbeResult:
    ha = settings.homeassistant
    if ha.url is None or ha.token is None:
        raise ConfigError("set [homeassistant] url and token first")
    return await probe(ha.url, ha.token.get_secret_value(), timeout_s=CHECK_TIMEOUT_S)


async def _check_homeassistant(settings: Settings) -> tuple[bool, str]:
    try:
        found = await _probe_homeassistant(settings)
    except BridgeError as err:
        return False, str(err)
    if not found.speakers:
        return False, (
            f"Home Assistant {found.ha_version} reached, but it has no XiaoAi conversation "
            "sensor: set up hass-xiaomi-miot with the speaker owner's Xiaomi account"
        )
    listed = ", ".join(f"{s.entity_id} -> {s.media_player}" for s in found.speakers)
    return True, f"Home Assistant {found.ha_version}, speakers: {listed}"


async def _ha_speakers(settings: Settings) -> int:
    found = await _probe_homeassistant(settings)
    if not found.speakers:
        print("no XiaoAi conversation sensor found (is hass-xiaomi-miot set up?)", file=sys.stderr)
        return EXIT_FAILED
    print(f"# Home Assistant {found.ha_version}: conversation sensor = speaker")
    print("[homeassistant.speakers]")
    for speaker in found.speakers:
        print(f'"{speaker.entity_id}" = "{speaker.media_player}"  # {speaker.friendly_name}')
    return EXIT_OK


def _login_settings(
    settings: Settings, account: str | None, cookie: str | None
) -> tuple[Settings, tuple[str, str] | None]:
    """The settings to log in with, asking for what is missing; and pasted cookies, if any."""
    mi = settings.xiaomi
    pasted = parse_pasted_login(cookie) if cookie else None
    if pasted is None:
        account = account or mi.account or input("Xiaomi account (ID, phone or e-mail): ")
        password = mi.password or SecretStr(getpass.getpass("Password (not stored): "))
        mi = mi.model_copy(update={"account": account.strip(), "password": password})
    return settings.model_copy(update={"xiaomi": mi}), pasted


async def _login(settings: Settings, pasted: tuple[str, str] | None) -> int:
    prepare_data_dir(settings.data_dir)
    async with new_session() as session:
        auth = xiaomi_auth(settings, session)
        if pasted is not None:
            await auth.login_with_pass_token(*pasted)
        else:
            await auth.login()
    print(
        f"logged in; tokens cached in {settings.data_dir / XIAOMI_TOKEN_FILE} (owner-only). "
        "Put the same account in [xiaomi] account."
    )
    return EXIT_OK


async def _check_xiaomi(settings: Settings) -> tuple[bool, str]:
    try:
        async with new_session() as session:
            mina = mina_client(settings, session, xiaomi_auth(settings, session))
            found = await mina.device_list()
    except BridgeError as err:
        return False, str(err)
    if not found:
        return False, "logged in, but the account has no speaker (shared ones are not listed)"
    names = ", ".join(f"{d.name or d.alias} ({d.hardware})" for d in found)
    return True, f"logged in; speakers: {names}"


async def _devices(settings: Settings) -> int:
    async with new_session() as session:
        mina = mina_client(settings, session, xiaomi_auth(settings, session))
        found = await mina.device_list()
    if not found:
        print("no speaker on this account (shared speakers are not listed)", file=sys.stderr)
        return EXIT_FAILED
    print(f"{'name':<20} {'model':<8} {'MiNA deviceID':<38} {'MIoT did':<12} action table")
    for device in found:
        known = "yes" if is_known_model(device.hardware) else "no (generic layout)"
        print(
            f"{device.name or device.alias:<20} {device.hardware:<8} {device.device_id:<38} "
            f"{device.miot_did or '-':<12} {known}"
        )
    return EXIT_OK


async def _check_broker(settings: Settings) -> tuple[bool, str]:
    endpoint = settings.mqtt.endpoint()
    if settings.mqtt.embedded:
        # The service would start its own broker: the port must be free for it.
        with socket.socket() as probe:
            try:
                probe.bind((DEFAULT_EMBEDDED_HOST, endpoint.port))
            except OSError as err:
                return False, (
                    f"embedded broker cannot listen on {DEFAULT_EMBEDDED_HOST}:"
                    f"{endpoint.port} ({err.strerror}); set [mqtt] url to use the "
                    "broker already there"
                )
        return (
            True,
            f"no [mqtt] url: an embedded broker will listen on "
            f"{DEFAULT_EMBEDDED_HOST}:{endpoint.port}",
        )
    password = endpoint.password.get_secret_value() if endpoint.password else None
    try:
        async with aiomqtt.Client(
            endpoint.host,
            endpoint.port,
            username=endpoint.username,
            password=password,
            timeout=CHECK_TIMEOUT_S,
            identifier=f"{settings.mqtt.client_id}-check"[:23],
        ):
            pass
    except aiomqtt.MqttError as err:
        return False, f"cannot connect to {endpoint.host}:{endpoint.port}: {err}"
    return True, f"connected to {endpoint.host}:{endpoint.port}"


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
