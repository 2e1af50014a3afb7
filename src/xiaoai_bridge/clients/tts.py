"""External text-to-speech: any HTTP TTS service, or edge-tts when it is installed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import aiohttp

from xiaoai_bridge.errors import BridgeError

_LOGGER = logging.getLogger(__name__)

DEFAULT_TTS_TIMEOUT_S = 10.0
DEFAULT_MAX_AUDIO_BYTES = 8 * 1024 * 1024
DEFAULT_EDGE_VOICE = "zh-CN-XiaoxiaoNeural"
_EDGE_CONTENT_TYPE = "audio/mpeg"  # edge-tts streams MP3 by default

HttpMethod = Literal["GET", "POST"]


class TtsError(BridgeError):
    """Speech could not be synthesized; `reason` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TtsAudio:
    """Synthesized speech: the file's bytes and its content type."""

    data: bytes
    content_type: str


class TtsEngine(Protocol):
    """Turns text into an audio file."""

    async def synthesize(self, text: str) -> TtsAudio:
        """The audio for `text`; raises TtsError."""
        ...


def sniff_content_type(data: bytes) -> str | None:
    """The audio type told by a file's first bytes, for servers that say octet-stream."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    if data[:4] == b"OggS":
        return "audio/ogg"
    if data[:4] == b"fLaC":
        return "audio/flac"
    return None


class HttpTts:
    """An HTTP TTS service: GET a URL template, or POST `{"text", "voice"}` as JSON.

    The template's `{text}` and `{voice}` are filled in URL-encoded, e.g.
    `http://host:5000/tts?text={text}&voice={voice}`. The answer's body is the audio.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        method: HttpMethod = "GET",
        voice: str = "",
        timeout_s: float = DEFAULT_TTS_TIMEOUT_S,
        max_bytes: int = DEFAULT_MAX_AUDIO_BYTES,
    ) -> None:
        self._session = session
        self._url = url
        self._method = method
        self._voice = voice
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_bytes = max_bytes
        # Errors name the host only: the template may carry an API key in its query.
        self._host = urlsplit(url).netloc.rpartition("@")[2]

    async def synthesize(self, text: str) -> TtsAudio:
        """The audio for `text`."""
        url = self._url.format(text=quote(text, safe=""), voice=quote(self._voice, safe=""))
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self._method == "POST":
            body = {"text": text, "voice": self._voice} if self._voice else {"text": text}
            kwargs["data"] = json.dumps(body, ensure_ascii=False).encode()
            kwargs["headers"] = {"Content-Type": "application/json"}
        try:
            async with self._session.request(self._method, url, **kwargs) as resp:
                if resp.status != 200:
                    raise TtsError("http_status", f"{self._host} answered HTTP {resp.status}")
                data = await resp.content.read(self._max_bytes + 1)
                declared = resp.content_type
        except aiohttp.ClientError as err:
            raise TtsError("unreachable", f"{self._host}: {type(err).__name__}") from err
        except TimeoutError as err:
            raise TtsError("timeout", f"{self._host} did not answer in time") from err
        if len(data) > self._max_bytes:
            raise TtsError("too_large", f"{self._host} sent over {self._max_bytes} bytes")
        if not data:
            raise TtsError("empty", f"{self._host} sent no audio")
        content_type = declared if declared.startswith("audio/") else sniff_content_type(data)
        if content_type is None:
            raise TtsError("not_audio", f"{self._host} sent {declared or 'no content type'}")
        return TtsAudio(data, content_type)


class EdgeTts:
    """Microsoft Edge's online voices through the optional `edge-tts` package."""

    def __init__(
        self, voice: str = DEFAULT_EDGE_VOICE, *, max_bytes: int = DEFAULT_MAX_AUDIO_BYTES
    ) -> None:
        self._voice = voice or DEFAULT_EDGE_VOICE
        self._max_bytes = max_bytes

    @staticmethod
    def available() -> bool:
        """True when the `edge-tts` package can be imported."""
        return importlib.util.find_spec("edge_tts") is not None

    async def synthesize(self, text: str) -> TtsAudio:
        """The MP3 for `text` (needs the internet)."""
        try:
            edge_tts: Any = importlib.import_module("edge_tts")
        except ImportError as err:
            raise TtsError("not_installed", "pip install edge-tts to use it") from err
        chunks: list[bytes] = []
        size = 0
        try:
            async for part in edge_tts.Communicate(text, self._voice).stream():
                if part.get("type") == "audio":
                    chunks.append(part["data"])
                    size += len(part["data"])
                    if size > self._max_bytes:
                        break
        except Exception as err:
            # The package raises its own and aiohttp's errors; all mean "no speech".
            raise TtsError("edge_tts", f"{type(err).__name__}: {err}") from err
        if size > self._max_bytes:
            raise TtsError("too_large", f"edge-tts sent over {self._max_bytes} bytes")
        if not chunks:
            raise TtsError("empty", "edge-tts sent no audio")
        return TtsAudio(b"".join(chunks), _EDGE_CONTENT_TYPE)
