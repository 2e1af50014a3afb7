"""Prometheus metrics: counted from answers' life cycles, read live from the adapters."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.pipeline.test_tool_loop import Shelf
from xiaoai_bridge.metrics import UNKNOWN_TOOL, BridgeMetrics
from xiaoai_bridge.models import Answer, Outcome, SpeechChunk, ToolCallRecord, Utterance
from xiaoai_bridge.pipeline.tool_ports import ToolOutput
from xiaoai_bridge.pipeline.toolbox import Toolbox
from xiaoai_bridge.reconnect import ReconnectPolicy


class Clock:
    """Wall time that moves only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(metrics: BridgeMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the rendered page, keyed by name and labels."""
    text = metrics.render().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: BridgeMetrics, name: str, **labels: str) -> float | None:
    """One sample's value, None when absent."""
    return samples(metrics).get((name, frozenset(labels.items())))


async def answer_through(
    metrics: BridgeMetrics,
    utterance: Utterance,
    answer: Answer,
    *,
    clock: Clock | None = None,
    chunk_delay: float = 0.0,
) -> None:
    """Drive the observer the way the dispatcher does for one answer."""
    await metrics.begin(utterance)
    if clock is not None:
        clock.now += chunk_delay
    if answer.text:
        chunk = SpeechChunk(utterance.id, utterance.device, 0, answer.text, final=True)
        await metrics.chunk(utterance, chunk)
    await metrics.end(answer)


def make_metrics(
    connections: dict[str, ReconnectPolicy] | None = None,
    in_flight: int = 0,
    clock: Clock | None = None,
) -> BridgeMetrics:
    return BridgeMetrics(connections or {}, lambda: in_flight, clock=clock or Clock())


async def test_questions_are_counted_by_source_outcome_and_reason() -> None:
    metrics = make_metrics()
    hi = Utterance("你好", source="mqtt")
    await answer_through(metrics, hi, Answer(hi, Outcome.ANSWERED, "你好！", "", 0.2, 0.5))
    await answer_through(metrics, hi, Answer(hi, Outcome.ANSWERED, "又见面了。", "", 0.3, 0.6))
    failed = Utterance("问题", source="homeassistant")
    await answer_through(metrics, failed, Answer(failed, Outcome.FAILED, "抱歉。", "timeout"))
    await answer_through(metrics, hi, Answer(hi, Outcome.IGNORED, reason="not_triggered"))
    name = "xiaoai_bridge_questions_total"
    assert value(metrics, name, source="mqtt", outcome="answered", reason="") == 2
    assert value(metrics, name, source="homeassistant", outcome="failed", reason="timeout") == 1
    assert value(metrics, name, source="mqtt", outcome="ignored", reason="not_triggered") == 1
    assert value(metrics, name, source="mqtt", outcome="failed", reason="timeout") is None


async def test_llm_histograms_record_answered_questions_only() -> None:
    metrics = make_metrics()
    hi = Utterance("你好")
    await answer_through(metrics, hi, Answer(hi, Outcome.ANSWERED, "好。", "", 0.4, 2.5))
    await answer_through(metrics, hi, Answer(hi, Outcome.FAILED, "抱歉。", "auth", 0.01, 0.02))
    first = "xiaoai_bridge_llm_first_chunk_seconds"
    total = "xiaoai_bridge_llm_total_seconds"
    assert value(metrics, f"{first}_count") == 1
    assert value(metrics, f"{first}_sum") == 0.4
    assert value(metrics, f"{first}_bucket", le="0.25") == 0
    assert value(metrics, f"{first}_bucket", le="0.5") == 1
    assert value(metrics, f"{total}_count") == 1
    assert value(metrics, f"{total}_sum") == 2.5
    assert value(metrics, f"{total}_bucket", le="2.0") == 0
    assert value(metrics, f"{total}_bucket", le="3.0") == 1


async def test_time_from_being_said_to_first_sentence_uses_said_at() -> None:
    clock = Clock()
    metrics = make_metrics(clock=clock)
    heard = Utterance("几点了", device="kitchen", source="xiaomi", said_at=clock.now - 1.0)
    answer = Answer(heard, Outcome.ANSWERED, "三点。", "", 0.5, 0.8)
    await answer_through(metrics, heard, answer, clock=clock, chunk_delay=0.5)
    name = "xiaoai_bridge_said_to_first_chunk_seconds"
    assert value(metrics, f"{name}_count", source="xiaomi") == 1
    assert value(metrics, f"{name}_sum", source="xiaomi") == 1.5
    # Sources that do not know when it was said add nothing.
    unknown = Utterance("你好", source="mqtt")
    await answer_through(metrics, unknown, Answer(unknown, Outcome.ANSWERED, "好。", "", 0.1, 0.2))
    assert value(metrics, f"{name}_count", source="mqtt") is None


async def test_said_at_from_a_skewed_clock_in_the_future_is_not_recorded() -> None:
    clock = Clock()
    metrics = make_metrics(clock=clock)
    heard = Utterance("你好", source="xiaomi", said_at=clock.now + 30)
    await answer_through(metrics, heard, Answer(heard, Outcome.ANSWERED, "好。", "", 0.1, 0.2))
    assert (
        value(metrics, "xiaoai_bridge_said_to_first_chunk_seconds_count", source="xiaomi") is None
    )


async def test_first_spoken_chunk_is_the_first_with_text() -> None:
    clock = Clock()
    metrics = make_metrics(clock=clock)
    heard = Utterance("讲个故事", source="xiaomi", said_at=clock.now)
    await metrics.begin(heard)
    clock.now += 1
    await metrics.chunk(heard, SpeechChunk("", "default", 0, "", final=False))
    clock.now += 1
    await metrics.chunk(heard, SpeechChunk("", "default", 1, "从前。", final=False))
    clock.now += 5
    await metrics.chunk(heard, SpeechChunk("", "default", 2, "完了。", final=True))
    await metrics.end(Answer(heard, Outcome.ANSWERED, "从前。完了。", "", 2.0, 7.0))
    assert value(metrics, "xiaoai_bridge_said_to_first_chunk_seconds_sum", source="xiaomi") == 2


async def test_reconnects_and_connection_state_are_read_at_scrape_time() -> None:
    policy = ReconnectPolicy("mqtt test", logging.getLogger("test"), clock=Clock())
    metrics = make_metrics({"mqtt": policy})
    assert value(metrics, "xiaoai_bridge_reconnects_total", adapter="mqtt") == 0
    assert value(metrics, "xiaoai_bridge_adapter_connected", adapter="mqtt") == 0
    policy.connected()
    assert value(metrics, "xiaoai_bridge_adapter_connected", adapter="mqtt") == 1
    for _ in range(2):
        policy.failed(ConnectionError("broker gone"))
        assert value(metrics, "xiaoai_bridge_adapter_connected", adapter="mqtt") == 0
        policy.connected()
    assert value(metrics, "xiaoai_bridge_reconnects_total", adapter="mqtt") == 2


async def test_in_flight_answers_are_read_at_scrape_time() -> None:
    busy = [3]
    metrics = BridgeMetrics({}, lambda: busy[0])
    assert value(metrics, "xiaoai_bridge_answers_in_flight") == 3
    busy[0] = 0
    assert value(metrics, "xiaoai_bridge_answers_in_flight") == 0


async def test_registries_are_private() -> None:
    first = make_metrics()
    second = make_metrics()  # a second instance must not clash with the first
    hi = Utterance("你好")
    await answer_through(first, hi, Answer(hi, Outcome.ANSWERED, "好。", "", 0.1, 0.2))
    assert value(
        first, "xiaoai_bridge_questions_total", source="mqtt", outcome="answered", reason=""
    )
    assert value(second, "xiaoai_bridge_llm_total_seconds_count") == 0
    assert REGISTRY.get_sample_value("xiaoai_bridge_llm_total_seconds_count") is None


def tool_call(
    name: str, outcome: str = "ok", seconds: float = 0.03, source: str = "shelf"
) -> ToolCallRecord:
    return ToolCallRecord(name, source, "{}", outcome, "done", seconds)


async def test_tool_calls_are_counted_by_tool_source_and_outcome_with_latency() -> None:
    metrics = make_metrics()
    asked = Utterance("把灯关了", source="mqtt")
    calls = (tool_call("turn_off", seconds=0.03), tool_call("turn_off", "timeout", 10.0))
    await answer_through(metrics, asked, Answer(asked, Outcome.ANSWERED, "好。", tool_calls=calls))
    # A failed answer's calls happened all the same.
    failed = (tool_call("get_state", "error", 0.2, source="homeassistant"),)
    await answer_through(
        metrics, asked, Answer(asked, Outcome.FAILED, "抱歉。", "timeout", tool_calls=failed)
    )
    name = "xiaoai_bridge_tool_calls_total"
    assert value(metrics, name, tool="turn_off", source="shelf", outcome="ok") == 1
    assert value(metrics, name, tool="turn_off", source="shelf", outcome="timeout") == 1
    assert value(metrics, name, tool="get_state", source="homeassistant", outcome="error") == 1
    seconds = "xiaoai_bridge_tool_call_seconds"
    assert value(metrics, f"{seconds}_count", tool="turn_off") == 2
    assert value(metrics, f"{seconds}_bucket", tool="turn_off", le="0.025") == 0
    assert value(metrics, f"{seconds}_bucket", tool="turn_off", le="0.05") == 1
    assert value(metrics, f"{seconds}_bucket", tool="turn_off", le="5.0") == 1
    assert value(metrics, f"{seconds}_bucket", tool="turn_off", le="10.0") == 2
    assert value(metrics, f"{seconds}_bucket", tool="get_state", le="0.25") == 1


async def test_tool_names_the_model_made_up_share_one_label() -> None:
    metrics = make_metrics()
    asked = Utterance("随便", source="mqtt")
    invented = tuple(
        tool_call(name, "unknown_tool", 0.0, source="")
        for name in ("hack_the_planet", "rm -rf /", "x" * 500, "<script>")
    )
    bad = (tool_call("turn_off", "bad_arguments", 0.0),)
    await answer_through(
        metrics, asked, Answer(asked, Outcome.ANSWERED, "好。", tool_calls=invented + bad)
    )
    calls = {
        labels: count
        for (name, labels), count in samples(metrics).items()
        if name == "xiaoai_bridge_tool_calls_total"
    }
    assert calls == {
        frozenset({("tool", UNKNOWN_TOOL), ("source", ""), ("outcome", "unknown_tool")}): 4,
        frozenset({("tool", "turn_off"), ("source", "shelf"), ("outcome", "bad_arguments")}): 1,
    }
    # No tool ran for either: no latency to record.
    assert not any(
        name.startswith("xiaoai_bridge_tool_call_seconds") for name, _ in samples(metrics)
    )


async def test_tool_sources_are_read_at_scrape_time() -> None:
    toolbox = Toolbox()
    shelf = Shelf("mcp:search", down="connection refused")
    toolbox.add(shelf)
    metrics = BridgeMetrics({}, lambda: 0, tool_sources=toolbox.report)

    async def search(arguments: Mapping[str, object]) -> ToolOutput:
        return "nothing found"

    shelf.add("web_search", search)
    shelf.add("bad name!", search)  # the toolbox never offers it, so it is not counted
    assert value(metrics, "xiaoai_bridge_tool_source_up", source="mcp:search") == 0
    assert value(metrics, "xiaoai_bridge_tool_source_tools", source="mcp:search") == 0
    shelf.down = ""
    assert value(metrics, "xiaoai_bridge_tool_source_up", source="mcp:search") == 1
    assert value(metrics, "xiaoai_bridge_tool_source_tools", source="mcp:search") == 1
