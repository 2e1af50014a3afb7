"""A connection cancelled while it is still setting up its session ends, whenever it comes."""

from __future__ import annotations

import asyncio

import aiomqtt

from tests.fakes.mosquitto import Mosquitto
from xiaoai_bridge.clients.mqtt import MqttConnection

WAIT_S = 5.0
ATTEMPTS = 40


async def test_a_cancel_during_session_setup_ends_the_connection(mosquitto: Mosquitto) -> None:
    # Python 3.11's asyncio.wait_for (which aiomqtt awaits subscribe and publish with) loses a
    # cancel that arrives as the awaited reply does: the session then sets itself up and waits
    # for ever, and a SIGTERM right after start-up never finishes.
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="watcher") as watcher:
        await watcher.subscribe("cancel-test/status", qos=1)
        for n in range(ATTEMPTS):
            connection = MqttConnection(
                host=mosquitto.host,
                port=mosquitto.port,
                client_id=f"cancel-setup-{n}",
                status_topic="cancel-test/status",
                subscriptions=[f"cancel-test/{n}/a", f"cancel-test/{n}/b"],
            )
            task = asyncio.create_task(connection.run())
            # Cancel the moment the broker passes on our "online": the PUBACK is on its way.
            async with asyncio.timeout(WAIT_S):
                async for message in watcher.messages:
                    if message.payload == b"online":
                        break
            task.cancel()
            async with asyncio.timeout(WAIT_S):
                await asyncio.gather(task, return_exceptions=True)
            assert task.cancelled(), f"attempt {n}"
