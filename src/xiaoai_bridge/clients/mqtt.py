"""One long-lived MQTT connection: persistent session, reconnect, outbox, availability."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from xiaoai_bridge.reconnect import ReconnectPolicy, ReconnectRunner, Retry

_LOGGER = logging.getLogger(__name__)
# aiomqtt warns at every publish beyond ten unacknowledged ones; our window allows more on
# purpose, so its client gets a logger that keeps errors only.
_AIOMQTT_LOGGER = logging.getLogger(f"{__name__}.aiomqtt")
_AIOMQTT_LOGGER.setLevel(logging.ERROR)

ONLINE = "online"
OFFLINE = "offline"
# Received messages waiting for their consumer. When it is full the receiver waits, messages
# stay unacknowledged, and the broker stops sending at its in-flight limit (20 in mosquitto):
# the broker holds the backlog, nothing is dropped in our process.
MAX_QUEUED_INCOMING = 1_000
PUBLISH_TIMEOUT_S = 10.0
# Publications handed to the broker before their PUBACKs return; waiting for each ack in
# turn would cap a busy bridge at one round trip per message.
MAX_IN_FLIGHT = 64
# Without TCP_NODELAY a stream message sent right after a PUBACK waits for the broker's
# delayed ACK (~40 ms on Linux): Nagle's algorithm, costly for sentence-by-sentence speech.
_SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Publication:
    """A message waiting in the outbox; `delivered` resolves when the broker has it."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    delivered: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future(), compare=False
    )


@dataclass(frozen=True, slots=True)
class Received:
    """A message from the broker, reduced to what sources need."""

    topic: str
    payload: bytes
    # Replayed by the broker because a retained copy exists, not published just now.
    retained: bool = False


# Takes a message synchronously, before the broker is acknowledged (see `subscribe`).
Handler = Callable[[Received], None]


class MqttConnection:
    """Keeps one connection up and carries every publish and subscription over it.

    The session is persistent (clean_session=False), so QoS 1 questions published while the
    bridge is away are delivered when it returns. Publications wait in an outbox while the
    broker is unreachable and go out, in order, after the reconnect.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        subscriptions: Sequence[str] = (),
        status_topic: str,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        keepalive_s: int = 30,
        policy: ReconnectPolicy | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._client_id = client_id
        # Topic filter -> the queue of its consumer; every filter is subscribed at QoS 1.
        self._subscriptions: dict[str, asyncio.Queue[Received]] = {}
        # Filters whose messages a handler takes synchronously, before the acknowledgement.
        self._handlers: dict[str, Handler] = {}
        for topic in subscriptions:
            self.subscribe(topic)
        self._status_topic = status_topic
        self._username = username
        self._password = password
        self._tls = tls
        self._keepalive_s = keepalive_s
        self.policy = policy or ReconnectPolicy(f"mqtt {host}:{port}", _LOGGER)
        self._runner = ReconnectRunner(self.policy, _classify)
        # Not yet handed to the broker, and handed but not yet acknowledged (by sequence).
        self._outbox: deque[Publication] = deque()
        self._unacked: dict[int, Publication] = {}
        self._sequence = 0
        self._outbox_ready = asyncio.Event()
        self._outbox_empty = asyncio.Event()
        self._outbox_empty.set()
        self._connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None

    @property
    def connected(self) -> bool:
        """True while the broker session is up."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Return once the connection is up."""
        await self._connected.wait()

    def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a message; it is sent as soon as the connection allows, in order.

        The returned future resolves once the broker has acknowledged it (QoS 1) or it was
        handed to the socket (QoS 0); awaiting it is optional.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        publication = Publication(topic, data, qos, retain)
        self._outbox.append(publication)
        self._outbox_ready.set()
        self._outbox_empty.clear()
        return publication.delivered

    def subscribe(self, topic_filter: str, *, handler: Handler | None = None) -> None:
        """Receive `topic_filter` from the next (re)connection on; call before `run`.

        Without a handler, messages wait in a queue for `messages()`. A `handler` is called
        with each message as it is read off the socket, and the broker's acknowledgement goes
        out only after it returns: a handler that records the message durably makes it safe
        from a killed process (unacknowledged, the broker delivers it again), without the
        delay of a queue or a task switch, so a burst drains from the broker at socket speed.
        """
        if handler is not None:
            self._handlers[topic_filter] = handler
        self._subscriptions.setdefault(topic_filter, asyncio.Queue(MAX_QUEUED_INCOMING))

    async def messages(self, topic_filter: str) -> AsyncIterator[Received]:
        """Every message matching a subscribed filter, across reconnects."""
        queue = self._subscriptions[topic_filter]
        while True:
            yield await queue.get()

    @property
    def pending(self) -> int:
        """Publications not yet acknowledged by the broker."""
        return len(self._outbox) + len(self._unacked)

    async def flush(self) -> None:
        """Wait until every publication is acknowledged (used at shutdown, under a deadline)."""
        await self._outbox_empty.wait()

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; until cancelled."""
        # The runner also ends on a cancel that aiomqtt reports as an MqttError (it can,
        # during connect and disconnect), which would otherwise look like a lost connection.
        await self._runner.run(self._attempt)

    async def _attempt(self) -> None:
        try:
            await self._serve_once()
        finally:
            self._connected.clear()
            self._client = None
            # Unacknowledged messages go out again first, in their original order.
            self._outbox.extendleft(reversed(list(self._unacked.values())))
            self._unacked.clear()
        raise aiomqtt.MqttError("the broker session ended")  # so the runner reconnects

    async def close(self) -> None:
        """Announce `offline` (the will covers crashes; this covers orderly stops)."""
        client = self._client
        if client is not None and self.connected:
            try:
                await client.publish(self._status_topic, OFFLINE, qos=1, retain=True, timeout=2.0)
            except (aiomqtt.MqttError, TimeoutError) as err:
                _LOGGER.debug("could not publish offline status: %s", err)
        self.policy.stopped()

    async def _serve_once(self) -> None:
        client = aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._client_id,
            username=self._username,
            password=self._password,
            clean_session=False,
            keepalive=self._keepalive_s,
            timeout=CONNECT_TIMEOUT_S,
            will=aiomqtt.Will(self._status_topic, OFFLINE, qos=1, retain=True),
            tls_context=ssl.create_default_context() if self._tls else None,
            # Unbounded on purpose: aiomqtt discards messages past its bound without a trace.
            # Our own queues are bounded instead, and wait (see MAX_QUEUED_INCOMING).
            max_queued_incoming_messages=None,
            socket_options=_SOCKET_OPTIONS,
            logger=_AIOMQTT_LOGGER,
        )
        if self._handlers:
            _hand_messages_to(client, self._handle)
        async with client:
            self._client = client
            for topic_filter in self._subscriptions:
                await client.subscribe(topic_filter, qos=1)
            await client.publish(self._status_topic, ONLINE, qos=1, retain=True)
            # aiomqtt's publish (asyncio.wait_for in 3.11) can swallow a cancel that arrives as
            # its PUBACK does: the runner's connected() checks for one before serving, or a
            # SIGTERM now would be lost.
            self._runner.connected()
            self._connected.set()
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._send(client, group), name="mqtt:send")
                    group.create_task(self._receive(client), name="mqtt:receive")
                    # Wait inside the body: Python 3.11's TaskGroup cancels its parent when a
                    # task fails and only undoes that if the failure comes before __aexit__;
                    # left over, the cancel would be mistaken for a shutdown (see run()).
                    await asyncio.get_running_loop().create_future()
            except ExceptionGroup as errors:
                # Both tasks die of the same lost connection; report it once, plainly.
                raise errors.exceptions[0] from None

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
            received = Received(str(message.topic), bytes(data), bool(message.retain))
            for topic_filter, queue in self._subscriptions.items():
                if topic_filter not in self._handlers and message.topic.matches(topic_filter):
                    await queue.put(received)

    def _handle(self, topic: str, payload: bytes, retained: bool) -> bool:
        """Give a message to its handler; False if no handler wants it (it is queued)."""
        received: Received | None = None
        name = aiomqtt.Topic(topic)
        for topic_filter, handler in self._handlers.items():
            if name.matches(topic_filter):
                received = received or Received(topic, payload, retained)
                try:
                    handler(received)
                except Exception:
                    # Outside input must never stop the connection; the bug is logged.
                    _LOGGER.exception("handler for %s failed", topic_filter)
        return received is not None

    async def _send(self, client: aiomqtt.Client, group: asyncio.TaskGroup) -> None:
        window = asyncio.Semaphore(MAX_IN_FLIGHT)
        while True:
            while not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            await window.acquire()
            item = self._outbox.popleft()
            self._sequence += 1
            self._unacked[self._sequence] = item
            # Tasks start in creation order, so paho sends the messages in outbox order.
            group.create_task(
                self._publish(client, self._sequence, item, window), name="mqtt:publish"
            )

    async def _publish(
        self, client: aiomqtt.Client, sequence: int, item: Publication, window: asyncio.Semaphore
    ) -> None:
        # QoS 1: returns on PUBACK. If the connection drops first, the item is still in
        # _unacked and is sent again after the reconnect (at least once).
        await client.publish(
            item.topic, item.payload, qos=item.qos, retain=item.retain, timeout=PUBLISH_TIMEOUT_S
        )
        del self._unacked[sequence]
        window.release()
        if not item.delivered.done():
            item.delivered.set_result(None)
        if not self._outbox and not self._unacked:
            self._outbox_empty.set()


def _classify(error: Exception) -> Retry | None:
    if isinstance(error, aiomqtt.MqttCodeError) and error.rc in (4, 5, 134, 135):
        return Retry.SLOWLY  # bad credentials / not authorised
    if isinstance(error, aiomqtt.MqttError | OSError | TimeoutError):
        return Retry.SOON
    return None


# aiomqtt 2.x hands messages over only through its queue, drained by a task: by then paho
# has acknowledged them. paho's own callback runs before its acknowledgement, so handlers
# hook in there. The one use of aiomqtt's private client, checked by tests/clients/test_mqtt.py.
def _hand_messages_to(client: aiomqtt.Client, handle: Callable[[str, bytes, bool], bool]) -> None:
    paho = client._client
    queue_it = paho.on_message

    def on_message(paho_client: Any, userdata: Any, message: Any) -> None:
        handled = handle(message.topic, bytes(message.payload), bool(message.retain))
        if not handled and queue_it is not None:
            queue_it(paho_client, userdata, message)

    paho.on_message = on_message
