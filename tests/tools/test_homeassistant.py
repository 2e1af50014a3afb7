"""Home Assistant tools against the fake HA: exposure, names, acting, confirmation, Assist."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable

import pytest

from tests.fakes.homeassistant_server import DEFAULT_TOKEN, FakeHomeAssistant
from xiaoai_bridge.clients.homeassistant import HomeAssistantClient
from xiaoai_bridge.models import Utterance
from xiaoai_bridge.pipeline.tool_ports import NeedsConfirmation, ToolContext, ToolError
from xiaoai_bridge.reconnect import ReconnectPolicy
from xiaoai_bridge.tools.homeassistant import (
    ADMIN_NEEDED,
    ALLOWED_SERVICES,
    HomeAssistantTools,
    brief_state,
    normalized,
)

_LOGGER = logging.getLogger(__name__)
CONTEXT = ToolContext(Utterance("把客厅灯关了", device="kitchen", source="homeassistant"))

EXPOSED = {
    "light.living_room",  # default: a light, never asked about
    "light.living_lamp",
    "light.bedroom_lamp",
    "light.hallway",  # legacy (no unique id), default
    "switch.kettle",  # explicitly exposed
    "lock.front_door",
    "cover.garage",
    "sensor.living_temperature",  # default: a temperature sensor
    "climate.bedroom_ac",
}


def build_house(ha: FakeHomeAssistant) -> None:
    """A small house: two rooms, exposed and hidden entities, a lock and a garage door."""
    house = ha.house
    house.add_area("living_room", "客厅", aliases=["起居室"])
    house.add_area("bedroom", "卧室")
    ceiling = house.add_device("客厅吊灯", area_id="living_room")
    house.add_entity(
        "light.living_room",
        "on",
        {"brightness": 204, "color_mode": "brightness"},
        name="客厅灯",
        aliases=["大灯"],
        device_id=ceiling,
    )
    house.add_entity("light.living_lamp", "off", name="台灯", area_id="living_room")
    house.add_entity("light.bedroom_lamp", "off", name="台灯", area_id="bedroom")
    house.add_entity("light.bedroom", "off", name="卧室灯", area_id="bedroom", expose=False)
    house.add_entity("light.hallway", "off", name="走廊灯", registered=False)
    house.add_entity("light.balcony", "off", name="阳台灯", registered=False, expose=False)
    house.add_entity("switch.fan_plug", "off", name="风扇插座", hidden=True)
    house.add_entity("switch.kettle", "off", name="烧水壶", hidden=True, expose=True)
    house.add_entity("lock.front_door", "locked", name="前门锁")
    house.add_entity(
        "cover.garage", "closed", {"current_position": 0}, name="车库门", device_class="garage"
    )
    house.add_entity(
        "sensor.living_temperature",
        "23.5",
        {"unit_of_measurement": "°C", "state_class": "measurement"},
        name="客厅温度",
        device_class="temperature",
        area_id="living_room",
    )
    house.add_entity("sensor.power", "120", {"unit_of_measurement": "W"}, device_class="power")
    house.add_entity(
        "sensor.signal",
        "-60",
        name="信号",
        device_class="temperature",
        entity_category="diagnostic",
    )
    house.add_entity(
        "climate.bedroom_ac",
        "off",
        {"hvac_modes": ["off", "cool", "heat"], "current_temperature": 27, "temperature": 26},
        name="空调",
        area_id="bedroom",
    )
    ha.add_speaker()


def make_client(ha: FakeHomeAssistant) -> HomeAssistantClient:
    policy = ReconnectPolicy(
        name="homeassistant", logger=_LOGGER, initial_delay_s=0.01, max_delay_s=0.05
    )
    return HomeAssistantClient(
        ha.url, DEFAULT_TOKEN, policy=policy, connect_timeout_s=2.0, command_timeout_s=2.0
    )


async def eventually(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait until `predicate()` holds (the source works in its own task)."""
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 - the source has no event to wait on
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(ha: FakeHomeAssistant, **options: object) -> AsyncIterator[HomeAssistantTools]:
    """The source running against `ha`, once its first read is done."""
    async with make_client(ha) as client:
        tools = HomeAssistantTools(client, debounce_s=0, retry_s=0.05, **options)  # type: ignore[arg-type]
        task = asyncio.create_task(tools.run(), name="tools:homeassistant")
        try:
            await eventually(
                lambda: (
                    tools.refreshes > 0
                    or (not tools.health().ok and "admin" in tools.health().detail)
                )
            )
            yield tools
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def tools(ha: FakeHomeAssistant) -> AsyncIterator[HomeAssistantTools]:
    build_house(ha)
    async with running(ha) as source:
        yield source


async def call(source: HomeAssistantTools, name: str, **arguments: object) -> object:
    found = next(t for t in source.tools() if t.spec.name == name)
    return await found.call(arguments, CONTEXT)


async def test_exposed_are_those_assist_may_use_with_ha_lazy_defaults(
    tools: HomeAssistantTools,
) -> None:
    assert set(tools.exposed) == EXPOSED
    living = tools.exposed["light.living_room"]
    assert (living.name, living.aliases, living.area) == ("客厅灯", ("大灯",), "客厅")
    assert living.area_aliases == ("起居室",)  # the area comes from the device
    assert tools.exposed["light.hallway"].area is None
    assert tools.health().ok
    assert tools.health().detail == f"{len(EXPOSED)} entities exposed to Assist"
    assert [t.spec.name for t in tools.tools()] == ["ha_get_state", "ha_control"]


async def test_nothing_is_exposed_by_default_when_new_entities_are_not(
    ha: FakeHomeAssistant,
) -> None:
    build_house(ha)
    ha.house.expose_new["conversation"] = False
    async with running(ha) as tools:
        assert set(tools.exposed) == {"switch.kettle"}


async def test_a_non_admin_token_gets_no_entity_tools_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with FakeHomeAssistant(admin=False) as ha:
        build_house(ha)
        with caplog.at_level(logging.ERROR, "xiaoai_bridge.tools.homeassistant"):
            async with running(ha, assist=True) as tools:
                health = tools.health()
                offered = [t.spec.name for t in tools.tools()]
    assert not health.ok
    assert health.detail == ADMIN_NEEDED
    assert "administrator" in health.detail
    assert offered == ["ha_assist"]  # HA's own agent needs no admin
    assert [r.getMessage() for r in caplog.records].count(
        f"homeassistant tools: {ADMIN_NEEDED}"
    ) == 1


async def test_the_entity_list_tells_the_model_names_aliases_areas_and_states(
    tools: HomeAssistantTools,
) -> None:
    spec = next(t.spec for t in tools.tools() if t.spec.name == "ha_get_state")
    listing = spec.parameters["properties"]["entity"]["description"]  # type: ignore[index]
    assert '- light.living_room "客厅灯" aliases 大灯 [客厅]: on, brightness 80%' in listing
    assert "sensor.living_temperature" in listing
    assert "23.5 °C" in listing
    assert 'light.bedroom"' not in listing
    assert "switch.fan_plug" not in listing
    for offered in tools.tools():
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", offered.spec.name)


async def test_turning_a_light_off_by_its_spoken_name(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    result = await call(tools, "ha_control", entity="客厅灯", service="turn_off")
    assert result == "done: light.turn_off on 客厅灯 (light.living_room)"
    assert ha.states["light.living_room"]["state"] == "off"
    (sent,) = ha.calls_to("light", "turn_off")
    assert sent.target == {"entity_id": ["light.living_room"]}
    # The subscription brings the new state to the source too.
    await eventually(lambda: '"客厅灯" aliases 大灯 [客厅]: off' in str(tools.tools()[0].spec))
    assert "客厅灯 (light.living_room, area 客厅): off" in str(
        await call(tools, "ha_get_state", entity="大灯")
    )


async def test_names_resolve_by_alias_area_and_area_plus_name(tools: HomeAssistantTools) -> None:
    assert tools.resolve("大灯").entity_id == "light.living_room"
    assert tools.resolve("light.hallway").entity_id == "light.hallway"
    assert tools.resolve("台灯", "卧室").entity_id == "light.bedroom_lamp"
    assert tools.resolve("卧室台灯").entity_id == "light.bedroom_lamp"
    assert tools.resolve("起居室的台灯").entity_id == "light.living_lamp"
    assert tools.resolve("烧水壶").entity_id == "switch.kettle"
    with pytest.raises(ToolError, match="several") as info:
        tools.resolve("台灯")
    assert "light.living_lamp" in str(info.value)
    assert "light.bedroom_lamp" in str(info.value)
    with pytest.raises(ToolError, match="no entity exposed"):
        tools.resolve("洗衣机")


async def test_entities_not_exposed_are_refused_by_id_and_by_name(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    for name in ("light.bedroom", "卧室灯", "switch.fan_plug", "阳台灯", "sensor.power"):
        with pytest.raises(ToolError, match="not exposed to Assist"):
            await call(tools, "ha_control", entity=name, service="turn_on")
        with pytest.raises(ToolError, match="not exposed to Assist"):
            await call(tools, "ha_get_state", entity=name)
    assert ha.calls_to("light", "turn_on") == []
    assert ha.calls_to("switch", "turn_on") == []


async def test_only_allow_listed_services_and_fields_are_called(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"entity": "客厅灯", "service": "reload"}, "not allowed for light"),
        ({"entity": "客厅温度", "service": "turn_on"}, "only be read"),
        ({"entity": "客厅灯", "service": "turn_on", "brightness_pct": 150}, "between 0 and 100"),
        ({"entity": "烧水壶", "service": "turn_on", "brightness_pct": 50}, "does not apply"),
        ({"entity": "空调", "service": "set_hvac_mode", "hvac_mode": "party"}, "hvac_mode"),
        ({"entity": "空调", "service": "set_temperature"}, "needs temperature"),
        ({"entity": 42, "service": "turn_on"}, "entity is required"),
        # No secrets through the model: a lock code is not taken.
        ({"entity": "前门锁", "service": "unlock", "code": "1234"}, "does not apply"),
    ]
    for arguments, message in cases:
        with pytest.raises(ToolError, match=message):
            await call(tools, "ha_control", **arguments)
    assert [c for c in ha.calls if c.domain != "xiaomi_miot"] == []
    assert "homeassistant" not in ALLOWED_SERVICES
    assert "shell_command" not in ALLOWED_SERVICES


async def test_service_data_reaches_home_assistant(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    await call(tools, "ha_control", entity="客厅灯", service="turn_on", brightness_pct=40)
    await call(
        tools,
        "ha_control",
        entity="空调",
        service="set_temperature",
        temperature=24,
        hvac_mode="cool",
    )
    assert ha.states["light.living_room"]["attributes"]["brightness"] == 102
    assert ha.states["climate.bedroom_ac"]["state"] == "cool"
    assert ha.calls_to("climate", "set_temperature")[0].service_data == {
        "temperature": 24.0,
        "hvac_mode": "cool",
    }


async def test_a_lock_asks_first_and_acts_only_when_confirmed(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    result = await call(tools, "ha_control", entity="前门锁", service="unlock")
    assert isinstance(result, NeedsConfirmation)
    assert result.prompt == "确定要打开前门锁吗？"
    assert ha.calls_to("lock", "unlock") == []
    assert ha.states["lock.front_door"]["state"] == "locked"
    assert await result.action() == "好的，前门锁已打开。"
    assert ha.states["lock.front_door"]["state"] == "unlocked"
    assert len(ha.calls_to("lock", "unlock")) == 1


async def test_a_garage_door_asks_first_but_stops_at_once(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    opening = await call(tools, "ha_control", entity="车库门", service="open")
    assert isinstance(opening, NeedsConfirmation)
    assert opening.prompt == "确定要打开车库门吗？"
    assert await call(tools, "ha_control", entity="车库门", service="stop") == (
        "done: cover.stop_cover on 车库门 (cover.garage)"
    )
    assert ha.calls_to("cover", "open_cover") == []


async def test_a_confirmed_action_that_fails_is_spoken_as_an_apology(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    result = await call(tools, "ha_control", entity="前门锁", service="lock")
    assert isinstance(result, NeedsConfirmation)
    ha.fail_service("lock", "lock", message="Lock jammed")
    assert await result.action() == "抱歉，前门锁没能锁上。"


async def test_a_failed_service_is_a_tool_error_naming_the_reason(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    ha.fail_service("switch", "turn_on", message="Device offline")
    with pytest.raises(ToolError, match="Device offline"):
        await call(tools, "ha_control", entity="烧水壶", service="turn_on")


async def test_exposing_an_entity_in_home_assistant_offers_it_at_once(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    ha.house.expose("light.bedroom", True)
    await eventually(lambda: "light.bedroom" in tools.exposed)
    await call(tools, "ha_control", entity="卧室灯", service="turn_on")
    assert ha.states["light.bedroom"]["state"] == "on"
    ha.house.expose("light.bedroom", False)
    await eventually(lambda: "light.bedroom" not in tools.exposed)


async def test_it_reads_the_house_again_after_home_assistant_restarts(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    before = tools.refreshes
    await ha.restart()
    await eventually(lambda: tools.refreshes > before)
    await call(tools, "ha_control", entity="走廊灯", service="turn_on")
    assert ha.states["light.hallway"]["state"] == "on"
    # States are followed on the new connection too.
    ha.set_state("sensor.living_temperature", "25.0", {"unit_of_measurement": "°C"})
    await eventually(lambda: "25.0 °C" in str(tools.tools()[0].spec))


async def test_an_older_home_assistant_is_reported_once_and_retried_gently(
    ha: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    build_house(ha)
    ha.house.missing.add("config/entity_registry/get_entries")
    async with make_client(ha) as client:
        tools = HomeAssistantTools(client, retry_s=0.01, refresh_s=0.05)
        with caplog.at_level(logging.DEBUG, "xiaoai_bridge.tools.homeassistant"):
            task = asyncio.create_task(tools.run())
            await ha.wait_for_commands("homeassistant/expose_entity/list", 4, within_s=5)
            health, offered = tools.health(), tools.tools()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert not health.ok
    assert "unknown_command" in health.detail
    assert offered == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot read the exposed entities" in warnings[0].getMessage()


async def test_specs_are_rebuilt_only_after_a_change(
    ha: FakeHomeAssistant, tools: HomeAssistantTools
) -> None:
    first = tools.tools()[0].spec
    assert tools.tools()[0].spec is first
    ha.set_state("sensor.living_temperature", "19.0", {"unit_of_measurement": "°C"})
    await eventually(lambda: tools.tools()[0].spec is not first)
    assert "19.0 °C" in str(tools.tools()[0].spec.parameters)


async def test_assist_hands_the_words_to_home_assistants_agent(ha: FakeHomeAssistant) -> None:
    build_house(ha)
    ha.house.agent = lambda text, language, agent_id: ("action_done", "已关闭客厅灯")
    async with running(ha, assist=True, assist_agent_id="conversation.home_assistant") as tools:
        assert await call(tools, "ha_assist", text="把客厅灯关了") == (
            "Home Assistant's agent answered: 已关闭客厅灯"
        )
        await call(tools, "ha_assist", text="再打开")
        ha.house.agent = lambda text, language, agent_id: ("error", "Sorry, I couldn't understand")
        with pytest.raises(ToolError, match="couldn't understand"):
            await call(tools, "ha_assist", text="乱说")
    first, second, _ = ha.house.conversations
    assert first["text"] == "把客厅灯关了"
    assert first["agent_id"] == "conversation.home_assistant"
    assert "conversation_id" not in first
    assert second["conversation_id"]  # the speaker's conversation goes on


async def test_without_home_assistant_there_are_no_tools(ha: FakeHomeAssistant) -> None:
    build_house(ha)
    async with running(ha, assist=True) as tools:
        async with ha.down():
            await eventually(lambda: not tools.tools())
            assert not tools.health().ok
        await eventually(lambda: len(tools.tools()) == 3)


def test_brief_state_and_names() -> None:
    assert brief_state({"state": "on", "attributes": {"brightness": 255}}) == "on, brightness 100%"
    assert brief_state({"state": "heat", "attributes": {"temperature": 24}}) == "heat, set to 24"
    assert brief_state(None) == "unknown"
    assert normalized(" 客厅 的 灯！") == "客厅灯"
