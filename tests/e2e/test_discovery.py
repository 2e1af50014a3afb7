"""Home Assistant MQTT discovery, driven as Home Assistant drives it over a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from tests.conftest import WAIT_S, Probe, make_settings
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI
from xiaoai_bridge import __version__
from xiaoai_bridge.app import Service, open_service, serve
from xiaoai_bridge.config import DEFAULT_SYSTEM_PROMPT, Settings
from xiaoai_bridge.discovery import (
    MAX_SPEAKERS,
    MAX_STATE_CHARS,
    object_id_for,
    truncate,
)
from xiaoai_bridge.models import Answer, Outcome, SpeakerId, Utterance

NODE = "bridge-under-test"  # make_settings' client id
IDENTIFIER = f"xiaoai_bridge_{NODE}"
STATUS = "xiaoai-bridge/status"
# The topic HA's MQTT integration subscribes to for discovery (homeassistant/components/mqtt).
DISCOVERY_TOPIC = re.compile(
    r"^homeassistant/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
    r"(?P<object_id>[a-zA-Z0-9_-]+)/config$"
)
# Options HA documents for each component (mqtt.markdown and the per-platform pages): a
# misspelt key would be silently ignored by HA, so only these may appear.
COMMON_KEYS = {
    "name",
    "unique_id",
    "device",
    "origin",
    "availability_topic",
    "payload_available",
    "payload_not_available",
    "icon",
    "qos",
    "entity_category",
    "device_class",
}
COMPONENT_KEYS = {
    "binary_sensor": {"state_topic", "payload_on", "payload_off"},
    "sensor": {"state_topic", "json_attributes_topic"},
    "switch": {"command_topic", "state_topic", "payload_on", "payload_off"},
    "button": {"command_topic", "payload_press"},
}
DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model", "sw_version"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}


# -- the service, as `xiaoai-bridge run` runs it ---------------------------------------------


@contextlib.asynccontextmanager
async def running(settings: Settings, *, discovery: bool = True) -> AsyncIterator[Service]:
    """The whole service with `[mqtt] discovery` on (or off)."""
    mqtt = settings.mqtt.model_copy(update={"discovery": discovery})
    stop = asyncio.Event()
    async with open_service(settings.model_copy(update={"mqtt": mqtt})) as service:
        assert (service.discovery is not None) == discovery
        serving = asyncio.create_task(serve(service, stop), name="serve")
        assert service.mqtt is not None
        async with asyncio.timeout(WAIT_S):
            await service.mqtt.wait_connected()  # subscribed: questions from now on count
        try:
            yield service
        finally:
            stop.set()
            async with asyncio.timeout(WAIT_S):
                await serving


# -- Home Assistant's side of MQTT ------------------------------------------------------------


@dataclass
class HomeAssistantStandIn:
    """Subscribes where HA's MQTT integration does; publishes HA's birth and commands."""

    client: aiomqtt.Client
    latest: dict[str, bytes] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            topic = str(message.topic)
            self.latest[topic] = payload
            self.counts[topic] += 1
            self.changed.set()

    async def until(self, condition: Callable[[], bool], wait_s: float = WAIT_S) -> None:
        """Wait until `condition()` holds, re-checking after every message."""
        async with asyncio.timeout(wait_s):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    async def value(self, topic: str, expected: bytes | None = None) -> bytes:
        """The payload on `topic` once it is non-empty (and equal to `expected`, if given)."""

        def ready() -> bool:
            got = self.latest.get(topic)
            return bool(got) and (expected is None or got == expected)

        await self.until(ready)
        return self.latest[topic]

    async def config(self, component: str, object_id: str) -> dict[str, Any]:
        """A discovery config, parsed, once it arrived."""
        data = json.loads(await self.value(config_topic(component, object_id)))
        assert isinstance(data, dict)
        return data

    async def publish(self, topic: str, payload: str, *, retain: bool = False) -> None:
        await self.client.publish(topic, payload, qos=1, retain=retain)


@contextlib.asynccontextmanager
async def home_assistant(broker: Mosquitto) -> AsyncIterator[HomeAssistantStandIn]:
    client = aiomqtt.Client(broker.host, broker.port, identifier="home-assistant")
    async with client:
        await client.subscribe("homeassistant/#", qos=1)
        await client.subscribe("xiaoai-bridge/#", qos=1)
        stand_in = HomeAssistantStandIn(client)
        task = asyncio.create_task(stand_in.run())
        try:
            yield stand_in
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def retained(broker: Mosquitto) -> dict[str, tuple[bytes, bool]]:
    """What a freshly started HA finds: every retained message, with its retain flag."""
    found: dict[str, tuple[bytes, bool]] = {}
    marker = "xiaoai-bridge-test/marker"
    async with aiomqtt.Client(broker.host, broker.port, identifier="late-joiner") as client:
        for topic_filter in ("homeassistant/#", "xiaoai-bridge/#", marker):
            await client.subscribe(topic_filter, qos=1)
        # Retained messages are sent on subscribe, so they all precede this marker.
        await client.publish(marker, b"end", qos=1)
        async with asyncio.timeout(WAIT_S):
            async for message in client.messages:
                if str(message.topic) == marker:
                    break
                assert isinstance(message.payload, bytes)
                found[str(message.topic)] = (message.payload, message.retain)
    return found


def config_topic(component: str, object_id: str) -> str:
    return f"homeassistant/{component}/{NODE}/{object_id}/config"


def kitchen_configs() -> list[tuple[str, str]]:
    return [
        ("binary_sensor", "connectivity"),
        ("switch", "answering"),
        ("sensor", "kitchen_question"),
        ("sensor", "kitchen_answer"),
        ("button", "kitchen_forget"),
    ]


def outcomes(service: Service) -> dict[object, Answer]:
    """Every finished answer by question id, as the metrics listener sees them."""
    seen: dict[object, Answer] = {}
    service.dispatcher.add_listener(lambda answer: seen.__setitem__(answer.utterance.id, answer))
    return seen


async def eventually(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Wait for a state change inside the service, which announces nothing over MQTT."""
    async with asyncio.timeout(WAIT_S):
        while True:
            met = condition()
            if met if isinstance(met, bool) else await met:
                return
            await asyncio.sleep(0.02)


# -- the tests --------------------------------------------------------------------------------


async def test_config_messages_have_the_shapes_home_assistant_documents(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    settings = make_settings(tmp_path, mosquitto, llm)
    async with home_assistant(mosquitto) as ha, running(settings):
        await probe.wait_status("online")
        await ha.config("switch", "answering")
        llm.answer = "从前有座山。" + "山里有座庙，" * 60 + "讲完了。"
        await probe.ask({"text": "机器人讲个很长的故事", "device": "kitchen", "id": "k1"})
        full_answer = (await probe.reply_json())["text"]
        await ha.value("xiaoai-bridge/kitchen/answer")
        snapshot = await retained(mosquitto)

    configs = {t: json.loads(p) for t, (p, _) in snapshot.items() if t.startswith("homeassistant/")}
    assert set(configs) == {config_topic(c, o) for c, o in kitchen_configs()}
    assert all(flag for _, flag in snapshot.values()), "every message here must be retained"
    unique_ids = [config["unique_id"] for config in configs.values()]
    assert len(set(unique_ids)) == len(unique_ids)
    for topic, config in configs.items():
        match = DISCOVERY_TOPIC.match(topic)
        assert match is not None, topic
        component = match["component"]
        assert set(config) <= COMMON_KEYS | COMPONENT_KEYS[component], topic
        assert config["unique_id"] == f"{IDENTIFIER}_{match['object_id']}"
        assert config["device"] == {
            "identifiers": [IDENTIFIER],
            "name": "xiaoai-bridge",
            "manufacturer": "xiaoai-bridge",
            "model": "XiaoAi LLM bridge",
            "sw_version": __version__,
        }
        assert set(config["device"]) <= DEVICE_KEYS
        assert config["origin"] == {"name": "xiaoai-bridge", "sw_version": __version__}
        assert set(config["origin"]) <= ORIGIN_KEYS
        assert isinstance(config["name"], str)
        assert config["name"]
        if component != "binary_sensor":
            assert config["availability_topic"] == STATUS
            assert (config["payload_available"], config["payload_not_available"]) == (
                "online",
                "offline",
            )
        for key in ("state_topic", "command_topic", "json_attributes_topic"):
            if key in config:
                assert "+" not in config[key]
                assert "#" not in config[key]

    connectivity = configs[config_topic("binary_sensor", "connectivity")]
    assert connectivity["device_class"] == "connectivity"
    assert connectivity["entity_category"] == "diagnostic"
    assert "availability_topic" not in connectivity  # offline must read "disconnected"
    assert connectivity["state_topic"] == STATUS
    assert snapshot[STATUS][0] == connectivity["payload_on"].encode()  # read while running

    switch = configs[config_topic("switch", "answering")]
    assert (switch["payload_on"], switch["payload_off"]) == ("ON", "OFF")
    assert snapshot[switch["state_topic"]][0] == b"ON"
    assert switch["command_topic"] != switch["state_topic"]

    question = configs[config_topic("sensor", "kitchen_question")]
    assert snapshot[question["state_topic"]][0].decode() == "机器人讲个很长的故事"
    attributes = json.loads(snapshot[question["json_attributes_topic"]][0])
    assert attributes["text"] == "机器人讲个很长的故事"
    assert (attributes["device"], attributes["question_id"]) == ("kitchen", "k1")
    assert "kitchen" in question["name"]

    answer = configs[config_topic("sensor", "kitchen_answer")]
    state = snapshot[answer["state_topic"]][0].decode()
    assert len(full_answer) > MAX_STATE_CHARS
    assert len(state) == MAX_STATE_CHARS
    assert state == truncate(full_answer, MAX_STATE_CHARS)
    attributes = json.loads(snapshot[answer["json_attributes_topic"]][0])
    assert attributes["text"] == full_answer
    assert attributes["outcome"] == "answered"
    assert attributes["total_s"] >= attributes["first_chunk_s"] > 0

    button = configs[config_topic("button", "kitchen_forget")]
    assert button["payload_press"] == "PRESS"
    assert button["command_topic"] == "xiaoai-bridge/kitchen/forget"


async def test_switch_turns_answering_off_and_on_end_to_end(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    settings = make_settings(tmp_path, mosquitto, llm)
    async with home_assistant(mosquitto) as ha, running(settings) as service:
        finished = outcomes(service)
        switch = await ha.config("switch", "answering")
        assert await ha.value(switch["state_topic"]) == b"ON"

        await ha.publish(switch["command_topic"], switch["payload_off"])
        await ha.value(switch["state_topic"], b"OFF")
        assert service.controls.answering is False
        await probe.ask({"text": "关着的时候问", "device": "kitchen", "id": "off"})
        await eventually(lambda: "off" in finished)
        assert (finished["off"].outcome, finished["off"].reason) == (Outcome.IGNORED, "disabled")

        await ha.publish(switch["command_topic"], switch["payload_on"])
        await ha.value(switch["state_topic"], b"ON")
        await probe.ask({"text": "开着的时候问", "device": "kitchen", "id": "on"})
        assert (await probe.reply_json())["id"] == "on"

    assert [r.last_user_message for r in llm.requests] == ["开着的时候问"]
    assert probe.chunks("off") == []
    # The sensors show only what was answered.
    assert ha.latest["xiaoai-bridge/kitchen/question"].decode() == "开着的时候问"


async def test_forget_button_clears_that_speakers_memory(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    settings = make_settings(tmp_path, mosquitto, llm)
    async with home_assistant(mosquitto) as ha, running(settings) as service:
        memory = service.pipeline.memory
        for n, device in enumerate(("kitchen", "kitchen", "bedroom")):
            await probe.ask({"text": f"第{n}个问题", "device": device, "id": n})
            await probe.reply_json()
        # The second kitchen question carried the first turn.
        assert len(llm.requests[1].messages) == 4

        button = await ha.config("button", "kitchen_forget")
        await ha.publish(button["command_topic"], button["payload_press"])
        kitchen, bedroom = SpeakerId("mqtt", "kitchen"), SpeakerId("mqtt", "bedroom")

        async def kitchen_forgotten() -> bool:
            return not await memory.history(kitchen)

        await eventually(kitchen_forgotten)
        assert len(await memory.history(bedroom)) == 2  # the other speaker keeps its memory

        await probe.ask({"text": "我们聊过什么", "device": "kitchen", "id": "after"})
        await probe.reply_json()

    assert llm.last_request.messages == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "我们聊过什么"},
    ]


async def test_config_is_published_again_when_home_assistant_comes_online(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    settings = make_settings(tmp_path, mosquitto, llm)
    async with home_assistant(mosquitto) as ha, running(settings):
        await probe.ask({"text": "你好", "device": "kitchen", "id": 1})
        await probe.reply_json()
        topics = [config_topic(c, o) for c, o in kitchen_configs()]
        await ha.until(lambda: all(ha.counts[t] for t in topics))
        before = {t: ha.counts[t] for t in topics}

        await ha.publish("homeassistant/status", "online")  # HA's birth message
        await ha.until(lambda: all(ha.counts[t] > before[t] for t in topics))
        assert json.loads(ha.latest[config_topic("button", "kitchen_forget")])["command_topic"]


async def test_restart_remembers_speakers_and_disabling_removes_everything(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    settings = make_settings(tmp_path, mosquitto, llm)
    async with home_assistant(mosquitto) as ha:
        async with running(settings):
            await probe.ask({"text": "你好", "device": "kitchen", "id": 1})
            await probe.reply_json()
            await ha.value("xiaoai-bridge/kitchen/answer")
            await ha.value(config_topic("button", "kitchen_forget"))

        # An entity an older version published, listed in the registry it left behind.
        stale = config_topic("sensor", "kitchen_busy")
        await ha.publish(stale, "{}", retain=True)
        registry = json.loads(await ha.value("xiaoai-bridge/discovery"))
        assert registry["speakers"] == ["kitchen"]
        registry["topics"].append(stale)
        await ha.publish("xiaoai-bridge/discovery", json.dumps(registry), retain=True)
        await ha.until(lambda: stale in json.loads(ha.latest["xiaoai-bridge/discovery"])["topics"])

        ha.counts.clear()
        async with running(settings):
            # Nobody spoke, yet the kitchen's entities come back, fresh; the stale one goes.
            await ha.until(lambda: ha.counts[config_topic("button", "kitchen_forget")] > 0)
            await ha.until(lambda: ha.latest[stale] == b"")
            await ha.publish("homeassistant/status", "online")
            await ha.until(lambda: ha.counts[config_topic("sensor", "kitchen_answer")] > 1)
        registry = json.loads(await ha.value("xiaoai-bridge/discovery"))
        assert stale not in registry["topics"]

        async with running(settings, discovery=False):
            await ha.until(lambda: ha.latest["xiaoai-bridge/discovery"] == b"")
        cleared = registry["topics"]
        assert all(ha.latest.get(topic, b"") == b"" for topic in cleared)

    left = await retained(mosquitto)
    assert set(left) == {STATUS}


def test_object_ids_are_valid_stable_and_distinct() -> None:
    valid = re.compile(r"^[a-zA-Z0-9_-]+$")
    devices = [
        "kitchen",
        "media_player.xiaomi_lx06_dea6_play_control",
        "a.b",
        "a_b",
        "Kitchen",
        "客厅",
        "卧室",
        "x" * 200,
        "x" * 201,
        "d/with+wild#cards",
    ]
    ids = [object_id_for(device) for device in devices]
    assert all(valid.match(object_id) for object_id in ids)
    assert len(set(ids)) == len(ids)
    assert ids == [object_id_for(device) for device in devices]
    assert object_id_for("kitchen") == "kitchen"  # readable ids stay as they are
    assert object_id_for("media_player.xiaomi_lx06_dea6_play_control").startswith(
        "media_player_xiaomi_lx06_dea6_play_control_"
    )


def test_truncate_keeps_short_text_and_marks_cuts() -> None:
    assert truncate("短", 255) == "短"
    cut = truncate("长" * 300, 255)
    assert len(cut) == 255
    assert cut.endswith("…")


async def test_answering_switched_on_the_status_page_shows_in_home_assistant(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    settings = make_settings(tmp_path, mosquitto, llm)
    async with home_assistant(mosquitto) as ha, running(settings) as service:
        switch = await ha.config("switch", "answering")
        assert await ha.value(switch["state_topic"]) == b"ON"
        assert service.http is not None
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{service.http.url}api/answering", json={"enabled": False}) as response,
        ):
            assert response.status == 200
        await ha.value(switch["state_topic"], b"OFF")
        assert service.controls.answering is False


async def test_answering_switched_in_home_assistant_shows_on_the_status_page(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    settings = make_settings(tmp_path, mosquitto, llm)
    async with home_assistant(mosquitto) as ha, running(settings) as service:
        assert service.http is not None
        switch = await ha.config("switch", "answering")
        with service.http.log.subscribe() as page:
            await ha.publish(switch["command_topic"], switch["payload_off"])
            async with asyncio.timeout(WAIT_S):
                events = await page.next_batch()
        assert [(e.kind, e.data) for e in events] == [("answering", {"enabled": False})]
        assert service.http.state()["answering"] is False


async def test_speakers_past_the_limit_are_warned_about_once_and_counted(
    tmp_path: Path,
    mosquitto: Mosquitto,
    llm: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(make_settings(tmp_path, mosquitto, llm)) as service:
        discovery = service.discovery
        assert discovery is not None
        for n in range(MAX_SPEAKERS):
            await discovery.begin(Utterance(text="你好", device=f"speaker-{n}"))
        caplog.clear()
        caplog.set_level(logging.DEBUG)
        for n in range(20):  # ten questions from each of two speakers past the limit
            utterance = Utterance(text="你好", device=f"extra-{n % 2}")
            await discovery.begin(utterance)
            await discovery.end(Answer(utterance, Outcome.ANSWERED, text="答"))
        assert len(discovery.speakers) == MAX_SPEAKERS
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert str(MAX_SPEAKERS) in warnings[0].getMessage()
        assert discovery.unannounced == 20


async def test_a_registry_nested_too_deep_is_ignored_not_fatal(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    settings = make_settings(tmp_path, mosquitto, llm)
    async with home_assistant(mosquitto) as ha, running(settings) as service:
        # Anyone on the broker can publish there; the bridge must read it and carry on.
        deep = b"[" * 100_000 + b"]" * 100_000
        await ha.client.publish("xiaoai-bridge/discovery", deep, qos=1, retain=True)
        # Our own registry replaces it (one that lists the bridge's topics), and answers go on.
        registry = await ha.value("xiaoai-bridge/discovery")
        async with asyncio.timeout(WAIT_S):
            while registry == deep:
                await asyncio.sleep(0.05)
                registry = ha.latest["xiaoai-bridge/discovery"]
        assert "topics" in json.loads(registry)
        await probe.ask({"text": "你好", "device": "kitchen", "id": 1})
        assert (await probe.reply_json())["id"] == 1
        assert all(not task.done() for task in asyncio.all_tasks() if task.get_name() == "serve")
        assert service.discovery is not None
