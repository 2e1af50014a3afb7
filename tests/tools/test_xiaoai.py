"""XiaoAi's skills tool against the fake Home Assistant and the fake Xiaomi cloud."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cloud_auth
from tests.fakes.homeassistant_server import (
    DEFAULT_TOKEN,
    FakeHomeAssistant,
    FakeSpeaker,
    RecordedCall,
)
from tests.fakes.xiaomi_cloud import MIOT, ActionCall, FakeXiaomiCloud
from tests.fakes.xiaomi_cloud import FakeSpeaker as CloudSpeaker
from xiaoai_bridge.clients.homeassistant import HomeAssistantClient
from xiaoai_bridge.clients.xiaomi import new_session
from xiaoai_bridge.clients.xiaomi.miot import MiotClient, SpeakerActions
from xiaoai_bridge.models import HomeAssistantRoute, Utterance, XiaomiRoute
from xiaoai_bridge.pipeline.tool_ports import Tool, ToolContext, ToolError, ToolSource
from xiaoai_bridge.reconnect import ReconnectPolicy
from xiaoai_bridge.tools.xiaoai import (
    ACCEPTED,
    ACCEPTED_SILENTLY,
    ECHO_WINDOW_S,
    MAX_COMMAND_CHARS,
    TOOL_NAME,
    XiaoAiExecuteTool,
    XiaoAiSkills,
)

_LOGGER = logging.getLogger(__name__)
ALARM = "明天早上七点叫我起床"


@pytest.fixture
async def client(ha: FakeHomeAssistant) -> AsyncIterator[HomeAssistantClient]:
    policy = ReconnectPolicy(
        name="homeassistant", logger=_LOGGER, initial_delay_s=0.01, max_delay_s=0.05
    )
    ha_client = HomeAssistantClient(
        ha.url, DEFAULT_TOKEN, policy=policy, command_timeout_s=2.0, connect_wait_s=0.3
    )
    await ha_client.start()
    await ha_client.wait_connected(2.0)
    yield ha_client
    await ha_client.aclose()


@pytest.fixture
def speaker(ha: FakeHomeAssistant) -> FakeSpeaker:
    return ha.add_speaker()


@pytest.fixture
async def cloud() -> AsyncIterator[FakeXiaomiCloud]:
    async with FakeXiaomiCloud() as fake:
        yield fake


@pytest.fixture
async def miot(cloud: FakeXiaomiCloud, tmp_path: Path) -> AsyncIterator[MiotClient]:
    async with new_session() as session:
        auth = cloud_auth(cloud, session, tmp_path / "token.json")
        yield MiotClient(session, auth, base_url=cloud.endpoints["miot"], timeout_s=0.5)


def ha_context(speaker: FakeSpeaker) -> ToolContext:
    """A question as the Home Assistant source hands it over."""
    route = HomeAssistantRoute(
        media_player=speaker.media_player,
        sensor=speaker.sensor,
        timestamp="2026-11-29T12:00:00+00:00",
    )
    return ToolContext(
        Utterance(
            text="机器人定个闹钟", device=speaker.media_player, source="homeassistant", route=route
        )
    )


def cloud_context(speaker: CloudSpeaker, *, hardware: str | None = None) -> ToolContext:
    """A question as the Xiaomi source hands it over."""
    route = XiaomiRoute(
        device_id=speaker.device_id,
        hardware=hardware or speaker.hardware,
        miot_did=speaker.miot_did,
        name=speaker.name,
    )
    return ToolContext(
        Utterance(text="机器人定个闹钟", device=speaker.device_id, source="xiaomi", route=route)
    )


def speaker_calls(ha: FakeHomeAssistant) -> list[RecordedCall]:
    return ha.calls_to("xiaomi_miot", "intelligent_speaker")


# --- the tool as the loop sees it ---------------------------------------------------------------


def test_the_source_offers_one_well_named_tool(client: HomeAssistantClient) -> None:
    source: ToolSource = XiaoAiSkills(homeassistant=client)
    (tool,) = source.tools()
    assert source.name == "xiaoai"
    assert tool.spec.name == TOOL_NAME
    assert tool.spec.parameters["required"] == ["command"]
    # The model is told XiaoAi answers aloud itself, so it keeps its own answer short.
    assert "aloud" in tool.spec.description
    assert source.health().ok


def test_a_source_without_clients_offers_nothing() -> None:
    source = XiaoAiSkills()
    assert source.tools() == ()
    assert not source.health().ok


def test_offered_only_to_a_question_with_a_reachable_speaker(
    client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    ha_only: Tool = XiaoAiExecuteTool(homeassistant=client)
    mqtt = ToolContext(Utterance(text="机器人定个闹钟", device="kitchen"))
    xiaomi = ToolContext(
        Utterance(
            text="机器人定个闹钟",
            source="xiaomi",
            route=XiaomiRoute(device_id="d", hardware="LX06", miot_did="1", name="n"),
        )
    )
    assert ha_only.offered_to(ha_context(speaker))
    assert not ha_only.offered_to(mqtt)
    assert not ha_only.offered_to(xiaomi)


# --- Home Assistant: xiaomi_miot.intelligent_speaker with execute --------------------------------


async def test_home_assistant_executes_on_the_asking_speaker(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    other = ha.add_speaker("b0b0", name="卧室")
    tool = XiaoAiExecuteTool(homeassistant=client)

    result = await tool.call({"command": f"  {ALARM} "}, ha_context(speaker))

    assert result == ACCEPTED
    (call,) = speaker_calls(ha)
    assert call.service_data == {
        "entity_id": speaker.media_player,
        "text": ALARM,
        "execute": True,
        "silent": False,
    }
    assert call.target is None
    assert call.return_response is True
    assert call.entity_id != other.media_player


async def test_home_assistant_silent_execution(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    tool = XiaoAiExecuteTool(homeassistant=client, silent=True)
    assert await tool.call({"command": "音量调到30"}, ha_context(speaker)) == ACCEPTED_SILENTLY
    (call,) = speaker_calls(ha)
    assert call.service_data["silent"] is True
    assert call.service_data["execute"] is True


@pytest.mark.parametrize(
    ("response", "told"),
    [
        ({"error": "'NoneType' object has no attribute 'update'", "trace": "..."}, "NoneType"),
        ({"code": -704010000, "siid": 5, "aiid": 5}, "-704010000"),
    ],
)
async def test_home_assistant_reports_xiaoai_failing_inside_a_successful_call(
    ha: FakeHomeAssistant,
    client: HomeAssistantClient,
    speaker: FakeSpeaker,
    response: dict[str, Any],
    told: str,
) -> None:
    # hass-xiaomi-miot catches its own exceptions and answers success with {"error": ...}.
    ha.register_service(
        "xiaomi_miot",
        "intelligent_speaker",
        supports_response="optional",
        handler=lambda _: response,
    )
    tool = XiaoAiExecuteTool(homeassistant=client)
    with pytest.raises(ToolError, match=told):
        await tool.call({"command": ALARM}, ha_context(speaker))


async def test_home_assistant_error_result_becomes_a_tool_error(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    ha.fail_service("xiaomi_miot", "intelligent_speaker", message="Cloud request failed")
    tool = XiaoAiExecuteTool(homeassistant=client)
    with pytest.raises(ToolError, match="Cloud request failed"):
        await tool.call({"command": ALARM}, ha_context(speaker))


async def test_home_assistant_without_hass_xiaomi_miot_says_what_is_missing(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    ha.fail_service(
        "xiaomi_miot",
        "intelligent_speaker",
        code="not_found",
        message="Service xiaomi_miot.intelligent_speaker not found.",
    )
    tool = XiaoAiExecuteTool(homeassistant=client)
    with pytest.raises(ToolError, match="hass-xiaomi-miot"):
        await tool.call({"command": ALARM}, ha_context(speaker))


async def test_home_assistant_old_integration_without_responses(
    ha: FakeHomeAssistant,
    client: HomeAssistantClient,
    speaker: FakeSpeaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # hass-xiaomi-miot before 0.7.18 registered the service without a response.
    ha.register_service("xiaomi_miot", "intelligent_speaker", supports_response="none")
    tool = XiaoAiExecuteTool(homeassistant=client)

    assert await tool.call({"command": ALARM}, ha_context(speaker)) == ACCEPTED
    assert await tool.call({"command": "音量调到30"}, ha_context(speaker)) == ACCEPTED

    assert [call.return_response for call in speaker_calls(ha)] == [True, False, False]
    assert [call.text for call in speaker_calls(ha)] == [ALARM, ALARM, "音量调到30"]
    warnings = [r for r in caplog.records if "does not support responses" in r.getMessage()]
    assert len(warnings) == 1


async def test_home_assistant_down_is_a_tool_error(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    source = XiaoAiSkills(homeassistant=client)
    tool = XiaoAiExecuteTool(homeassistant=client)
    async with ha.down():
        await ha.wait_until(lambda: not client.connected)
        assert not source.health().ok
        with pytest.raises(ToolError, match="unreachable"):
            await tool.call({"command": ALARM}, ha_context(speaker))


@pytest.mark.parametrize(
    "arguments",
    [{}, {"command": ""}, {"command": "   "}, {"command": 30}, {"command": "开" * 201}],
    ids=["missing", "empty", "blank", "not-text", "too-long"],
)
async def test_bad_arguments_are_refused_before_any_call(
    ha: FakeHomeAssistant,
    client: HomeAssistantClient,
    speaker: FakeSpeaker,
    arguments: dict[str, Any],
) -> None:
    assert MAX_COMMAND_CHARS == 200
    tool = XiaoAiExecuteTool(homeassistant=client)
    with pytest.raises(ToolError, match="'command'"):
        await tool.call(arguments, ha_context(speaker))
    assert speaker_calls(ha) == []


# --- Xiaomi cloud: the MIoT execute-text-directive action ---------------------------------------


async def test_cloud_runs_the_models_execute_text_directive(
    cloud: FakeXiaomiCloud, miot: MiotClient
) -> None:
    speaker = cloud.speaker  # an LX06: siid 5, aiid 5, a bool silent flag
    tool = XiaoAiExecuteTool(miot=miot)
    assert tool.offered_to(cloud_context(speaker))

    assert await tool.call({"command": "音量调到30"}, cloud_context(speaker)) == ACCEPTED

    assert [(c.did, c.siid, c.aiid, c.args) for c in cloud.action_calls] == [
        (speaker.miot_did, 5, 5, ["音量调到30", False])
    ]


@pytest.mark.parametrize(("silent", "flag"), [(False, 0), (True, 1)])
async def test_cloud_sends_an_integer_silent_flag_where_the_model_wants_one(
    cloud: FakeXiaomiCloud, miot: MiotClient, *, silent: bool, flag: int
) -> None:
    speaker = cloud.add_speaker("小爱音箱Play增强版", "L09A")
    tool = XiaoAiExecuteTool(miot=miot, silent=silent)
    await tool.call({"command": ALARM}, cloud_context(speaker))
    (call,) = cloud.action_calls
    assert (call.siid, call.aiid, call.args) == (3, 5, [ALARM, flag])
    assert type(call.args[1]) is int


async def test_cloud_follows_the_configured_model_table(
    cloud: FakeXiaomiCloud, miot: MiotClient
) -> None:
    speaker = cloud.speaker
    models = {"lx06": SpeakerActions(play_text=(5, 1), wake_up=None, execute_text_directive=(7, 9))}
    tool = XiaoAiExecuteTool(miot=miot, models=models)
    await tool.call({"command": ALARM}, cloud_context(speaker))
    assert cloud.action_calls == [
        ActionCall(cloud.action_calls[0].time, speaker.miot_did, 7, 9, [ALARM, False])
    ]


async def test_cloud_model_without_the_action_is_not_offered(
    cloud: FakeXiaomiCloud, miot: MiotClient
) -> None:
    speaker = cloud.add_speaker("小爱触屏音箱", "X4B")
    tool = XiaoAiExecuteTool(miot=miot)
    assert not tool.offered_to(cloud_context(speaker))
    with pytest.raises(ToolError, match="X4B"):
        await tool.call({"command": ALARM}, cloud_context(speaker))
    assert cloud.action_calls == []


async def test_cloud_action_refused_by_the_device_is_a_tool_error(
    cloud: FakeXiaomiCloud, miot: MiotClient
) -> None:
    stranger = CloudSpeaker(device_id="x", name="邻居", hardware="LX06", miot_did="999")
    tool = XiaoAiExecuteTool(miot=miot)
    with pytest.raises(ToolError, match="does not belong"):
        await tool.call({"command": ALARM}, cloud_context(stranger))


async def test_cloud_down_is_a_tool_error(cloud: FakeXiaomiCloud, miot: MiotClient) -> None:
    tool = XiaoAiExecuteTool(miot=miot)
    await tool.call({"command": ALARM}, cloud_context(cloud.speaker))  # logged in
    cloud.fail(MIOT, 503, times=3)
    with pytest.raises(ToolError, match="Xiaomi cloud"):
        await tool.call({"command": ALARM}, cloud_context(cloud.speaker))
    assert len(cloud.action_calls) == 1


async def test_cloud_expired_token_is_renewed_by_the_client(
    cloud: FakeXiaomiCloud, miot: MiotClient
) -> None:
    tool = XiaoAiExecuteTool(miot=miot)
    await tool.call({"command": ALARM}, cloud_context(cloud.speaker))
    cloud.expire_tokens("xiaomiio")
    assert await tool.call({"command": "音量调到30"}, cloud_context(cloud.speaker)) == ACCEPTED
    assert [call.args[0] for call in cloud.action_calls] == [ALARM, "音量调到30"]
    assert cloud.password_logins == 1


async def test_one_source_serves_both_modes(
    ha: FakeHomeAssistant,
    client: HomeAssistantClient,
    speaker: FakeSpeaker,
    cloud: FakeXiaomiCloud,
    miot: MiotClient,
) -> None:
    (tool,) = XiaoAiSkills(homeassistant=client, miot=miot).tools()
    await tool.call({"command": ALARM}, ha_context(speaker))
    await tool.call({"command": "音量调到30"}, cloud_context(cloud.speaker))
    assert [call.text for call in speaker_calls(ha)] == [ALARM]
    assert [call.args[0] for call in cloud.action_calls] == ["音量调到30"]


# --- echoes: XiaoAi's record of a command it was handed -------------------------------------------


def heard(speaker: FakeSpeaker, text: str) -> Utterance:
    """What the Home Assistant source reports when the speaker's record changes."""
    return Utterance(text=text, device=speaker.media_player, source="homeassistant")


async def test_a_commands_echo_is_recognised_once_on_its_own_speaker(
    ha: FakeHomeAssistant, client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    other = ha.add_speaker("b0b0")
    skills = XiaoAiSkills(homeassistant=client)
    (tool,) = skills.tools()
    await tool.call({"command": "音量调到30"}, ha_context(speaker))

    assert not skills.is_echo(heard(other, "音量调到30"))
    assert not skills.is_echo(heard(speaker, "音量调到40"))
    # Punctuation and spaces aside, the same words on the same speaker.
    assert skills.is_echo(heard(speaker, "音量调到 30。"))
    assert not skills.is_echo(heard(speaker, "音量调到30"))


async def test_the_same_words_after_the_echo_window_are_a_question(
    client: HomeAssistantClient, speaker: FakeSpeaker
) -> None:
    now = [1000.0]
    tool = XiaoAiExecuteTool(homeassistant=client, clock=lambda: now[0])
    await tool.call({"command": ALARM}, ha_context(speaker))
    now[0] += ECHO_WINDOW_S + 0.1
    assert not tool.is_echo(heard(speaker, ALARM))
