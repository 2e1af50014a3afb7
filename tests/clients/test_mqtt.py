"""The MQTT connection against a real mosquitto: acknowledgements, outbox and delivery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from tests.fakes.mosquitto import Mosquitto
from xiaoai_bridge.clients.mqtt import MqttConnection, Received

WAIT_S = 10.0


@contextlib.asynccontextmanager
async def running(connection: MqttConnection) -> AsyncIterator[MqttConnection]:
    task = asyncio.create_task(connection.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await connection.wait_connected()
        yield connection
    finally:
        await connection.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Collected:
    """A handler that keeps what it is given and lets a test wait for it."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self._changed = asyncio.Event()

    def __call__(self, message: Received) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait(self, count: int) -> list[Received]:
        async with asyncio.timeout(WAIT_S):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.messages


def connection_to(broker: Mosquitto, client_id: str = "conn-test") -> MqttConnection:
    return MqttConnection(
        host=broker.host, port=broker.port, client_id=client_id, status_topic="test/status"
    )


async def publish(broker: Mosquitto, topic: str, *payloads: bytes, retain: bool = False) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1, retain=retain)


async def take(connection: MqttConnection, topic: str, count: int) -> list[Received]:
    got: list[Received] = []
    async with asyncio.timeout(WAIT_S):
        async for message in connection.messages(topic):
            got.append(message)
            if len(got) == count:
                return got
    return got


async def test_handled_and_queued_subscriptions_side_by_side(mosquitto: Mosquitto) -> None:
    handled = Collected()
    connection = connection_to(mosquitto)
    connection.subscribe("q", handler=handled)
    connection.subscribe("other")
    async with running(connection):
        await publish(mosquitto, "other", *(b"%d" % n for n in range(50)))
        assert len(await take(connection, "other", 50)) == 50
        await publish(mosquitto, "q", b"question")
        await handled.wait(1)
    assert [m.payload for m in handled.messages] == [b"question"]


async def test_a_failing_handler_is_logged_and_the_connection_goes_on(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    handled = Collected()

    def handler(message: Received) -> None:
        if message.payload == b"bad":
            raise ValueError("boom")
        handled(message)

    connection = connection_to(mosquitto)
    connection.subscribe("q", handler=handler)
    async with running(connection):
        await publish(mosquitto, "q", b"bad", b"good")
        await handled.wait(1)
        assert connection.connected
    assert [m.payload for m in handled.messages] == [b"good"]
    assert "handler for q failed" in caplog.text


async def test_retained_replays_are_marked(mosquitto: Mosquitto) -> None:
    await publish(mosquitto, "q", b"old", retain=True)
    handled = Collected()
    connection = connection_to(mosquitto)
    connection.subscribe("q", handler=handled)
    async with running(connection):
        await handled.wait(1)
        await publish(mosquitto, "q", b"live")
        await handled.wait(2)
    assert [(m.payload, m.retained) for m in handled.messages] == [(b"old", True), (b"live", False)]


async def test_publish_resolves_once_the_broker_has_the_message(mosquitto: Mosquitto) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as watcher:
        await watcher.subscribe("out", qos=1)
        connection = connection_to(mosquitto)
        async with running(connection):
            delivered = connection.publish("out", "答案")
            async with asyncio.timeout(WAIT_S):
                await delivered
                message = await anext(aiomqtt_messages(watcher))
    assert message == "答案".encode()


async def aiomqtt_messages(client: aiomqtt.Client) -> AsyncIterator[bytes]:
    async for message in client.messages:
        assert isinstance(message.payload, bytes)
        yield message.payload


async def test_a_publication_made_while_the_broker_is_down_is_delivered_after_it_returns(
    mosquitto: Mosquitto,
) -> None:
    connection = connection_to(mosquitto)
    async with running(connection):
        await mosquitto.stop()
        delivered = connection.publish("out", "later")
        await asyncio.sleep(0.2)
        assert not delivered.done()
        await mosquitto.start()
        async with asyncio.timeout(WAIT_S):
            await delivered


async def test_cancelling_the_connection_always_ends_it(mosquitto: Mosquitto) -> None:
    # Cancelled mid-session, aiomqtt may surface the cancel as an MqttError from the session's
    # tasks; the loop must not take that for a lost connection and reconnect for ever.
    for n in range(20):
        connection = connection_to(mosquitto, client_id=f"cancel-{n}")
        connection.subscribe("q")
        task = asyncio.create_task(connection.run())
        async with asyncio.timeout(WAIT_S):
            await connection.wait_connected()
        await connection.close()
        task.cancel()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
