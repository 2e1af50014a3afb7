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
# The first chunk of an answer may end at a clause break once it is this long (the break
# included): about two seconds of Chinese speech, so the first words go out early without a
# choppy "好的，" of their own. Later chunks wait for the sentence end (a TTS request per comma
# would add an audible gap at each).
DEFAULT_FIRST_CLAUSE_CHARS = 8
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
# Where the first chunk may end early; "," and ":" only before whitespace ("1,000", "3:30").
# Semicolons are not here: they already end a chunk like a full stop.
_CLAUSE_BREAKS = _PUNCTUATION_BREAKS
_WESTERN_CLAUSE_BREAKS = frozenset(",:")
# A clause is not cut inside these: speaking half a quotation or parenthesis sounds broken.
# Single quotes are left out, as "’" and "'" are mostly apostrophes ("don’t").
_BRACKET_PAIRS = tuple(zip("“「『（([《【", "”」』）)]》】", strict=True))
_UNDECIDED = -1
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
    The first chunk after construction or ``flush()`` may also end at a clause break (，、： or
    a comma or colon before whitespace, with its closing quotes) once it has
    ``first_clause_chars`` characters (0: never), so the first words can be spoken sooner.
    Chunks are stripped; apart from whitespace at chunk edges and newlines, joining all chunks and
    ``flush()`` gives back the input. A chunk never exceeds ``max_chars`` except by its own trailing
    terminators and closing quotes (at most ``MAX_TRAILING_PUNCTUATION`` characters).
    """

    def __init__(
        self,
        *,
        min_chars: int = DEFAULT_MIN_CHARS,
        max_chars: int = DEFAULT_MAX_CHARS,
        first_clause_chars: int = DEFAULT_FIRST_CLAUSE_CHARS,
    ) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        if not 0 <= min_chars <= max_chars:
            raise ValueError(f"min_chars must be between 0 and max_chars, got {min_chars}")
        if first_clause_chars < 0:
            raise ValueError(f"first_clause_chars must be at least 0, got {first_clause_chars}")
        self._min = min_chars
        self._max = max_chars
        # A clause is never shorter than the shortest sentence that may stand alone.
        self._clause_min = max(first_clause_chars, min_chars) if first_clause_chars else 0
        self._first = True  # no chunk of this stream returned yet
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
        if out:
            self._first = False
        return out

    def flush(self) -> str:
        """End the stream: return the remaining text ("" if none) and reset for a new stream."""
        # The buffer never holds more than one chunk: every decidable boundary was already cut.
        rest = self._buf.strip()
        self._buf, self._scan, self._soft = "", 0, -1
        self._first = True
        return rest

    def _drain(self, out: list[str]) -> None:
        buf, i, soft = self._buf, self._scan, self._soft
        min_chars, max_chars = self._min, self._max
        clause_min = self._clause_min if self._first else 0
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
            if clause_min and not out and char in _CLAUSE_BREAKS and k < max_chars:
                j = _clause_end(buf, k, clause_min)
                if j == _UNDECIDED:
                    i = k
                    break
                if j:
                    out.append(buf[:j])
                    buf, i, soft = buf[j:].lstrip(), 0, -1
                    continue
            soft = _soft_cut(buf, k, soft, max_chars)
            i = k + 1
        self._buf, self._scan, self._soft = buf, i, soft


def _soft_cut(buf: str, k: int, soft: int, max_chars: int) -> int:
    """The best soft cut once the soft break buf[k] is seen: used if the run reaches max_chars."""
    if buf[k] in _PUNCTUATION_BREAKS:
        return k + 1 if k < max_chars else soft
    # Cut before the first of several spaces, so the chunk does not end up shorter.
    return soft if buf[k - 1].isspace() else k


def _clause_end(buf: str, k: int, clause_min: int) -> int:
    """Where a first chunk ending at the clause break buf[k] ends (with its closing quotes).

    0 if the break does not end it there, ``_UNDECIDED`` if the next character is needed.
    """
    end = k + 1
    while end < len(buf) and end - k < MAX_TRAILING_PUNCTUATION and buf[end] in _CLOSER_SET:
        end += 1
    if end == len(buf):
        return _UNDECIDED  # a closing quote, or the whitespace that confirms a ",", may come
    return end if end >= clause_min and _ends_clause(buf, k, end) else 0


def _ends_clause(buf: str, start: int, end: int) -> bool:
    """Whether the clause break buf[start] with closers up to end, then buf[end], ends a clause."""
    following = buf[end]
    if buf[end - 1] in _CLOSER_SET and following.isalnum():
        return False  # a quotation inside the clause: “好的，”他说
    if buf[start] in _WESTERN_CLAUSE_BREAKS and not following.isspace():
        return False  # "1,000", "3:30", "https://"
    clause = buf[:end]
    if clause.count('"') % 2:
        return False
    return all(clause.count(opened) <= clause.count(closed) for opened, closed in _BRACKET_PAIRS)


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
