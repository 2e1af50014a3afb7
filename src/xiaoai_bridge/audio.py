"""Audio clips held for a speaker to fetch over HTTP, and how long a clip plays."""

from __future__ import annotations

import io
import logging
import re
import secrets
import time
import wave
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from xiaoai_bridge.errors import BridgeError

_LOGGER = logging.getLogger(__name__)

AUDIO_PATH = "/audio/"
# A speaker fetches its clip within seconds; minutes leave room for a slow cloud relay.
DEFAULT_KEEP_S = 180.0
DEFAULT_MAX_CLIPS = 32
DEFAULT_MAX_CLIP_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOTAL_BYTES = 32 * 1024 * 1024
_ID_BYTES = 18  # 24 URL-safe characters: unguessable, so the path needs no token
_EXTENSIONS = {
    "audio/wav": "wav",
    "audio/wave": "wav",
    "audio/x-wav": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/aac": "aac",
    "audio/mp4": "m4a",
    "audio/ogg": "ogg",
    "audio/flac": "flac",
}
NAME_RE = re.compile(r"[A-Za-z0-9_-]{16,64}\.[a-z0-9]{2,4}")

# MPEG audio frame header tables: kbit/s by bitrate index (index 0 "free" and 15 are invalid).
_MPEG1_L3_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MPEG2_L3_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_MP3_SCAN_BYTES = 64 * 1024


class AudioStoreError(BridgeError):
    """A clip cannot be stored (too large for the limits)."""


@dataclass(frozen=True, slots=True)
class Clip:
    """One stored clip."""

    data: bytes
    content_type: str
    expires_at: float


def extension_for(content_type: str) -> str:
    """The file extension a speaker expects for this content type ("bin" if unknown)."""
    return _EXTENSIONS.get(content_type.split(";", 1)[0].strip().lower(), "bin")


class AudioStore:
    """Bounded in-memory clips under unguessable names, each kept a few minutes.

    The HTTP server serves them at `<public_url>/audio/<name>` without the page token,
    because a speaker cannot send one; the random name is the only key.
    """

    def __init__(
        self,
        public_url: str,
        *,
        keep_s: float = DEFAULT_KEEP_S,
        max_clips: int = DEFAULT_MAX_CLIPS,
        max_clip_bytes: int = DEFAULT_MAX_CLIP_BYTES,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.public_url = public_url.rstrip("/")
        self._keep_s = keep_s
        self._max_clips = max_clips
        self._max_clip_bytes = max_clip_bytes
        self._max_total_bytes = max_total_bytes
        self._clock = clock
        self._clips: OrderedDict[str, Clip] = OrderedDict()
        self._total = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._clips)

    def put(self, data: bytes, content_type: str, *, plays_s: float = 0.0) -> str:
        """Store a clip; its URL. It expires `keep_s` after it would have finished playing."""
        if len(data) > self._max_clip_bytes:
            raise AudioStoreError(
                f"clip of {len(data)} bytes is over the {self._max_clip_bytes}-byte limit"
            )
        self._expire()
        name = f"{secrets.token_urlsafe(_ID_BYTES)}.{extension_for(content_type)}"
        self._clips[name] = Clip(data, content_type, self._clock() + plays_s + self._keep_s)
        self._total += len(data)
        while len(self._clips) > self._max_clips or self._total > self._max_total_bytes:
            _, oldest = self._clips.popitem(last=False)
            self._total -= len(oldest.data)
            _LOGGER.debug("audio store full: dropped the oldest clip")
        return f"{self.public_url}{AUDIO_PATH}{name}"

    def get(self, name: str) -> Clip | None:
        """The clip stored under `name` (the last part of its URL), unless expired."""
        self._expire()
        return self._clips.get(name)

    def _expire(self) -> None:
        now = self._clock()
        for name in [name for name, clip in self._clips.items() if clip.expires_at <= now]:
            self._total -= len(self._clips.pop(name).data)


def audio_duration_s(data: bytes, content_type: str) -> float | None:
    """How long a WAV or MP3 clip plays; None when the format is not understood."""
    ext = extension_for(content_type)
    if ext == "wav" or data[:4] == b"RIFF":
        return _wav_duration_s(data)
    if ext == "mp3":
        return _mp3_duration_s(data)
    return None


def _wav_duration_s(data: bytes) -> float | None:
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            rate = wav.getframerate()
            return wav.getnframes() / rate if rate else None
    except (wave.Error, EOFError):
        return None


def _mp3_duration_s(data: bytes) -> float | None:
    """The length at the first frame's bitrate: exact for constant-bitrate MP3 (edge-tts)."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        # ID3v2 size is four 7-bit "syncsafe" bytes after the 10-byte header.
        size = 0
        for byte in data[6:10]:
            size = (size << 7) | (byte & 0x7F)
        start = 10 + size
    end = min(len(data) - 3, start + _MP3_SCAN_BYTES)
    for i in range(start, end):
        if data[i] != 0xFF or data[i + 1] & 0xE0 != 0xE0:
            continue
        version = (data[i + 1] >> 3) & 0x03  # 3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5
        layer = (data[i + 1] >> 1) & 0x03  # 1 = Layer III
        index = data[i + 2] >> 4
        if version == 1 or layer != 1 or index in (0, 15):
            continue
        table = _MPEG1_L3_KBPS if version == 3 else _MPEG2_L3_KBPS
        return (len(data) - i) * 8 / (table[index] * 1000)
    return None
