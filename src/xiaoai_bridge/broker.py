"""The embedded MQTT broker (amqtt), so a fresh install runs with no config at all."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from amqtt.broker import Broker

from xiaoai_bridge.errors import BridgeError

_LOGGER = logging.getLogger(__name__)


class BrokerStartError(BridgeError):
    """The embedded broker could not listen (port taken, no permission)."""


@contextlib.asynccontextmanager
async def embedded_broker(host: str, port: int) -> AsyncIterator[None]:
    """Run an anonymous broker on host:port for the duration of the context."""
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
    )
    try:
        await broker.start()
    except Exception as err:  # amqtt wraps bind errors in its own BrokerError
        raise BrokerStartError(
            f"cannot start the embedded MQTT broker on {host}:{port} ({err}); another broker "
            "may already listen there: set [mqtt] url to use it"
        ) from err
    _LOGGER.info("embedded MQTT broker listening on %s:%d", host, port)
    try:
        yield
    finally:
        await broker.shutdown()
