"""The status page's "ask" box, as a source: what it hands the dispatcher."""

from __future__ import annotations

from xiaoai_bridge import adapters
from xiaoai_bridge.models import Utterance
from xiaoai_bridge.sinks.web import WebSink
from xiaoai_bridge.sources.web import WebSource


def test_a_question_asked_is_submitted_once_for_the_web_sink() -> None:
    submitted: list[Utterance] = []
    source = WebSource(submitted.append, clock=lambda: 1234.5)
    first = source.ask("今天天气", "kitchen")
    second = source.ask("明天呢", "kitchen")
    assert submitted == [first, second]
    assert (first.text, first.device, first.said_at) == ("今天天气", "kitchen", 1234.5)
    # Its sink is found by the source's name, and every question has an id of its own.
    assert first.source == source.name == WebSink().name == adapters.WEB
    assert first.route is None
    assert first.id != second.id
    assert str(first.id).startswith("http-")
