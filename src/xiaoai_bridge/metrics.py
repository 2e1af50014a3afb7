"""Prometheus metrics of the bridge, on a registry of its own, fed by watching answers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xiaoai_bridge.models import (
    Answer,
    Outcome,
    SpeakerId,
    SpeechChunk,
    ToolCallRecord,
    Utterance,
)
from xiaoai_bridge.pipeline.dispatcher import DispatchStats
from xiaoai_bridge.pipeline.toolbox import TOOL_NAME_RE, SourceReport
from xiaoai_bridge.reconnect import ConnectionState, ReconnectPolicy

PREFIX = "xiaoai_bridge"
# LLM answers take from a fraction of a second to the two-minute answer deadline.
LLM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0)
# From the speaker hearing a question: adds the source's own delay (e.g. cloud polling).
SPOKEN_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0)
# Tool calls: a local lookup takes milliseconds, a remote server seconds, the deadline 10 s.
TOOL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The tool label of calls to a name no source offers: the model makes those names up, and
# one label per invented name would grow the page without end.
UNKNOWN_TOOL = "_unknown"
# Outcomes where no tool ran, so there is no latency to record.
_NOT_RUN = frozenset({"unknown_tool", "bad_arguments"})


class BridgeMetrics:
    """Observes every answer (a dispatcher observer) and renders the Prometheus text format."""

    def __init__(
        self,
        connections: Mapping[str, ReconnectPolicy],
        in_flight: Callable[[], int],
        *,
        stats: Callable[[], DispatchStats] = DispatchStats,
        tool_sources: Callable[[], Sequence[SourceReport]] = list,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`tool_sources` reports the tool sources at scrape time (the toolbox's `report`)."""
        # A private registry: two services in one process (tests) never clash, and nothing
        # another library puts in the global registry leaks into our page.
        self.registry = CollectorRegistry()
        self._clock = clock
        self.questions = Counter(
            f"{PREFIX}_questions",
            "Utterances handled, by source and outcome (answered, command, ignored, failed) "
            "and reason (e.g. timeout, rate_limited, not_triggered; empty when answered).",
            ["source", "outcome", "reason"],
            registry=self.registry,
        )
        self.first_chunk = Histogram(
            f"{PREFIX}_llm_first_chunk_seconds",
            "LLM time to first token, approximated: seconds from the pipeline accepting a "
            "question to its first spoken sentence (answered questions).",
            buckets=LLM_BUCKETS,
            registry=self.registry,
        )
        self.total = Histogram(
            f"{PREFIX}_llm_total_seconds",
            "Seconds from the pipeline accepting a question to the end of its answer "
            "(answered questions).",
            buckets=LLM_BUCKETS,
            registry=self.registry,
        )
        self.said_to_spoken = Histogram(
            f"{PREFIX}_said_to_first_chunk_seconds",
            "Seconds from the speaker hearing a question to its first spoken sentence, for "
            "sources that know when it was said (answered questions).",
            ["source"],
            buckets=SPOKEN_BUCKETS,
            registry=self.registry,
        )
        self.tool_calls = Counter(
            f"{PREFIX}_tool_calls",
            "Tool calls the model made, by tool, tool source and outcome (ok, error, timeout, "
            f"unknown_tool, bad_arguments, confirm); names no source offers count as "
            f'tool="{UNKNOWN_TOOL}".',
            ["tool", "source", "outcome"],
            registry=self.registry,
        )
        self.tool_seconds = Histogram(
            f"{PREFIX}_tool_call_seconds",
            "Seconds a tool took to answer (or to time out), by tool; calls that never ran "
            "(unknown tool, bad arguments) are not recorded.",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(connections, in_flight, stats, tool_sources))
        # Speaker -> (utterance being answered, wall time of its first spoken sentence).
        # Calls for one speaker never overlap, so one entry per speaker is enough.
        self._first_spoken: dict[SpeakerId, tuple[Utterance, float]] = {}

    @property
    def name(self) -> str:
        """Observer name, for the dispatcher's log lines."""
        return "metrics"

    async def begin(self, utterance: Utterance) -> None:
        """Nothing to count until something is said."""

    async def chunk(self, utterance: Utterance, chunk: SpeechChunk) -> None:
        """Note when the first sentence of an answer leaves the pipeline."""
        if not chunk.text:
            return
        seen = self._first_spoken.get(utterance.speaker)
        if seen is None or seen[0] is not utterance:
            self._first_spoken[utterance.speaker] = (utterance, self._clock())

    async def end(self, answer: Answer) -> None:
        """Count the outcome and record the timings of an answered question."""
        self.observe(answer)

    def observe(self, answer: Answer) -> None:
        """Record one finished answer (also usable as a dispatcher listener)."""
        utterance = answer.utterance
        self.questions.labels(utterance.source, answer.outcome.value, answer.reason).inc()
        for call in answer.tool_calls:
            self._observe_tool_call(call)
        seen = self._first_spoken.pop(utterance.speaker, None)
        if answer.outcome is not Outcome.ANSWERED:
            return  # apologies and command replies would flatter the LLM figures
        if answer.first_chunk_s is not None:
            self.first_chunk.observe(answer.first_chunk_s)
        if answer.total_s is not None:
            self.total.observe(answer.total_s)
        if seen is not None and seen[0] is utterance and utterance.said_at is not None:
            # The speaker's clock is not ours: a negative figure is skew, not a measurement.
            delay = seen[1] - utterance.said_at
            if delay >= 0:
                self.said_to_spoken.labels(utterance.source).observe(delay)

    def _observe_tool_call(self, call: ToolCallRecord) -> None:
        known = call.outcome != "unknown_tool" and TOOL_NAME_RE.fullmatch(call.name)
        tool = call.name if known else UNKNOWN_TOOL
        self.tool_calls.labels(tool, call.source, call.outcome).inc()
        if call.outcome not in _NOT_RUN:
            self.tool_seconds.labels(tool).observe(max(call.seconds, 0.0))

    def render(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Figures read from the running service at scrape time, so they are never stale."""

    def __init__(
        self,
        connections: Mapping[str, ReconnectPolicy],
        in_flight: Callable[[], int],
        stats: Callable[[], DispatchStats],
        tool_sources: Callable[[], Sequence[SourceReport]],
    ) -> None:
        self._connections = connections
        self._in_flight = in_flight
        self._stats = stats
        self._tool_sources = tool_sources

    def collect(self) -> Iterator[Metric]:
        reconnects = CounterMetricFamily(
            f"{PREFIX}_reconnects",
            "Connections restored after being lost, by adapter.",
            labels=["adapter"],
        )
        connected = GaugeMetricFamily(
            f"{PREFIX}_adapter_connected",
            "1 while the adapter's connection is up, else 0.",
            labels=["adapter"],
        )
        for adapter, policy in sorted(self._connections.items()):
            reconnects.add_metric([adapter], policy.reconnects)
            connected.add_metric([adapter], 1 if policy.state is ConnectionState.CONNECTED else 0)
        yield reconnects
        yield connected
        source_up = GaugeMetricFamily(
            f"{PREFIX}_tool_source_up",
            "1 while the tool source is up (e.g. its MCP server connected), else 0.",
            labels=["source"],
        )
        source_tools = GaugeMetricFamily(
            f"{PREFIX}_tool_source_tools",
            "Tools the source offers the model right now.",
            labels=["source"],
        )
        for source in self._tool_sources():
            source_up.add_metric([source.name], 1 if source.health.ok else 0)
            source_tools.add_metric([source.name], len(source.tools))
        yield source_up
        yield source_tools
        yield GaugeMetricFamily(
            f"{PREFIX}_answers_in_flight",
            "Questions received and not yet fully answered.",
            value=self._in_flight(),
        )
        stats = self._stats()
        yield CounterMetricFamily(
            f"{PREFIX}_questions_refused_busy",
            "Questions answered with a 'busy' apology because [inbox] max_pending were waiting.",
            value=stats.refused_busy,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_questions_dropped_stale",
            "Questions left unanswered by an earlier run and too old to answer after a restart.",
            value=stats.dropped_stale,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_questions_dropped_overflow",
            "Questions dropped unanswered because even the queue of 'busy' replies was full.",
            value=stats.dropped_overflow,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_questions_resumed",
            "Questions left unanswered by an earlier run and answered after a restart.",
            value=stats.resumed,
        )
