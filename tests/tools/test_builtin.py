"""Built-in tools with an injected clock and real callables that record what they were asked."""

from __future__ import annotations

import importlib.resources
import re
import zoneinfo
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from xiaoai_bridge.models import SpeakerId, Utterance
from xiaoai_bridge.pipeline.tool_ports import Tool, ToolContext, ToolError, ToolSource
from xiaoai_bridge.tools.builtin import (
    CONTINUOUS_CONVERSATION,
    CURRENT_TIME,
    FORGET_CONVERSATION,
    BuiltinTools,
    describe_now,
    local_time_zone,
)

SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
# Sunday 2026-11-29 08:20:05 UTC, 16:20:05 in Shanghai.
NOW = datetime(2026, 11, 29, 8, 20, 5, tzinfo=UTC).timestamp()
KITCHEN = ToolContext(Utterance(text="机器人几点了", device="kitchen", source="mqtt"))


class Recorder:
    """The pipeline's side, as plain callables that remember their calls."""

    def __init__(self) -> None:
        self.forgotten: list[SpeakerId] = []
        self.continuous: list[tuple[SpeakerId, bool]] = []

    async def forget(self, speaker: SpeakerId) -> None:
        self.forgotten.append(speaker)

    def set_continuous(self, speaker: SpeakerId, on: bool) -> None:
        self.continuous.append((speaker, on))


def tools_by_name(source: ToolSource) -> dict[str, Tool]:
    return {tool.spec.name: tool for tool in source.tools()}


def with_clock(now: list[float], recorder: Recorder | None = None) -> dict[str, Tool]:
    recorder = recorder or Recorder()
    return tools_by_name(
        BuiltinTools(
            tz=SHANGHAI,
            clock=lambda: now[0],
            forget=recorder.forget,
            set_continuous=recorder.set_continuous,
        )
    )


def test_the_source_offers_valid_uniquely_named_tools() -> None:
    recorder = Recorder()
    source: ToolSource = BuiltinTools(
        tz=SHANGHAI, forget=recorder.forget, set_continuous=recorder.set_continuous
    )
    names = [tool.spec.name for tool in source.tools()]
    assert names == [CURRENT_TIME, FORGET_CONVERSATION, CONTINUOUS_CONVERSATION]
    assert all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name) for name in names)
    for tool in source.tools():
        jsonschema.Draft202012Validator.check_schema(dict(tool.spec.parameters))
        assert tool.offered_to(KITCHEN)
    assert source.name == "builtin"
    assert source.health().ok


def test_without_callables_only_the_clock_is_offered() -> None:
    assert list(tools_by_name(BuiltinTools(tz=SHANGHAI))) == [CURRENT_TIME]


async def test_current_time_in_the_configured_zone() -> None:
    clock = with_clock([NOW])[CURRENT_TIME]
    told = await clock.call({}, KITCHEN)
    assert told == (
        "2026年11月29日 星期日 16:20:05 (Sunday; 2026-11-29T16:20:05+08:00; "
        "time zone Asia/Shanghai, UTC+08:00)"
    )


async def test_current_time_reads_the_clock_at_each_call() -> None:
    now = [NOW]
    clock = with_clock(now)[CURRENT_TIME]
    assert "16:20:05" in str(await clock.call({}, KITCHEN))
    now[0] += 12 * 3600  # past midnight in Shanghai: the date and weekday move on
    later = str(await clock.call({}, KITCHEN))
    assert later.startswith("2026年11月30日 星期一 04:20:05 (Monday;")


async def test_current_time_in_another_zone_on_request() -> None:
    clock = with_clock([NOW])[CURRENT_TIME]
    told = str(await clock.call({"time_zone": " America/New_York "}, KITCHEN))
    assert told.startswith("2026年11月29日 星期日 03:20:05 (Sunday;")
    assert told.endswith("time zone America/New_York, UTC-05:00)")
    # An empty name means the user's own zone.
    assert "Asia/Shanghai" in str(await clock.call({"time_zone": ""}, KITCHEN))


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime", 8])
async def test_current_time_refuses_an_unknown_zone(zone: object) -> None:
    clock = with_clock([NOW])[CURRENT_TIME]
    with pytest.raises(ToolError, match="IANA"):
        await clock.call({"time_zone": zone}, KITCHEN)


def test_describe_now_with_a_fixed_offset_zone() -> None:
    assert describe_now(datetime(2026, 1, 1, 0, 0, tzinfo=UTC)) == (
        "2026年1月1日 星期四 00:00:00 (Thursday; 2026-01-01T00:00:00+00:00; time zone UTC, "
        "UTC+00:00)"
    )


async def test_forget_forgets_only_the_asking_speaker() -> None:
    recorder = Recorder()
    forget = with_clock([NOW], recorder)[FORGET_CONVERSATION]
    same_name_elsewhere = ToolContext(Utterance(text="忘了吧", device="kitchen", source="xiaomi"))

    told = await forget.call({}, same_name_elsewhere)

    assert recorder.forgotten == [SpeakerId("xiaomi", "kitchen")]
    assert "forgotten" in str(told)


async def test_continuous_conversation_switches_the_asking_speaker() -> None:
    recorder = Recorder()
    continuous = with_clock([NOW], recorder)[CONTINUOUS_CONVERSATION]

    started = await continuous.call({"on": True}, KITCHEN)
    stopped = await continuous.call({"on": False}, KITCHEN)

    kitchen = SpeakerId("mqtt", "kitchen")
    assert recorder.continuous == [(kitchen, True), (kitchen, False)]
    assert "is on" in str(started)
    assert "is off" in str(stopped)


@pytest.mark.parametrize("arguments", [{}, {"on": "true"}, {"on": 1}, {"on": None}])
async def test_continuous_conversation_needs_a_boolean(arguments: dict[str, object]) -> None:
    recorder = Recorder()
    continuous = with_clock([NOW], recorder)[CONTINUOUS_CONVERSATION]
    with pytest.raises(ToolError, match="'on'"):
        await continuous.call(arguments, KITCHEN)
    assert recorder.continuous == []


def zone_file(folder: Path, key: str) -> Path:
    """A zoneinfo tree holding one zone, from the tzdata package."""
    data = importlib.resources.files("tzdata.zoneinfo").joinpath(key).read_bytes()
    path = folder / "zoneinfo" / key
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def test_local_time_zone_follows_tz(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TZ", ":Asia/Shanghai")
    assert local_time_zone(tmp_path / "missing") == SHANGHAI


def test_local_time_zone_reads_localtime_with_its_rules(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TZ", raising=False)
    localtime = tmp_path / "localtime"
    localtime.symlink_to(zone_file(tmp_path, "America/New_York"))
    tz = local_time_zone(localtime)
    assert getattr(tz, "key", None) == "America/New_York"
    # Its daylight-saving rules, not just today's offset.
    assert (
        datetime(2026, 7, 1, tzinfo=tz).utcoffset() != datetime(2026, 1, 1, tzinfo=tz).utcoffset()
    )


def test_local_time_zone_without_any_zone_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TZ", raising=False)
    tz = local_time_zone(tmp_path / "missing")
    now = datetime.now(tz)
    assert now.utcoffset() == datetime.now().astimezone().utcoffset()
