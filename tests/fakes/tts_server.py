"""A fake HTTP TTS service on loopback: answers with a short silent WAV made by `wave`."""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass, field

from aiohttp import web

SAMPLE_RATE = 8000


def make_wav(seconds: float) -> bytes:
    """A mono 16-bit silent WAV file of `seconds`."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(b"\0\0" * int(SAMPLE_RATE * seconds))
    return buffer.getvalue()


@dataclass(frozen=True)
class TtsRequest:
    """One synthesis request the fake received."""

    method: str
    text: str
    voice: str


@dataclass
class FakeTts:
    """`async with FakeTts() as tts:` serves GET /tts?text=&voice= and POST /tts (JSON)."""

    seconds: float = 0.3
    requests: list[TtsRequest] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)  # statuses for the next requests
    url: str = ""
    _runner: web.AppRunner | None = None

    @property
    def wav(self) -> bytes:
        """The file every request gets."""
        return make_wav(self.seconds)

    async def __aenter__(self) -> FakeTts:
        app = web.Application()
        app.router.add_get("/tts", self._tts)
        app.router.add_post("/tts", self._tts)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _tts(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            body = await request.json()
            text, voice = str(body.get("text", "")), str(body.get("voice", ""))
        else:
            text, voice = request.query.get("text", ""), request.query.get("voice", "")
        self.requests.append(TtsRequest(request.method, text, voice))
        if self.failures:
            status = self.failures.pop(0)
            return web.Response(status=status, text="synthesis failed")
        return web.Response(body=self.wav, content_type="audio/wav")
