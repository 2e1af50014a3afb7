"""The audio store's limits and expiry, and clip durations."""

from __future__ import annotations

import pytest

from tests.fakes.tts_server import make_wav
from xiaoai_bridge.audio import AudioStore, AudioStoreError, audio_duration_s

BASE = "http://192.168.1.5:8099"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def name_of(url: str) -> str:
    assert url.startswith(BASE + "/audio/")
    return url.rsplit("/", 1)[1]


def test_clip_is_served_until_it_expires_after_playing() -> None:
    clock = Clock()
    store = AudioStore(BASE + "/", keep_s=60, clock=clock)
    url = store.put(b"RIFF....WAVE", "audio/wav", plays_s=5)
    name = name_of(url)
    assert name.endswith(".wav")
    assert len(name.removesuffix(".wav")) >= 24
    clock.now += 64
    clip = store.get(name)
    assert clip is not None
    assert (clip.data, clip.content_type) == (b"RIFF....WAVE", "audio/wav")
    clock.now += 1
    assert store.get(name) is None
    assert len(store) == 0


def test_names_are_unguessable_and_limits_drop_the_oldest() -> None:
    store = AudioStore(BASE, max_clips=3, max_total_bytes=25, clock=Clock())
    names = [name_of(store.put(bytes(10), "audio/mpeg")) for _ in range(2)]
    assert names[0] != names[1]
    assert all(name.endswith(".mp3") for name in names)
    third = name_of(store.put(bytes(10), "audio/mpeg"))  # 30 bytes > 25: the oldest goes
    assert store.get(names[0]) is None
    assert store.get(names[1]) is not None
    assert store.get(third) is not None
    for _ in range(3):
        store.put(b"x", "audio/ogg")
    assert len(store) == 3
    assert store.get(names[1]) is None


def test_a_clip_over_the_size_limit_is_refused() -> None:
    store = AudioStore(BASE, max_clip_bytes=4)
    with pytest.raises(AudioStoreError, match="limit"):
        store.put(b"12345", "audio/wav")


def test_wav_duration_from_its_header() -> None:
    assert audio_duration_s(make_wav(0.25), "audio/wav") == pytest.approx(0.25)
    # Some servers say octet-stream; the RIFF header still tells.
    assert audio_duration_s(make_wav(0.5), "application/octet-stream") == pytest.approx(0.5)
    assert audio_duration_s(b"RIFF-broken", "audio/wav") is None


def test_mp3_duration_from_the_first_frame_bitrate() -> None:
    # MPEG-1 Layer III, no CRC (FF FB), 128 kbit/s (index 9), 44.1 kHz: 16 000 bytes = 1 s.
    frames = (b"\xff\xfb\x90\x00" + bytes(413)) * 38
    frames += bytes(16_000 - len(frames))
    assert audio_duration_s(frames, "audio/mpeg") == pytest.approx(1.0)
    # An ID3v2 tag of 100 bytes (syncsafe size) in front is skipped.
    tagged = b"ID3\x04\x00\x00\x00\x00\x00\x64" + bytes(100) + frames
    assert audio_duration_s(tagged, "audio/mpeg") == pytest.approx(1.0)
    # MPEG-2 Layer III at 48 kbit/s (index 6), as edge-tts sends: 6 000 bytes = 1 s.
    assert audio_duration_s(b"\xff\xf3\x60\x00" + bytes(5996), "audio/mpeg") == pytest.approx(1.0)
    assert audio_duration_s(b"not audio", "audio/mpeg") is None
    assert audio_duration_s(b"OggS", "audio/ogg") is None
