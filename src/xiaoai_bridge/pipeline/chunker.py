"""Cut a stream of LLM text deltas into sentences as soon as each one is complete."""

from __future__ import annotations

import re

# A bare interjection ("嗯。", "OK.", "好的。") is not worth a TTS request of its own: each
# request costs the speaker a round trip and an audible gap, so it is folded into the next
# sentence. Four characters keeps "嗯。好的。" together but lets "你好呀！" through alone.
DEFAULT_MIN_CHARS = 4
# Longer than nearly every real sentence (about 25 s of Chinese speech), so normal sentences are
# never split, yet an answer that runs on without terminators still starts speaking after one
# short paragraph instead of only when the whole answer has arrived.
DEFAULT_MAX_CHARS = 120
# A sentence keeps its own closing punctuation ("……”", "?!)") even when that pushes the chunk
# past max_chars, so that punctuation never starts the next chunk; bounded so that a model
# looping on "！！！！" cannot grow a chunk without limit.
MAX_TRAILING_PUNCTUATION = 8

_CJK_TERMINATORS = "。！？；…｡"
_WESTERN_TERMINATORS = ".!?;"
_TERMINATORS = frozenset(_CJK_TERMINATORS + _WESTERN_TERMINATORS)
_CJK_TERMINATOR_SET = frozenset(_CJK_TERMINATORS)
_CLOSERS = "”’」』）)]\"'》】"
_CLOSER_SET = frozenset(_CLOSERS)
# Once a terminator is seen, more terminators and closing quotes/brackets belong to the same run.
_RUN_CHARS = frozenset(_CJK_TERMINATORS + _WESTERN_TERMINATORS + _CLOSERS)
_PUNCTUATION_BREAKS = frozenset("，、：:,")
_SOFT_BREAKS = "，、：:, \t\u3000"
_NEWLINES = "\n\r"
# Only these characters can change a decision, so the scan jumps between them in C instead of
# looking at every character of the buffer in Python.
_SPECIAL = re.compile(
    "[" + re.escape(_CJK_TERMINATORS + _WESTERN_TERMINATORS + _SOFT_BREAKS + _NEWLINES) + "]"
)
# "." after these does not end an English sentence ("e.g. this", "Dr. Wang").
_ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "cf"}
)


class SentenceChunker:
    """Incrementally split streamed text into speakable chunks of one or more sentences.

    Chunks end after a sentence terminator, at every newline (so markdown lines stay whole for the
    speech cleaner), or at the last soft break before ``max_chars`` when a run has no terminator.
    Chunks are stripped; apart from whitespace at chunk edges and newlines, joining all chunks and
    ``flush()`` gives back the input. A chunk never exceeds ``max_chars`` except by its own trailing
    terminators and closing quotes (at most ``MAX_TRAILING_PUNCTUATION`` characters).
    """

    def __init__(
        self, *, min_chars: int = DEFAULT_MIN_CHARS, max_chars: int = DEFAULT_MAX_CHARS
    ) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        if not 0 <= min_chars <= max_chars:
            raise ValueError(f"min_chars must be between 0 and max_chars, got {min_chars}")
        self._min = min_chars
        self._max = max_chars
        # Invariant: _buf is empty or starts with non-whitespace, holds no accepted boundary, and
        # _buf[:_scan] has been scanned; _soft is the best soft cut seen in it (-1 if none).
        self._buf = ""
        self._scan = 0
        self._soft = -1

    def feed(self, delta: str) -> list[str]:
        """Add a delta of the stream; return the chunks it completed, in order."""
        if self._buf:
            self._buf += delta
        else:
            self._buf = delta.lstrip()
            if not self._buf:
                return []
        out: list[str] = []
        self._drain(out)
        return out

    def flush(self) -> str:
        """End the stream: return the remaining text ("" if none) and reset for a new stream."""
        # The buffer never holds more than one chunk: every decidable boundary was already cut.
        rest = self._buf.strip()
        self._buf, self._scan, self._soft = "", 0, -1
        return rest

    def _drain(self, out: list[str]) -> None:
        buf, i, soft = self._buf, self._scan, self._soft
        min_chars, max_chars = self._min, self._max
        while True:
            n = len(buf)
            match = _SPECIAL.search(buf, i)
            k = match.start() if match else n
            if k > max_chars:
                # buf[:max_chars + 1] holds no boundary: the chunk has to be cut somewhere.
                cut = soft if soft >= min_chars else max_chars
                out.append(buf[:cut].rstrip())
                buf, i, soft = buf[cut:].lstrip(), 0, -1
                continue
            if match is None:
                i = n
                break
            char = buf[k]
            if char in _NEWLINES:
                line = buf[:k].rstrip()
                if line:
                    out.append(line)
                buf, i, soft = buf[k + 1 :].lstrip(), 0, -1
                continue
            if char in _TERMINATORS:
                j = k + 1
                while j < n and j - k < MAX_TRAILING_PUNCTUATION and buf[j] in _RUN_CHARS:
                    j += 1
                if j == n:
                    # More of the run, or the whitespace that confirms a ".", may still come.
                    i = k
                    break
                # A sentence shorter than min_chars is not cut here: it merges with the next.
                if j >= min_chars and _ends_sentence(buf, k, j):
                    out.append(buf[:j])
                    buf, i, soft = buf[j:].lstrip(), 0, -1
                    continue
                i = j
                continue
            # A soft break: only remembered, used if the run reaches max_chars.
            if char in _PUNCTUATION_BREAKS:
                if k < max_chars:
                    soft = k + 1
            elif not buf[k - 1].isspace():
                soft = k  # cut before the space, so the chunk does not end up shorter
            i = k + 1
        self._buf, self._scan, self._soft = buf, i, soft


def _ends_sentence(buf: str, start: int, end: int) -> bool:
    """Whether the terminator run buf[start:end], followed by buf[end], ends a sentence."""
    following = buf[end]
    if buf[end - 1] in _CLOSER_SET and following.isalnum():
        return False  # a quotation inside the sentence: “好的！”他说。
    if any(char in _CJK_TERMINATOR_SET for char in buf[start:end]):
        return True
    if not following.isspace():
        return False  # "3.14", "v1.2", "example.com"
    if buf[start] != ".":
        return True
    if buf[:start].isdigit():
        return False  # an ordered-list marker such as "1. " at the start of a line
    word_start = start
    while word_start > 0 and (buf[word_start - 1].isalpha() or buf[word_start - 1] == "."):
        word_start -= 1
    return buf[word_start:start].lower() not in _ABBREVIATIONS
