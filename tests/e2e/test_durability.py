"""Accepted means answered: kills, shutdowns with a backlog, bursts, retained and hostile input."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.conftest import API_KEY, Bridge, Probe, make_settings
from tests.e2e.test_cli import spawn_run
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI
from xiaoai_bridge import app
from xiaoai_bridge.config import InboxSettings
from xiaoai_bridge.pipeline.pipeline import APOLOGIES

WAIT_S = 20.0


async def collect_ids(probe: Probe, want: set[Any], wait_s: float = WAIT_S) -> set[Any]:
    """Reply ids seen until every id in `want` has been answered (or the wait ends)."""
    seen: set[Any] = set()
    async with asyncio.timeout(wait_s):
        while not want <= seen:
            seen.add(json.loads(await probe.replies.get())["id"])
    return seen


# -- hostile input ---------------------------------------------------------------------------


async def test_deeply_nested_json_gets_an_apology_and_the_service_keeps_answering(
    bridge: Bridge, probe: Probe
) -> None:
    nested = '{"id": "deep", "device": "d1", "text": ' + "[" * 1000 + "]" * 1000 + "}"
    assert len(nested.encode()) < 4096  # under the payload limit: it reaches the JSON parser
    await probe.ask(nested)
    assert (await probe.reply_json())["text"] == APOLOGIES["bad_input"]
    await probe.ask({"id": "after", "device": "d1", "text": "还在吗"})
    reply = await probe.reply_json()
    assert reply["id"] == "after"
    assert "还在吗" in reply["text"]
    assert bridge.running


async def test_a_device_id_ending_in_a_newline_is_rejected(bridge: Bridge, probe: Probe) -> None:
    await probe.ask({"id": 7, "device": "kitchen\n", "text": "你好"})
    error = await asyncio.wait_for(probe.errors.get(), WAIT_S)
    assert error["error"] == "bad_input"
    reply = await probe.reply_json()
    assert reply["device"] == "default"
    assert reply["text"] == APOLOGIES["bad_input"]


async def test_a_retained_question_is_answered_once_not_at_every_restart(
    bridge: Bridge, probe: Probe, llm: FakeOpenAI, mosquitto: Mosquitto
) -> None:
    await probe.client.publish(
        probe.question_topic,
        json.dumps({"id": "kept", "text": "保留的问题"}),
        qos=1,
        retain=True,
    )
    assert (await probe.reply_json())["id"] == "kept"  # published live: answered once
    for _ in range(2):
        await bridge.stop()
        await bridge.start(probe)
        await probe.ask({"id": "fresh", "text": "新问题"})
        assert (await probe.reply_json())["id"] == "fresh"  # the retained one did not come first
    assert [r.body["messages"][-1]["content"] for r in llm.requests].count("保留的问题") == 1


# -- shutdowns, kills and restarts -------------------------------------------------------------


async def test_sigterm_with_a_backlog_leaves_it_to_the_next_run(
    tmp_path: Path,
    mosquitto: Mosquitto,
    llm: FakeOpenAI,
    probe: Probe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app, "SHUTDOWN_GRACE_S", 0.3)
    bridge = Bridge(make_settings(tmp_path, mosquitto, llm))
    await bridge.start(probe)
    llm.first_token_delay = 60  # nothing finishes before the stop
    for n in range(5):
        await probe.ask({"id": n, "device": f"d{n}", "text": f"问题{n}"})
    async with asyncio.timeout(WAIT_S):
        await llm.wait_for_requests(5)
    await bridge.stop()
    assert probe.replies.empty()
    llm.first_token_delay = 0
    await bridge.start(probe)
    try:
        assert await collect_ids(probe, set(range(5))) == set(range(5))
    finally:
        await bridge.stop()


async def test_questions_too_old_after_a_restart_are_dropped_not_answered_late(
    tmp_path: Path,
    mosquitto: Mosquitto,
    llm: FakeOpenAI,
    probe: Probe,
    *,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(app, "SHUTDOWN_GRACE_S", 0.3)
    settings = make_settings(tmp_path, mosquitto, llm, inbox=InboxSettings(freshness_s=0.5))
    bridge = Bridge(settings)
    await bridge.start(probe)
    llm.first_token_delay = 60
    await probe.ask({"id": "old", "device": "d1", "text": "很久以前的问题"})
    async with asyncio.timeout(WAIT_S):
        await llm.wait_for_requests(1)
    await bridge.stop()
    await asyncio.sleep(0.6)  # past the freshness window
    llm.first_token_delay = 0
    with caplog.at_level(logging.INFO, logger="xiaoai_bridge.pipeline.dispatcher"):
        await bridge.start(probe)
        try:
            await probe.ask({"id": "new", "device": "d1", "text": "新问题"})
            assert (await probe.reply_json())["id"] == "new"
        finally:
            await bridge.stop()
    assert llm.request_count == 2  # the old one was not asked again
    assert any("not answering" in r.getMessage() for r in caplog.records)
    assert any("dropped 1 too old" in r.getMessage() for r in caplog.records)


async def test_past_max_pending_questions_get_a_busy_reply_and_none_is_silent(
    start_bridge: Callable[..., Any], probe: Probe, llm: FakeOpenAI
) -> None:
    bridge = await start_bridge(inbox=InboxSettings(max_pending=5))
    llm.first_token_delay = 0.5
    for n in range(40):
        await probe.ask({"id": n, "device": f"d{n}", "text": f"问题{n}"})
    replies: dict[int, str] = {}
    async with asyncio.timeout(WAIT_S):
        while len(replies) < 40:
            reply = json.loads(await probe.replies.get())
            replies[reply["id"]] = reply["text"]
    busy = [n for n, text in replies.items() if text == APOLOGIES["busy"]]
    answered = [n for n, text in replies.items() if f"问题{n}" in text]
    assert len(busy) + len(answered) == 40
    assert 5 <= len(answered) < 40  # the first five at least were taken, the rest not lost
    assert bridge.settings.inbox.max_pending == 5
    assert llm.request_count == len(answered)


# -- kill -9: the real process ---------------------------------------------------------------


def _config(tmp_path: Path, broker: Mosquitto, llm: FakeOpenAI) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[mqtt]\nurl = "{broker.url}"\nclient_id = "durable"\n'
        f'[llm]\nbase_url = "{llm.base_url}"\napi_key = "{API_KEY}"\nmodel = "fake-model"\n'
        "max_retries = 0\ntimeout_s = 120\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


Start = Callable[[], Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def start_process(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> AsyncIterator[Start]:
    """Starts `xiaoai-bridge run` on one data dir and client id, as often as a test kills it."""
    config = _config(tmp_path, mosquitto, llm)
    procs: list[asyncio.subprocess.Process] = []

    async def start() -> asyncio.subprocess.Process:
        procs.append(await spawn_run(tmp_path, config))
        await probe.wait_status("online", WAIT_S)
        return procs[-1]

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_kill_9_with_questions_in_flight_loses_none(
    start_process: Start, llm: FakeOpenAI, probe: Probe
) -> None:
    proc = await start_process()
    llm.first_token_delay = 60  # all 30 are accepted and being answered when the kill comes
    for n in range(30):
        await probe.ask({"id": n, "device": f"d{n}", "text": f"问题{n}"})
    async with asyncio.timeout(WAIT_S):
        await llm.wait_for_requests(30)
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    assert probe.replies.empty()
    llm.first_token_delay = 0
    await start_process()
    assert await collect_ids(probe, set(range(30))) == set(range(30))


async def test_kill_9_during_a_burst_loses_none(
    start_process: Start, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    proc = await start_process()
    llm.token_delay = 0.002
    total = 600
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as publisher:
        for n in range(total):
            await publisher.publish(
                probe.question_topic,
                json.dumps({"id": n, "device": f"d{n % 60}", "text": f"问题{n}"}),
                qos=1,
            )
    seen: set[int] = set()
    async with asyncio.timeout(WAIT_S):
        while len(seen) < 50:  # answering is well under way, most of the burst is not
            seen.add(json.loads(await probe.replies.get())["id"])
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    await start_process()
    seen |= await collect_ids(probe, set(range(total)) - seen, wait_s=60)
    assert seen == set(range(total))
