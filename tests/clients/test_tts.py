"""The HTTP TTS client against a fake TTS service on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fakes.tts_server import FakeTts
from xiaoai_bridge.clients.tts import EdgeTts, HttpTts, TtsError


@pytest.fixture
async def tts() -> AsyncIterator[FakeTts]:
    async with FakeTts(seconds=0.1) as server:
        yield server


async def test_get_fills_the_template_url_encoded(tts: FakeTts) -> None:
    async with aiohttp.ClientSession() as session:
        engine = HttpTts(session, tts.url + "/tts?text={text}&voice={voice}", voice="小 晓")
        audio = await engine.synthesize("你好 & 再见?")
    assert audio.data == tts.wav
    assert audio.content_type == "audio/wav"
    (request,) = tts.requests
    assert (request.method, request.text, request.voice) == ("GET", "你好 & 再见?", "小 晓")


async def test_post_sends_json(tts: FakeTts) -> None:
    async with aiohttp.ClientSession() as session:
        engine = HttpTts(session, tts.url + "/tts", method="POST", voice="v1")
        audio = await engine.synthesize("你好")
    assert audio.data == tts.wav
    (request,) = tts.requests
    assert (request.method, request.text, request.voice) == ("POST", "你好", "v1")


async def test_errors_are_tts_errors_naming_the_host_only(tts: FakeTts) -> None:
    tts.failures = [503]
    async with aiohttp.ClientSession() as session:
        engine = HttpTts(session, tts.url + "/tts?text={text}&key=secret-key-123")
        with pytest.raises(TtsError) as caught:
            await engine.synthesize("你好")
        assert caught.value.reason == "http_status"
        assert "secret-key-123" not in str(caught.value)
        missing = HttpTts(session, tts.url + "/nope?text={text}")
        with pytest.raises(TtsError, match="HTTP 404"):
            await missing.synthesize("你好")
        small = HttpTts(session, tts.url + "/tts?text={text}", max_bytes=100)
        with pytest.raises(TtsError) as caught:
            await small.synthesize("你好")
        assert caught.value.reason == "too_large"
    await tts.__aexit__()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TtsError) as caught:
            await HttpTts(session, tts.url + "/tts?text={text}").synthesize("你好")
        assert caught.value.reason == "unreachable"


def test_edge_tts_is_optional() -> None:
    # Not exercised: it needs the internet. Only its presence check runs here.
    assert isinstance(EdgeTts.available(), bool)
