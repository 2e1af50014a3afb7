"""Facts about spoken text shared by the pipeline and the sinks: joining and duration."""

from __future__ import annotations

import unicodedata


def is_wide(char: str) -> bool:
    """True for full-width characters (CJK): no spaces around them, about a token each."""
    return unicodedata.east_asian_width(char) in "WF"


def join_spoken(first: str, second: str) -> str:
    """Join two sentences: no space next to CJK, one space between Western text."""
    if first and second and not is_wide(first[-1]) and not is_wide(second[0]):
        return f"{first} {second}"
    return first + second


def estimate_speech_s(text: str, chars_per_second: float, overhead_s: float = 0.0) -> float:
    """How long a speaker takes to say `text` (whitespace does not count); 0 for nothing."""
    spoken = sum(1 for char in text if not char.isspace())
    return spoken / chars_per_second + overhead_s if spoken else 0.0
