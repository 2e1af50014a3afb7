"""Assembles the service from config and supervises its tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

from xiaoai_bridge.broker import embedded_broker
from xiaoai_bridge.clients.mqtt import MqttConnection
from xiaoai_bridge.config import DEFAULT_EMBEDDED_HOST, Settings
from xiaoai_bridge.llm.openai_compat import OpenAICompatBackend
from xiaoai_bridge.pipeline.dispatcher import Dispatcher
from xiaoai_bridge.pipeline.memory import ConversationMemory
from xiaoai_bridge.pipeline.pipeline import Pipeline, PipelineSettings
from xiaoai_bridge.pipeline.trigger import Trigger
from xiaoai_bridge.sinks.mqtt import MqttSink
from xiaoai_bridge.sources.base import Source
from xiaoai_bridge.sources.mqtt import MqttSource

_LOGGER = logging.getLogger(__name__)

MEMORY_FILE = "memory.sqlite3"
# On SIGTERM, answers already started get this long to finish and be published.
SHUTDOWN_GRACE_S = 10.0


def build_trigger(settings: Settings) -> Trigger:
    """The `[trigger]` section as a Trigger."""
    return Trigger(
        strip_regex=settings.trigger.strip_regex,
        mode=settings.trigger.mode,
        keywords=settings.trigger.keywords,
    )


@contextlib.contextmanager
def open_memory(settings: Settings) -> Iterator[ConversationMemory]:
    """The per-device conversation memory in the data dir."""
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
    pipeline_settings = PipelineSettings(
        system_prompt=settings.llm.system_prompt,
        forget_commands=settings.memory.forget_commands,
        min_chunk_chars=settings.speech.min_chars,
        max_chunk_chars=settings.speech.max_chars,
        max_concurrent_llm=settings.llm.max_concurrent,
        answer_timeout_s=settings.llm.answer_timeout_s,
    )
    try:
        with open_memory(settings) as memory:
            yield Pipeline(
                backend=backend,
                memory=memory,
                settings=pipeline_settings,
                default_trigger=build_trigger(settings),
            )
    finally:
        await backend.aclose()


async def _pump(source: Source, dispatcher: Dispatcher) -> None:
    async for utterance in source.utterances():
        dispatcher.submit(utterance)


def mqtt_connection(settings: Settings) -> MqttConnection:
    """The one MQTT connection, from `[mqtt]`."""
    endpoint = settings.mqtt.endpoint()
    return MqttConnection(
        host=endpoint.host,
        port=endpoint.port,
        client_id=settings.mqtt.client_id,
        subscriptions=[settings.mqtt.question_topic],
        status_topic=settings.mqtt.status_topic,
        username=endpoint.username,
        password=endpoint.password.get_secret_value() if endpoint.password else None,
        tls=endpoint.tls,
        keepalive_s=settings.mqtt.keepalive_s,
    )


async def run_service(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or the task is cancelled), then shut down in order."""
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if settings.mqtt.embedded:
            await stack.enter_async_context(
                embedded_broker(DEFAULT_EMBEDDED_HOST, settings.mqtt.embedded_port)
            )
        pipeline = await stack.enter_async_context(open_pipeline(settings))
        connection = mqtt_connection(settings)
        source = MqttSource(
            connection,
            question_topic=settings.mqtt.question_topic,
            max_payload_bytes=settings.mqtt.max_payload_bytes,
        )
        sink = MqttSink(
            connection,
            reply_topic=settings.mqtt.reply_topic,
            stream_topic=settings.mqtt.stream_topic,
            error_topic=settings.mqtt.error_topic,
        )
        dispatcher = Dispatcher(pipeline, {sink.name: sink})
        _LOGGER.info(
            "xiaoai-bridge listening on %s, replying on %s",
            settings.mqtt.question_topic,
            settings.mqtt.reply_topic,
        )
        async with asyncio.TaskGroup() as group:
            connection_task = group.create_task(connection.run(), name="mqtt:connection")
            source_task = group.create_task(_pump(source, dispatcher), name="mqtt:source")
            await stop.wait()
            # Reverse order: stop hearing, finish answers, deliver them, say goodbye.
            source_task.cancel()
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await dispatcher.drain()
                    await connection.flush()
            except TimeoutError:
                _LOGGER.warning(
                    "shutdown: %d answers unfinished, %d messages unsent",
                    dispatcher.in_flight,
                    connection.pending,
                )
            await dispatcher.aclose()
            await connection.close()
            connection_task.cancel()
