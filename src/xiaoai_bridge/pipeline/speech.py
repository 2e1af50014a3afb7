"""Strip markdown, URLs, HTML and emoji from answer chunks so a speaker reads only the words."""

from __future__ import annotations

import html

import regex

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"

# A fence opens with ``` or ~~~ (an info string may follow) and closes with at least as many of
# the same character; a ``` line whose info string holds a backtick is inline code, not a fence.
_FENCE = regex.compile(r"(`{3,}|~{3,})(.*)")
# Thematic breaks (---, ***, ___, "* * *") and table separator rows (|---|:--:|).
_RULE = regex.compile(r"([-*_])(?:\s*\1){2,}")
_TABLE_SEPARATOR = regex.compile(r"\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?")
_BLOCKQUOTE = regex.compile(r"\s*(?:>\s?)+")
# "##标题" without the space is not a heading in CommonMark, but models write it in Chinese.
_HEADING = regex.compile(r"\s*#{1,6}(?:\s+|$|(?=\p{Han}))")
_HEADING_CLOSE = regex.compile(r"\s+#+\s*$")
# "1.打开" is read "一点打开" by a TTS, so a number marker directly before Chinese also goes.
_LIST_MARKER = regex.compile(r"\s*(?:[-*+•]\s+|\d{1,3}[.)．](?:\s+|(?=\p{Han})))(?:\[[ xX]\]\s+)?")

# Keycaps first: their digit or # belongs to the emoji ("1️⃣" is not "1").
_EMOJI = regex.compile(
    r"[0-9#*]\uFE0F?\u20E3"
    r"|[\p{Extended_Pictographic}\p{Regional_Indicator}\p{Emoji_Modifier}"
    r"\uFE0E\uFE0F\u200D\u20E3\U000E0020-\U000E007F]+"
)

_AUTOLINK = regex.compile(r"<(?:https?://|www\.|mailto:)[^<>\s]*>")
_LINK = regex.compile(
    r"(!?)\[([^\[\]]*)\]\((?:[^()\s]|\([^()\s]*\))*(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
_REFERENCE_LINK = regex.compile(r"\[([^\[\]]+)\]\[[^\[\]]*\]")
_FOOTNOTE = regex.compile(r"\[\^[^\[\]]+\]")
_URL = regex.compile(r"(?:https?://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_URL_TRAILING = ".,;:!?'\")]"
_HTML_COMMENT = regex.compile(r"<!--.*?(?:-->|$)")
_HTML_BREAK = regex.compile(r"<br\s*/?>", regex.IGNORECASE)
_HTML_TAG = regex.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_CODE_SPAN = regex.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_MARKERS = regex.compile(r"\*+|_+|~{2,}")
_ESCAPE = regex.compile(r"\\([\\`*_{}\[\]()#+\-.!|~<>])")
_EMPTY_BRACKETS = regex.compile(r"\(\s*\)|（\s*）|\[\s*\]|【\s*】|<\s*>|“\s*”|「\s*」")
_SPACE_BEFORE_PUNCTUATION = regex.compile(r"\s+(?=[，。！？；：、）」』”’,.!?;:)\]])")
_WHITESPACE = regex.compile(r"\s+")
_SPEAKABLE = regex.compile(r"[\p{L}\p{N}]")
_HAN = regex.compile(r"\p{Han}")


class SpeechCleaner:
    """Cleans the chunks of ONE answer; keeps state because a code fence spans many chunks."""

    def __init__(self) -> None:
        self._fence = ""
        self._thinking = False

    def clean(self, chunk: str) -> str:
        """Return what of this chunk should be spoken ("" if nothing speakable remains)."""
        spoken = (self._clean_line(line) for line in chunk.splitlines())
        return " ".join(line for line in spoken if line)

    def _clean_line(self, line: str) -> str:
        if self._thinking or _THINK_OPEN in line:
            # Reasoning models served without a reasoning parser stream their thoughts inline.
            line = self._drop_thinking(line)
        stripped = line.strip()
        if self._fence:
            if stripped.startswith(self._fence) and not stripped.strip(self._fence[0]):
                self._fence = ""
            return ""
        fence = _FENCE.fullmatch(stripped)
        if fence and not (fence[1][0] == "`" and "`" in fence[2]):
            self._fence = fence[1]
            return ""
        text = _EMOJI.sub(" ", line)
        text = _BLOCKQUOTE.sub("", text, count=1) if text.lstrip().startswith(">") else text
        if _RULE.fullmatch(text.strip()) or _TABLE_SEPARATOR.fullmatch(text.strip()):
            return ""
        if text.lstrip().startswith("|"):
            text = _table_row(text)
        elif heading := _HEADING.match(text):
            text = _HEADING_CLOSE.sub("", text[heading.end() :])
        elif marker := _LIST_MARKER.match(text):
            text = text[marker.end() :]
        text = _inline(text)
        return text if _SPEAKABLE.search(text) else ""

    def _drop_thinking(self, line: str) -> str:
        kept: list[str] = []
        pos = 0
        while True:
            if self._thinking:
                end = line.find(_THINK_CLOSE, pos)
                if end < 0:
                    break
                self._thinking = False
                pos = end + len(_THINK_CLOSE)
            else:
                start = line.find(_THINK_OPEN, pos)
                if start < 0:
                    kept.append(line[pos:])
                    break
                kept.append(line[pos:start])
                self._thinking = True
                pos = start + len(_THINK_OPEN)
        return "".join(kept)


def clean_text(text: str) -> str:
    """Clean a whole answer at once, line by line through one cleaner."""
    return SpeechCleaner().clean(text)


def _table_row(text: str) -> str:
    cells = [cell.strip() for cell in text.strip().strip("|").split("|")]
    # Cells become a spoken list; a Chinese comma gives a Chinese TTS the right pause.
    separator = "，" if _HAN.search(text) else ", "
    return separator.join(cell for cell in cells if cell)


def _inline(text: str) -> str:
    # An escaped marker such as \* is still not a word to speak: unescape, then treat it as markup.
    text = _ESCAPE.sub(r"\1", text)
    text = _AUTOLINK.sub("", text)
    text = _LINK.sub(lambda link: "" if link[1] else link[2], text)
    text = _REFERENCE_LINK.sub(r"\1", text)
    text = _FOOTNOTE.sub("", text)
    text = _URL.sub(_url_leftover, text)
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_BREAK.sub(" ", text)
    text = _HTML_TAG.sub("", text)
    # Emphasis markers are only removed outside code spans, whose words are kept as written.
    parts: list[str] = []
    pos = 0
    for span in _CODE_SPAN.finditer(text):
        parts.append(_MARKERS.sub(_marker, text[pos : span.start()]))
        parts.append(span[2].strip())
        pos = span.end()
    parts.append(_MARKERS.sub(_marker, text[pos:]))
    text = "".join(parts).replace("`", "")
    text = html.unescape(text)
    text = _EMPTY_BRACKETS.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCTUATION.sub("", text)


def _url_leftover(url: regex.Match[str]) -> str:
    """Drop a bare URL but give back the punctuation that ends the sentence around it."""
    text = url[0]
    end = len(text)
    while end and text[end - 1] in _URL_TRAILING:
        if text[end - 1] == ")" and text.count("(", 0, end) >= text.count(")", 0, end):
            break
        end -= 1
    return text[end:]


def _marker(run: regex.Match[str]) -> str:
    """Drop an emphasis marker run unless it is literal (snake_case, 2*3, a * b)."""
    marker = run[0]
    text = run.string
    before = text[run.start() - 1] if run.start() else " "
    after = text[run.end()] if run.end() < len(text) else " "
    if marker[0] == "~":
        return ""
    if marker[0] == "_":
        return marker if before.isalnum() and after.isalnum() else ""
    if (before.isdigit() and after.isdigit()) or (before.isspace() and after.isspace()):
        return marker
    return ""
