"""Xiaomi sink with an external TTS: the bridge serves the audio, the speaker plays its URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from tests.conftest import cloud_auth
from tests.fakes.tts_server import FakeTts
from tests.fakes.xiaomi_cloud import FakeSpeaker, FakeXiaomiCloud, UbusCall
from xiaoai_bridge.app import Service, open_pipeline
from xiaoai_bridge.audio import AudioStore
from xiaoai_bridge.clients.tts import HttpTts
from xiaoai_bridge.clients.xiaomi import new_session
from xiaoai_bridge.clients.xiaomi.mina import MinaClient
from xiaoai_bridge.config import HttpSettings, Settings
from xiaoai_bridge.http import open_http
from xiaoai_bridge.models import SpeechChunk, Utterance, XiaomiRoute
from xiaoai_bridge.pipeline.dispatcher import Dispatcher
from xiaoai_bridge.sinks.xiaomi import XiaomiSink

CPS = 100.0  # the text estimate (0.1 s for ten characters) is far below the WAV's 0.3 s
WAV_S = 0.3
TEN = "一二三四五六七八九十"
TOKEN = "page-token-1234"


@dataclass
class UrlRig:
    cloud: FakeXiaomiCloud
    tts: FakeTts
    mina: MinaClient
    store: AudioStore
    engine: HttpTts
    client: aiohttp.ClientSession

    def sink(self, **options: Any) -> XiaomiSink:
        values: dict[str, Any] = {
            "tts": "url",
            "tts_engine": self.engine,
            "audio": self.store,
            "chars_per_second": CPS,
            "speech_overhead_s": 0.0,
            "status_poll_interval_s": 0.02,
            "status_grace_s": 0.2,
            "silence": "none",
            "merge_max_chars": 10,
        }
        return XiaomiSink(self.mina, None, **(values | options))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[UrlRig]:
    settings = Settings(data_dir=tmp_path / "data", http=HttpSettings(port=0))
    settings.data_dir.mkdir()
    async with contextlib.AsyncExitStack() as stack:
        cloud = await stack.enter_async_context(FakeXiaomiCloud())
        tts = await stack.enter_async_context(FakeTts(seconds=WAV_S))
        session = await stack.enter_async_context(new_session())
        client = await stack.enter_async_context(aiohttp.ClientSession())
        pipeline = await stack.enter_async_context(open_pipeline(settings))
        dispatcher = Dispatcher(pipeline, {})
        stack.push_async_callback(dispatcher.aclose)
        service = Service(settings, pipeline, dispatcher)
        # The real address is known once the server listens; it is the "LAN" address here.
        service.audio = store = AudioStore("http://pending")
        http_settings = HttpSettings(port=0, token=SecretStr(TOKEN))
        server = await stack.enter_async_context(open_http(service, http_settings))
        store.public_url = server.url.rstrip("/")
        auth = cloud_auth(cloud, session, tmp_path / "token.json")
        mina = MinaClient(session, auth, base_url=cloud.endpoints["mina"], timeout_s=0.5)
        engine = HttpTts(session, tts.url + "/tts?text={text}&voice={voice}", voice="xiaoxiao")
        yield UrlRig(cloud, tts, mina, store, engine, client)


def question(speaker: FakeSpeaker) -> Utterance:
    return Utterance(
        text="请问问题",
        device=speaker.device_id,
        id="q1",
        source="xiaomi",
        route=XiaomiRoute(
            device_id=speaker.device_id,
            hardware=speaker.hardware,
            miot_did=speaker.miot_did,
            name=speaker.name,
        ),
    )


def sentence(utterance: Utterance, seq: int, text: str) -> SpeechChunk:
    return SpeechChunk(utterance.id, utterance.device, seq, text, False)


async def wait_for(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def plays(cloud: FakeXiaomiCloud) -> list[UbusCall]:
    return [c for c in cloud.ubus_calls if c.method in ("player_play_url", "player_play_music")]


async def test_speaker_plays_the_wav_served_by_the_bridge(rig: UrlRig) -> None:
    cloud = rig.cloud
    q = question(cloud.speaker)  # LX06: player_play_url
    async with rig.sink() as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN))
        await sink.chunk(q, sentence(q, 1, "后半句。"))
        await wait_for(lambda: len(plays(cloud)) == 2 and len(cloud.fetches) == 2)

    first, second = plays(cloud)
    url = first.message["url"]
    assert first.method == "player_play_url"
    assert first.message == {"url": url, "type": 1, "media": "app_ios"}
    assert url.startswith(rig.store.public_url + "/audio/")
    assert [r.text for r in rig.tts.requests] == [TEN, "后半句。"]
    assert {r.voice for r in rig.tts.requests} == {"xiaoxiao"}
    assert cloud.tts_texts() == []  # XiaoAi's own voice was not used
    # The speaker got exactly the WAV, without the page token.
    assert cloud.fetches[0].status == 200
    assert cloud.fetches[0].data == rig.tts.wav
    async with rig.client.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "audio/wav"
        assert resp.content_length == len(rig.tts.wav)
        assert await resp.read() == rig.tts.wav
    # The rest of the server still wants the token.
    async with rig.client.get(rig.store.public_url + "/api/state") as resp:
        assert resp.status == 401
    # The second sentence waited for the first one's audio to play out.
    assert second.time - first.time >= WAV_S


async def test_without_play_status_the_wav_duration_paces(rig: UrlRig) -> None:
    cloud = rig.cloud
    screen = cloud.add_speaker("触屏音箱", "X08E")  # no play status; URLs as a music list
    q = question(screen)
    async with rig.sink() as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, TEN))
        await sink.chunk(q, sentence(q, 1, "后半句。"))
        await wait_for(lambda: len(plays(cloud)) == 2)

    first, second = plays(cloud)
    assert first.method == "player_play_music"
    music = json.loads(first.message["music"])
    assert (
        first.message["startaudioid"] == music["payload"]["audio_items"][0]["item_id"]["audio_id"]
    )
    assert music["play_behavior"] == "REPLACE_ALL"
    assert cloud.played_urls()[0].startswith(rig.store.public_url + "/audio/")
    assert [c.method for c in cloud.ubus_calls] == ["player_play_music", "player_play_music"]
    # Paced by the WAV's 0.3 s, not the 0.1 s text estimate.
    assert second.time - first.time >= WAV_S


async def test_tts_failure_falls_back_to_the_speakers_own_voice(
    rig: UrlRig, caplog: pytest.LogCaptureFixture
) -> None:
    cloud = rig.cloud
    rig.tts.failures = [500]
    q = question(cloud.speaker)
    async with rig.sink() as sink:
        await sink.begin(q)
        await sink.chunk(q, sentence(q, 0, "第一句。"))
        await sink.chunk(q, sentence(q, 1, TEN))
        # The fake records a play on receipt; the sink counts it once the answer is back.
        await wait_for(
            lambda: bool(cloud.tts_texts()) and len(plays(cloud)) == 1 and sink.spoken == 2
        )

    assert cloud.tts_texts() == ["第一句。"]
    assert plays(cloud)[0].time > next(c.time for c in cloud.ubus_calls)
    assert sink.spoken == 2
    assert sink.failed == 0
    assert any(
        r.levelname == "WARNING" and "itself" in r.getMessage() and "HTTP 500" in r.getMessage()
        for r in caplog.records
    )


async def test_unknown_or_malformed_clip_names_are_404(rig: UrlRig) -> None:
    base = rig.store.public_url + "/audio/"
    for name in ("AAAAAAAAAAAAAAAAAAAAAAAA.wav", "..%2Fconfig", "x.wav"):
        async with rig.client.get(base + name) as resp:
            assert resp.status == 404


def test_url_route_needs_an_engine_and_a_store(rig: UrlRig) -> None:
    with pytest.raises(ValueError, match="tts_engine"):
        XiaomiSink(rig.mina, tts="url")
