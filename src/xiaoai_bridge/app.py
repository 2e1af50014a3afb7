"""Assembles the service from config and supervises its tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import zoneinfo
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from xiaoai_bridge import adapters
from xiaoai_bridge.audio import AudioStore
from xiaoai_bridge.broker import BrokerStartError, embedded_broker
from xiaoai_bridge.clients.homeassistant import ENTITY_REGISTRY_UPDATED, HomeAssistantClient
from xiaoai_bridge.clients.mqtt import MqttConnection
from xiaoai_bridge.clients.tts import EdgeTts, HttpTts, TtsEngine
from xiaoai_bridge.clients.xiaomi import (
    ConversationClient,
    MinaClient,
    MiotClient,
    SpeakerActions,
    XiaomiAuth,
    new_session,
)
from xiaoai_bridge.config import (
    DEFAULT_EMBEDDED_HOST,
    XIAOMI_TOKEN_FILE,
    McpServerSettings,
    Settings,
    ToolsSettings,
    TriggerSettings,
)
from xiaoai_bridge.discovery import DiscoveryCleaner, HomeAssistantDiscovery
from xiaoai_bridge.errors import ConfigError, DataDirError
from xiaoai_bridge.http import HttpServer, open_http
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend
from xiaoai_bridge.log import register_secrets_of
from xiaoai_bridge.models import Answer, SpeakerId, Utterance, XiaomiRoute
from xiaoai_bridge.pipeline.controls import Controls
from xiaoai_bridge.pipeline.dispatcher import Dispatcher
from xiaoai_bridge.pipeline.inbox import Inbox
from xiaoai_bridge.pipeline.memory import ConversationMemory
from xiaoai_bridge.pipeline.pipeline import Pipeline, PipelineSettings
from xiaoai_bridge.pipeline.tool_loop import ToolLoopSettings
from xiaoai_bridge.pipeline.tool_ports import ConnectedToolSource
from xiaoai_bridge.pipeline.toolbox import Toolbox
from xiaoai_bridge.pipeline.trigger import Trigger
from xiaoai_bridge.reconnect import ReconnectPolicy
from xiaoai_bridge.sinks.homeassistant import HomeAssistantSink, resolve_speak_service
from xiaoai_bridge.sinks.mqtt import MqttSink
from xiaoai_bridge.sinks.xiaomi import XiaomiSink
from xiaoai_bridge.sources.base import Source
from xiaoai_bridge.sources.homeassistant import HomeAssistantSource
from xiaoai_bridge.sources.mqtt import MqttSource
from xiaoai_bridge.sources.xiaomi import XiaomiSource
from xiaoai_bridge.tools.builtin import BuiltinTools, local_time_zone
from xiaoai_bridge.tools.homeassistant import HomeAssistantTools
from xiaoai_bridge.tools.xiaoai import XiaoAiSkills

if TYPE_CHECKING:
    from xiaoai_bridge.tools.mcp import McpServer

_LOGGER = logging.getLogger(__name__)

# True for an utterance that is the bridge's own doing, which no source should pass on.
Echo = Callable[[Utterance], bool]

MEMORY_FILE = "memory.sqlite3"
INBOX_FILE = "inbox.sqlite3"
# On SIGTERM, answers already started get this long to finish and be delivered.
SHUTDOWN_GRACE_S = 10.0
# How often the shutdown flush checks that the broker session is still up.
FLUSH_CHECK_S = 0.1


def build_trigger(settings: TriggerSettings) -> Trigger:
    """A `[trigger]`-shaped section as a Trigger."""
    return Trigger(strip_regex=settings.strip_regex, mode=settings.mode, keywords=settings.keywords)


def prepare_data_dir(path: Path) -> None:
    """Create the data dir owner-only and prove it writable, or say what to fix."""
    fix = "set data_dir (or XIAOAI_BRIDGE_DATA_DIR) to a writable directory"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError as err:
        raise DataDirError(f"data_dir {path} is a file, not a directory: {fix}") from err
    except NotADirectoryError as err:
        raise DataDirError(
            f"data_dir {path} cannot be created: part of that path is a file, not a directory; "
            f"{fix}"
        ) from err
    except OSError as err:
        raise DataDirError(f"data_dir {path} cannot be created ({err.strerror}): {fix}") from err
    # Root passes permission checks, a read-only mount does not: only a real write tells.
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise DataDirError(
            f"data_dir {path} is not writable by this user ({err.strerror}): {fix}"
        ) from err


@contextlib.contextmanager
def open_memory(settings: Settings) -> Iterator[ConversationMemory]:
    """The per-device conversation memory in the data dir."""
    prepare_data_dir(settings.data_dir)
    memory = ConversationMemory(
        settings.data_dir / MEMORY_FILE,
        max_turns=settings.memory.max_turns,
        max_tokens=settings.memory.max_tokens,
    )
    memory.open()
    try:
        yield memory
    finally:
        memory.close()


@contextlib.asynccontextmanager
async def open_pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """The pipeline with its backend and memory, closed on exit."""
    backend = OpenAICompatBackend(settings.llm)
    if not backend.configured:
        _LOGGER.warning(
            "no LLM API key configured: every question will get a spoken reminder. Set "
            "[llm] api_key in the config file or the OPENAI_API_KEY environment variable"
        )
    triggers: dict[str, Trigger] = {}
    for source, mode in (
        (adapters.HOMEASSISTANT, settings.homeassistant),
        (adapters.XIAOMI, settings.xiaomi),
    ):
        if not mode.enabled:
            continue
        triggers[source] = build_trigger(mode.trigger)
        for device, keywords in mode.speaker_keywords.items():
            own = mode.trigger.model_copy(update={"keywords": keywords})
            triggers[f"{source}/{device}"] = build_trigger(own)
    pipeline_settings = PipelineSettings(
        system_prompt=settings.llm.system_prompt,
        forget_commands=settings.memory.forget_commands,
        min_chunk_chars=settings.speech.min_chars,
        max_chunk_chars=settings.speech.max_chars,
        first_clause_chars=settings.speech.first_clause_chars,
        max_concurrent_llm=settings.llm.max_concurrent,
        answer_timeout_s=settings.llm.answer_timeout_s,
        triggers=triggers,
        continuous_start_commands=settings.conversation.start_commands,
        continuous_stop_commands=settings.conversation.stop_commands,
        continuous_idle_s=settings.conversation.idle_timeout_s,
        tools=tool_loop_settings(settings.tools) if settings.tools.enabled else None,
    )
    try:
        with open_memory(settings) as memory:
            yield Pipeline(
                backend=backend,
                memory=memory,
                settings=pipeline_settings,
                default_trigger=build_trigger(settings.trigger),
            )
    finally:
        await backend.aclose()


def mcp_server(entry: McpServerSettings) -> McpServer:
    """One `[[tools.mcp]]` table as the MCP tool source's settings, secrets revealed."""
    from xiaoai_bridge.tools.mcp import McpServer, McpTransport  # noqa: PLC0415 - see _add_tools

    return McpServer(
        name=entry.name,
        transport=McpTransport(entry.kind),
        command=entry.command or "",
        args=entry.args,
        env={key: value.get_secret_value() for key, value in entry.env.items()} or None,
        url=entry.url or "",
        headers={key: value.get_secret_value() for key, value in entry.headers.items()},
        bearer_token=entry.token.get_secret_value() if entry.token is not None else None,
        allowed_tools=frozenset(entry.allow) or None,
    )


def tool_loop_settings(tools: ToolsSettings) -> ToolLoopSettings:
    """`[tools]` as the pipeline's tool loop knobs."""
    return ToolLoopSettings(
        max_rounds=tools.max_rounds,
        call_timeout_s=tools.call_timeout_s,
        filler=tools.filler,
        filler_after_s=tools.filler_after_s,
        confirm_window_s=tools.confirm_window_s,
        confirm_words=tools.confirm_words,
        cancel_words=tools.cancel_words,
    )


def mqtt_connection(settings: Settings) -> MqttConnection:
    """The one MQTT connection, from `[mqtt]`."""
    endpoint = settings.mqtt.endpoint()
    return MqttConnection(
        host=endpoint.host,
        port=endpoint.port,
        client_id=settings.mqtt.client_id,
        status_topic=settings.mqtt.status_topic,
        username=endpoint.username,
        password=endpoint.password.get_secret_value() if endpoint.password else None,
        tls=endpoint.tls,
        keepalive_s=settings.mqtt.keepalive_s,
    )


@dataclass
class Service:
    """The running parts, for the HTTP status page and tests to look at."""

    settings: Settings
    pipeline: Pipeline
    dispatcher: Dispatcher
    sources: list[Source] = field(default_factory=list)
    # Adapter name -> its connection's state, for /healthz.
    connections: dict[str, ReconnectPolicy] = field(default_factory=dict)
    mqtt: MqttConnection | None = None
    # The Home Assistant connection, shared by its source, sink and tools.
    homeassistant: HomeAssistantClient | None = None
    # The Xiaomi cloud's MIoT client and model table, shared by its sink and tools.
    miot: MiotClient | None = None
    speaker_models: Mapping[str, SpeakerActions] = field(default_factory=dict)
    # Recognise what a source hears as the bridge's own doing (XiaoAi's record of a command).
    echoes: list[Echo] = field(default_factory=list)
    discovery: HomeAssistantDiscovery | None = None
    http: HttpServer | None = None
    # Clips of the external TTS, served by the HTTP server for the speakers to fetch.
    audio: AudioStore | None = None
    # Long-running jobs besides the sources, by task name (e.g. "discovery:run").
    jobs: dict[str, Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=dict)

    @property
    def tools(self) -> Toolbox:
        """The tool sources the model may use."""
        return self.pipeline.tools

    @property
    def controls(self) -> Controls:
        """Answering on/off and "forget", shared by every way of asking."""
        return self.pipeline.controls


async def _pump(source: Source, dispatcher: Dispatcher, echoes: Sequence[Echo] = ()) -> None:
    async for utterance in source.utterances():
        if any(echo(utterance) for echo in echoes):
            _LOGGER.info(
                "%s: %r is XiaoAi's record of a command the bridge gave it, not a question",
                source.name,
                utterance.text,
            )
            continue
        dispatcher.admit(utterance)


@contextlib.asynccontextmanager
async def open_inbox(settings: Settings) -> AsyncIterator[Inbox]:
    """The durable inbox of accepted questions in the data dir."""
    inbox = Inbox(settings.data_dir / INBOX_FILE)
    inbox.open()
    try:
        yield inbox
    finally:
        await inbox.close()


async def _broker_listening(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(2):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def _add_mqtt(service: Service, stack: contextlib.AsyncExitStack) -> None:
    settings = service.settings
    if settings.mqtt.embedded:
        port = settings.mqtt.embedded_port
        try:
            await stack.enter_async_context(embedded_broker(DEFAULT_EMBEDDED_HOST, port))
        except BrokerStartError:
            if not await _broker_listening(DEFAULT_EMBEDDED_HOST, port):
                raise
            # A newcomer's own mosquitto already serves the default address: use it.
            _LOGGER.warning(
                "a broker already listens on %s:%d; using it instead of the embedded one "
                "(set [mqtt] url to make this explicit)",
                DEFAULT_EMBEDDED_HOST,
                port,
            )
    connection = mqtt_connection(settings)
    service.mqtt = connection
    service.connections["mqtt"] = connection.policy
    # Not a pumped source: the connection hands it each question before acknowledging it.
    MqttSource(
        connection,
        question_topic=settings.mqtt.question_topic,
        max_payload_bytes=settings.mqtt.max_payload_bytes,
        accept=service.dispatcher.admit,
    )
    service.dispatcher.add_sink(
        MqttSink(
            connection,
            reply_topic=settings.mqtt.reply_topic,
            stream_topic=settings.mqtt.stream_topic,
            error_topic=settings.mqtt.error_topic,
        )
    )
    mqtt = settings.mqtt
    if mqtt.discovery_enabled:
        discovery = HomeAssistantDiscovery(
            connection,
            service.controls,
            availability_topic=mqtt.status_topic,
            prefix=mqtt.discovery_prefix,
            base_topic=mqtt.discovery_base_topic,
            node_id=mqtt.client_id,
        )
        service.discovery = discovery
        service.dispatcher.add_observer(discovery)
        service.jobs["discovery:run"] = discovery.run
    else:
        # Entities an earlier run announced are removed, not left to rot in HA.
        cleaner = DiscoveryCleaner(
            connection, prefix=mqtt.discovery_prefix, base_topic=mqtt.discovery_base_topic
        )
        service.jobs["discovery:clean"] = cleaner.run
    _LOGGER.info(
        "MQTT mode: questions on %s, answers on %s",
        settings.mqtt.question_topic,
        settings.mqtt.reply_topic,
    )


def homeassistant_client(settings: Settings) -> HomeAssistantClient:
    """The Home Assistant connection of `[homeassistant]`, shared by its source, sink and tools."""
    ha = settings.homeassistant
    if ha.url is None or ha.token is None:  # the config model checks this already
        raise ConfigError("homeassistant.url and homeassistant.token are both needed")
    # No state_changed subscription: the source watches its sensors and speakers by id, so a
    # busy house never floods the bridge; registry events reveal speakers added later.
    return HomeAssistantClient(
        ha.url, ha.token.get_secret_value(), event_types=(ENTITY_REGISTRY_UPDATED,)
    )


async def _add_homeassistant(service: Service, stack: contextlib.AsyncExitStack) -> None:
    ha = service.settings.homeassistant
    # A rejected token raises HomeAssistantAuthError here: fatal, before anything runs.
    client = await stack.enter_async_context(homeassistant_client(service.settings))
    service.connections["homeassistant"] = client.policy
    service.homeassistant = client
    service.sources.append(
        HomeAssistantSource(client, speakers=ha.speakers, freshness_s=ha.freshness_s)
    )
    sink = HomeAssistantSink(
        client,
        speak=resolve_speak_service(ha.speak_service, text_field=ha.speak_text_field),
        speak_targets=ha.speak_targets,
        chars_per_second=ha.chars_per_second,
        stop_xiaoai=ha.stop_xiaoai,
        acknowledgement=ha.acknowledgement,
    )
    service.dispatcher.add_sink(await stack.enter_async_context(sink))
    _LOGGER.info("Home Assistant mode: %s", ha.url)


def xiaomi_auth(settings: Settings, session: aiohttp.ClientSession) -> XiaomiAuth:
    """The Xiaomi account login, with its token cache in the data dir."""
    mi = settings.xiaomi
    return XiaomiAuth(
        session,
        account=mi.account,
        password=mi.password.get_secret_value() if mi.password else None,
        pass_token=mi.pass_token.get_secret_value() if mi.pass_token else None,
        user_id=mi.user_id,
        token_path=settings.data_dir / XIAOMI_TOKEN_FILE,
        base_url=mi.endpoints.account,
    )


def mina_client(settings: Settings, session: aiohttp.ClientSession, auth: XiaomiAuth) -> MinaClient:
    """MiNA (speakers, speech, player) for `[xiaomi]`."""
    mi = settings.xiaomi
    return MinaClient(session, auth, base_url=mi.endpoints.mina, timeout_s=mi.timeout_s)


def miot_client(settings: Settings, session: aiohttp.ClientSession, auth: XiaomiAuth) -> MiotClient:
    """MIoT (the speakers' actions) for `[xiaomi]`."""
    mi = settings.xiaomi
    return MiotClient(session, auth, base_url=mi.endpoints.miot, timeout_s=mi.timeout_s)


def speaker_actions(settings: Settings) -> dict[str, SpeakerActions]:
    """The MIoT action table by hardware model, with `[xiaomi.models]` rows."""
    return {
        hardware: SpeakerActions(**row.model_dump())
        for hardware, row in settings.xiaomi.models.items()
    }


def external_tts(settings: Settings, session: aiohttp.ClientSession) -> TtsEngine:
    """The TTS engine of `[xiaomi.tts_http]`."""
    tts = settings.xiaomi.tts_http
    if tts.engine == "edge":
        if not EdgeTts.available():
            raise ConfigError(
                'xiaomi.tts_http.engine = "edge" needs the edge-tts package: pip install edge-tts'
            )
        return EdgeTts(tts.voice)
    return HttpTts(session, tts.url, method=tts.method, voice=tts.voice, timeout_s=tts.timeout_s)


async def _add_xiaomi(service: Service, stack: contextlib.AsyncExitStack) -> None:
    settings = service.settings
    mi = settings.xiaomi
    session = await stack.enter_async_context(new_session())
    auth = xiaomi_auth(settings, session)
    mina = mina_client(settings, session, auth)
    conversation = ConversationClient(
        session, auth, base_url=mi.endpoints.conversation, timeout_s=mi.timeout_s
    )
    miot = miot_client(settings, session, auth)
    source = XiaomiSource(
        mina,
        conversation,
        speakers=mi.speakers,
        poll_interval_s=mi.poll_interval_s,
        freshness_s=mi.freshness_s,
        on_speaker=lambda label, policy: service.connections.update({f"xiaomi {label}": policy}),
    )
    # Fail fast: a refused login or an unknown speaker is an error at start, not a loop.
    found = await source.resolve_speakers()
    service.sources.append(source)
    service.connections["xiaomi"] = source.discovery  # the account and speaker lookup
    models = speaker_actions(settings)
    service.miot, service.speaker_models = miot, models
    tts_engine: TtsEngine | None = None
    if mi.tts == "url":
        public_url = settings.http.public_url
        if public_url is None:  # the config model checks this already
            raise ConfigError('xiaomi.tts = "url" needs http.public_url')
        service.audio = AudioStore(public_url)
        tts_engine = external_tts(settings, session)
    sink = XiaomiSink(
        mina,
        miot,
        models=models,
        tts=mi.tts,
        tts_engine=tts_engine,
        audio=service.audio,
        silence=mi.silence,
        wake=mi.wake,
        chars_per_second=mi.chars_per_second,
    )
    service.dispatcher.add_sink(await stack.enter_async_context(sink))
    idle_s = settings.conversation.idle_timeout_s

    def follow_continuous(answer: Answer) -> None:
        # Poll faster while a continuous conversation is on; it lapses with the pipeline's.
        route = answer.utterance.route
        if isinstance(route, XiaomiRoute):
            source.set_continuous(route.device_id, answer.keep_listening, for_s=idle_s)

    service.dispatcher.add_listener(follow_continuous)
    _LOGGER.info(
        "Xiaomi cloud mode: %d speakers (%s)",
        len(found),
        ", ".join(device.name for device in found),
    )


async def _add_tools(service: Service) -> None:
    """Add each tool source `[tools]` turns on; sources with a connection run as jobs."""
    tools = service.settings.tools
    ha_tools = tools.homeassistant
    if service.homeassistant is not None and ha_tools.enabled is not False:
        # Assist exposure in Home Assistant decides which entities the model sees.
        service.tools.add(
            HomeAssistantTools(
                service.homeassistant,
                assist=ha_tools.assist,
                assist_agent_id=ha_tools.assist_agent_id,
                assist_language=ha_tools.language,
            )
        )
    elif ha_tools.enabled:
        _LOGGER.warning("tools.homeassistant is on, but [homeassistant] is not configured")
    if tools.xiaoai and (service.homeassistant is not None or service.miot is not None):
        skills = XiaoAiSkills(
            homeassistant=service.homeassistant,
            miot=service.miot,
            models=service.speaker_models,
            silent=tools.xiaoai_silent,
        )
        service.tools.add(skills)
        service.echoes.append(skills.is_echo)
    if tools.builtin:
        service.tools.add(builtin_tools(service))
    if tools.mcp:
        # The MCP SDK and its web stack cost ~45 MB of memory: loaded only to reach a server.
        from xiaoai_bridge.tools.mcp import McpToolSource  # noqa: PLC0415

        for entry in tools.mcp:
            service.tools.add(McpToolSource(mcp_server(entry)))
    for source in service.tools.sources:
        if isinstance(source, ConnectedToolSource):
            service.jobs[f"tools:{source.name}"] = source.run
    names = ", ".join(source.name for source in service.tools.sources) or "none"
    _LOGGER.info("tools: up to %d rounds per question; sources: %s", tools.max_rounds, names)


def builtin_tools(service: Service) -> BuiltinTools:
    """The date and time, and the forget and continuous-conversation commands, as tools."""
    name = service.settings.tools.timezone
    pipeline = service.pipeline

    async def forget(speaker: SpeakerId) -> None:
        await service.controls.forget(speaker, by="the model")

    def set_continuous(speaker: SpeakerId, on: bool) -> None:
        pipeline.set_continuous(speaker, on=on)

    return BuiltinTools(
        tz=zoneinfo.ZoneInfo(name) if name else local_time_zone(),
        forget=forget,
        set_continuous=set_continuous,
    )


@contextlib.asynccontextmanager
async def open_tools(settings: Settings) -> AsyncIterator[Service]:
    """The pipeline with the tool sources the service would offer, none of them running.

    For `xiaoai-bridge tools`, `check` and `ask`: nothing is heard, nothing spoken on a
    speaker. Sources that share a mode's clients get them: Home Assistant's connection (a
    rejected token raises here, as at start), the Xiaomi cloud's MIoT client (not logged in
    until a tool is called).
    """
    async with contextlib.AsyncExitStack() as stack:
        pipeline = await stack.enter_async_context(open_pipeline(settings))
        service = Service(settings, pipeline, Dispatcher(pipeline, {}))
        stack.push_async_callback(service.dispatcher.aclose)
        if settings.tools.enabled:
            if settings.homeassistant.enabled:
                client = await stack.enter_async_context(homeassistant_client(settings))
                service.homeassistant = client
            if settings.xiaomi.enabled:
                session = await stack.enter_async_context(new_session())
                service.miot = miot_client(settings, session, xiaomi_auth(settings, session))
                service.speaker_models = speaker_actions(settings)
            await _add_tools(service)
        yield service


@contextlib.asynccontextmanager
async def open_service(settings: Settings) -> AsyncIterator[Service]:
    """Build every configured mode around one pipeline; nothing runs until `run`."""
    register_secrets_of(settings)  # before anything connects, so nothing logs them unmasked
    prepare_data_dir(settings.data_dir)
    async with contextlib.AsyncExitStack() as stack:
        pipeline = await stack.enter_async_context(open_pipeline(settings))
        inbox = await stack.enter_async_context(open_inbox(settings))
        dispatcher = Dispatcher(
            pipeline,
            {},
            inbox=inbox,
            max_pending=settings.inbox.max_pending,
            resume_freshness_s=settings.inbox.freshness_s,
        )
        service = Service(settings, pipeline, dispatcher)
        if settings.mqtt_enabled:
            await _add_mqtt(service, stack)
        if settings.homeassistant.enabled:
            await _add_homeassistant(service, stack)
        if settings.xiaomi.enabled:
            await _add_xiaomi(service, stack)
        if settings.tools.enabled:
            await _add_tools(service)
        if settings.http.enabled:
            service.http = await stack.enter_async_context(open_http(service, settings.http))
        stack.push_async_callback(service.dispatcher.aclose)
        yield service


async def serve(service: Service, stop: asyncio.Event) -> None:
    """Hear and answer until `stop` is set, then shut down in reverse order."""
    async with asyncio.TaskGroup() as group:
        if service.mqtt is not None:
            connection_task = group.create_task(service.mqtt.run(), name="mqtt:connection")
        service.dispatcher.resume()
        pumps = [
            group.create_task(
                _pump(source, service.dispatcher, service.echoes), name=f"{source.name}:source"
            )
            for source in service.sources
        ]
        pumps += [group.create_task(job(), name=name) for name, job in service.jobs.items()]
        await stop.wait()
        # Stop hearing, finish the answers under way, deliver them, say goodbye.
        for pump in pumps:
            pump.cancel()
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE_S):
                await service.dispatcher.drain()
                if service.mqtt is not None:
                    await _flush_while_connected(service.mqtt)
        except TimeoutError:
            _LOGGER.warning(
                "shutdown: %d answers unfinished, %d MQTT messages unsent",
                service.dispatcher.in_flight,
                service.mqtt.pending if service.mqtt else 0,
            )
        await service.dispatcher.aclose()
        if service.mqtt is not None:
            await service.mqtt.close()
            connection_task.cancel()


async def _flush_while_connected(mqtt: MqttConnection) -> None:
    """Wait for the broker to take every publication, but only while a session is up.

    With no session (a broker down, or refusing our login until a retry minutes away)
    nothing can be delivered: waiting out the grace would only delay the stop.
    """
    while mqtt.pending and mqtt.connected:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_CHECK_S):
                await mqtt.flush()
    if mqtt.pending:
        _LOGGER.warning(
            "shutdown: %d MQTT messages unsent, the broker is not connected", mqtt.pending
        )


async def run_service(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or the task is cancelled)."""
    async with open_service(settings) as service:
        await serve(service, stop or asyncio.Event())
