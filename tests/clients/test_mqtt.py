"""The MQTT connection against a real mosquitto: acknowledgements, outbox and delivery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiomqtt

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


async def test_a_message_not_acknowledged_comes_back_in_the_next_session(
    mosquitto: Mosquitto,
) -> None:
    connection = connection_to(mosquitto)
    connection.subscribe("q", manual_ack=True)
    async with running(connection):
        await publish(mosquitto, "q", b"acked", b"not acked")
        acked, unacked = await take(connection, "q", 2)
        acked.ack()
        assert unacked.payload == b"not acked"  # taken but never acknowledged: a crash
    again = connection_to(mosquitto)
    again.subscribe("q", manual_ack=True)
    async with running(again):
        (redelivered,) = await take(again, "q", 1)
        redelivered.ack()
    assert redelivered.payload == b"not acked"


async def test_auto_acknowledged_subscriptions_keep_flowing_beside_manual_ones(
    mosquitto: Mosquitto,
) -> None:
    # With manual acks on, paho acknowledges nothing by itself: unacknowledged messages of
    # the other subscriptions would fill the broker's in-flight window (20) and stop all traffic.
    connection = connection_to(mosquitto)
    connection.subscribe("q", manual_ack=True)
    connection.subscribe("other")
    async with running(connection):
        await publish(mosquitto, "other", *(b"%d" % n for n in range(50)))
        assert len(await take(connection, "other", 50)) == 50
        await publish(mosquitto, "q", b"question")
        (message,) = await take(connection, "q", 1)
        message.ack()
    assert message.payload == b"question"


async def test_retained_replays_are_marked(mosquitto: Mosquitto) -> None:
    await publish(mosquitto, "q", b"old", retain=True)
    connection = connection_to(mosquitto)
    connection.subscribe("q", manual_ack=True)
    async with running(connection):
        (replayed,) = await take(connection, "q", 1)
        replayed.ack()
        await publish(mosquitto, "q", b"live")
        (live,) = await take(connection, "q", 1)
        live.ack()
    assert (replayed.payload, replayed.retained) == (b"old", True)
    assert (live.payload, live.retained) == (b"live", False)


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


async def test_unacknowledged_messages_hold_the_rest_at_the_broker(mosquitto: Mosquitto) -> None:
    # mosquitto sends at most 20 unacknowledged QoS 1 messages (max_inflight_messages): a
    # consumer that is behind slows the broker down instead of filling this process.
    connection = connection_to(mosquitto)
    connection.subscribe("q", manual_ack=True)
    async with running(connection):
        await publish(mosquitto, "q", *(b"%d" % n for n in range(25)))
        first = await take(connection, "q", 20)
        await asyncio.sleep(0.2)
        assert connection.queued("q") == 0  # the other five wait at the broker
        for message in first:
            message.ack()
        rest = await take(connection, "q", 5)
        for message in rest:
            message.ack()
    assert [m.payload for m in first + rest] == [b"%d" % n for n in range(25)]


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
