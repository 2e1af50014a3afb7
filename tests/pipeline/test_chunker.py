"""Tests for the streaming sentence chunker."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xiaoai_bridge.pipeline.chunker import (
    DEFAULT_FIRST_CLAUSE_CHARS,
    DEFAULT_MAX_CHARS,
    MAX_TRAILING_PUNCTUATION,
    SentenceChunker,
)


def chunk_all(deltas: list[str], **kwargs: int) -> list[str]:
    """Feed every delta, then flush; return all chunks in order."""
    chunker = SentenceChunker(**kwargs)
    chunks = [chunk for delta in deltas for chunk in chunker.feed(delta)]
    rest = chunker.flush()
    return [*chunks, rest] if rest else chunks


def feed_each(deltas: list[str], **kwargs: int) -> tuple[list[list[str]], str]:
    """Feed every delta; return what each feed returned, and the flush."""
    chunker = SentenceChunker(**kwargs)
    per_delta = [chunker.feed(delta) for delta in deltas]
    return per_delta, chunker.flush()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "今天天气很好。我们去公园吧！你觉得怎么样？",
            ["今天天气很好。", "我们去公园吧！", "你觉得怎么样？"],
            id="cjk-terminators",
        ),
        pytest.param(
            "首先准备材料；然后开始烹饪。",
            ["首先准备材料；", "然后开始烹饪。"],
            id="cjk-semicolon",
        ),
        pytest.param(
            "真的吗？！太好了……我们马上出发。",
            ["真的吗？！", "太好了……", "我们马上出发。"],
            id="terminator-runs",
        ),
        pytest.param(
            "她问：“你明天来吗？”“我一定来！”",
            ["她问：“你明天来吗？”", "“我一定来！”"],
            id="closing-quote-stays",
        ),
        pytest.param(
            "注意（这一步很重要！）。下一步是保存。",
            ["注意（这一步很重要！）。", "下一步是保存。"],
            id="closing-bracket-then-terminator",
        ),
        pytest.param(
            "他说：“没问题。”然后就走了。",
            ["他说：“没问题。”然后就走了。"],
            id="quotation-inside-sentence-not-cut",
        ),
        pytest.param(
            "Pi is roughly 3.14. Visit example.com for v1.2 today! Really? Yes; indeed.",
            [
                "Pi is roughly 3.14.",
                "Visit example.com for v1.2 today!",
                "Really?",
                "Yes;",
                "indeed.",
            ],
            id="western-needs-whitespace",
        ),
        pytest.param(
            "Type e.g.x in the box. Then press enter.",
            ["Type e.g.x in the box.", "Then press enter."],
            id="dotted-word-not-cut",
        ),
        pytest.param(
            "Use a tool, e.g. a hammer, i.e. anything heavy. Dr. Wang agrees.",
            ["Use a tool, e.g. a hammer, i.e. anything heavy.", "Dr. Wang agrees."],
            id="abbreviations-not-cut",
        ),
        pytest.param(
            'He said "Stop!" Then he left.',
            ['He said "Stop!"', "Then he left."],
            id="western-closing-quote",
        ),
        pytest.param(
            "明天北京晴，最高气温25℃。Have a nice day!",
            ["明天北京晴，最高气温25℃。", "Have a nice day!"],
            id="mixed-chinese-english",
        ),
        pytest.param(
            "  你好呀！   再见啦。  ",
            ["你好呀！", "再见啦。"],
            id="whitespace-stripped",
        ),
    ],
)
def test_sentence_boundaries(text: str, expected: list[str]) -> None:
    # Sentences alone: the first chunk's early clause break is tested below.
    assert chunk_all([text], first_clause_chars=0) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "## 今日天气\n\n- 北京：晴\n- 上海：小雨\n\n祝你愉快！",
            ["## 今日天气", "- 北京：晴", "- 上海：小雨", "祝你愉快！"],
            id="markdown-lines",
        ),
        pytest.param(
            "示例代码如下：\n```python\nprint(3.14)\n```\n运行即可。",
            ["示例代码如下：", "```python", "print(3.14)", "```", "运行即可。"],
            id="code-fence-lines",
        ),
        pytest.param(
            "1. Open settings.\n2. Tap Bluetooth.\n10. Done",
            ["1. Open settings.", "2. Tap Bluetooth.", "10. Done"],
            id="ordered-list-number-not-cut",
        ),
        pytest.param("OK\n好\n", ["OK", "好"], id="short-lines-still-emitted"),
        pytest.param(
            "第一段。\n\n\n   \n第二段。", ["第一段。", "第二段。"], id="blank-lines-skipped"
        ),
        pytest.param("第一行。\r\n第二行。\r\n", ["第一行。", "第二行。"], id="crlf"),
        pytest.param(
            "| 城市 | 天气 |\n|---|---|\n| 北京 | 晴 |",
            ["| 城市 | 天气 |", "|---|---|", "| 北京 | 晴 |"],
            id="table-rows",
        ),
    ],
)
def test_newline_is_a_hard_boundary(text: str, expected: list[str]) -> None:
    assert chunk_all([text]) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("嗯。好的，我明白了。", ["嗯。好的，我明白了。"], id="cjk-interjection"),
        pytest.param("OK. Sure. Let me check.", ["OK. Sure.", "Let me check."], id="english"),
        pytest.param("好。行。可以。没问题。", ["好。行。", "可以。没问题。"], id="several-short"),
        pytest.param(
            "嗯。\n好的，我明白了。", ["嗯。", "好的，我明白了。"], id="not-across-newline"
        ),
        pytest.param("好的。嗯。", ["好的。嗯。"], id="flush-emits-short-rest"),
        pytest.param("嗯。", ["嗯。"], id="only-a-short-sentence"),
    ],
)
def test_short_sentences_merge_with_the_next(text: str, expected: list[str]) -> None:
    assert chunk_all([text]) == expected


def test_min_chars_is_configurable() -> None:
    assert chunk_all(["嗯。好的。"], min_chars=1) == ["嗯。", "好的。"]
    assert chunk_all(["你好呀！再见啦。"], min_chars=5) == ["你好呀！再见啦。"]


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [
        pytest.param(
            "第一部分内容比较长，第二部分内容也很长，第三部分",
            12,
            ["第一部分内容比较长，", "第二部分内容也很长，", "第三部分"],
            id="cjk-comma",
        ),
        pytest.param(
            "材料有面粉、鸡蛋、牛奶、白糖和黄油",
            10,
            ["材料有面粉、鸡蛋、", "牛奶、白糖和黄油"],
            id="cjk-enumeration-comma",
        ),
        pytest.param(
            "The quick brown fox jumps over the lazy dog",
            20,
            ["The quick brown fox", "jumps over the lazy", "dog"],
            id="english-spaces",
        ),
        pytest.param(
            "一二三四五六七八九十甲乙丙",
            10,
            ["一二三四五六七八九十", "甲乙丙"],
            id="hard-cut-without-soft-break",
        ),
        pytest.param(
            "嗯。一二三四五六七八九十",
            6,
            ["嗯。一二三四", "五六七八九十"],
            id="short-sentence-is-not-cut-off-alone",
        ),
        pytest.param(
            "一二三四五六七八九十！”\n好",
            10,
            ["一二三四五六七八九十！”", "好"],
            id="trailing-punctuation-may-exceed",
        ),
        pytest.param(
            "版本号是1.2.3.4.5.6.7.8.9",
            10,
            ["版本号是1.2.3.", "4.5.6.7.8.", "9"],
            id="undecided-dots-cut-hard",
        ),
    ],
)
def test_long_runs_are_cut_at_max_chars(text: str, max_chars: int, expected: list[str]) -> None:
    assert chunk_all([text], max_chars=max_chars) == expected


def test_default_max_chars_cuts_a_long_answer_at_a_comma() -> None:
    clause = "这是一个没有句号的很长的分句"  # 14 characters, then a comma
    text = "，".join([clause] * 20)
    chunks = chunk_all([text])
    assert all(len(chunk) <= DEFAULT_MAX_CHARS for chunk in chunks)
    assert all(chunk.endswith("，") for chunk in chunks[:-1])
    assert "".join(chunks) == text


@pytest.mark.parametrize(
    ("deltas", "expected_per_delta", "expected_flush"),
    [
        pytest.param(
            ["今天天气很好。明", "天见。"],
            [["今天天气很好。"], []],
            "明天见。",
            id="sentence-out-as-soon-as-decided",
        ),
        pytest.param(
            ["今天天气", "很好", "。", "我们", "走吧。"],
            [[], [], [], ["今天天气很好。"], []],
            "我们走吧。",
            id="terminator-in-its-own-delta",
        ),
        pytest.param(
            ["真的吗？", "！", "太好了"],
            [[], [], ["真的吗？！"]],
            "太好了",
            id="terminator-run-split",
        ),
        pytest.param(
            ["Pi is 3.", "14. Next one"],
            [[], ["Pi is 3.14."]],
            "Next one",
            id="decimal-split-after-dot",
        ),
        pytest.param(
            ["It costs 3.", " Next one"],
            [[], ["It costs 3."]],
            "Next one",
            id="dot-then-space-in-next-delta",
        ),
        pytest.param(
            ['He said "Stop!', '"', " Then"],
            [[], [], ['He said "Stop!"']],
            "Then",
            id="closing-quote-in-next-delta",
        ),
        pytest.param(
            ["“明天见！", "”", "“再见！”"],
            [[], [], ["“明天见！”"]],
            "“再见！”",
            id="cjk-closing-quote-in-next-delta",
        ),
        pytest.param(
            ["第一句话。第二句话！第三句话？第四"],
            [["第一句话。", "第二句话！", "第三句话？"]],
            "第四",
            id="several-sentences-in-one-delta",
        ),
        pytest.param(
            ["- 第一项\n- 第", "二项\n", "\n"],
            [["- 第一项"], ["- 第二项"], []],
            "",
            id="lines-across-deltas",
        ),
        pytest.param(["", "  ", "\n", "好的"], [[], [], [], []], "好的", id="empty-deltas"),
    ],
)
def test_streaming(
    deltas: list[str], expected_per_delta: list[list[str]], expected_flush: str
) -> None:
    assert feed_each(deltas) == (expected_per_delta, expected_flush)


def test_flush_resets_for_the_next_answer() -> None:
    chunker = SentenceChunker()
    assert chunker.feed("第一个回答。第二") == ["第一个回答。"]
    assert chunker.flush() == "第二"
    assert chunker.flush() == ""
    assert chunker.feed("新的回答开始了。然后") == ["新的回答开始了。"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "今天北京的天气很好，适合大家出门去散步。最高气温二十五度，记得多喝水哦。",
            ["今天北京的天气很好，", "适合大家出门去散步。", "最高气温二十五度，记得多喝水哦。"],
            id="first-clause-then-sentences",
        ),
        pytest.param(
            "材料有面粉、鸡蛋、牛奶和白糖。",
            ["材料有面粉、鸡蛋、", "牛奶和白糖。"],
            id="enumeration",
        ),
        pytest.param(
            "今天的天气预报如下：北京晴。", ["今天的天气预报如下：", "北京晴。"], id="cjk-colon"
        ),
        pytest.param(
            "好的，我来帮你查一下。", ["好的，我来帮你查一下。"], id="too-short-to-stand-alone"
        ),
        pytest.param(
            "嗯。今天北京的天气很好，适合出门。",
            ["嗯。今天北京的天气很好，", "适合出门。"],
            id="short-sentence-counts-toward-the-clause",
        ),
        pytest.param(
            "In Beijing today, it is sunny. Enjoy it, and stay cool.",
            ["In Beijing today,", "it is sunny.", "Enjoy it, and stay cool."],
            id="english",
        ),
        pytest.param(
            "About 21,000,000 people, roughly.",
            ["About 21,000,000 people,", "roughly."],
            id="thousands-separator",
        ),
        pytest.param(
            "Pi is about 3.14159, as you know.",
            ["Pi is about 3.14159,", "as you know."],
            id="decimal",
        ),
        pytest.param(
            "We meet at 10:30 tomorrow: see you.",
            ["We meet at 10:30 tomorrow:", "see you."],
            id="clock-time",
        ),
        pytest.param(
            "他说：“今天的天气很好，我们出去玩吧。”然后走了。",
            ["他说：“今天的天气很好，我们出去玩吧。”然后走了。"],
            id="not-inside-a-quotation",
        ),
        pytest.param(
            "注意（这一步非常重要，千万别忘），然后保存文件。",
            ["注意（这一步非常重要，千万别忘），", "然后保存文件。"],
            id="not-inside-brackets",
        ),
        pytest.param(
            "“这个问题问得很好，”他笑着说，“我们一起想想。”",
            ["“这个问题问得很好，”他笑着说，", "“我们一起想想。”"],
            id="quotation-inside-the-clause",
        ),
        pytest.param(
            '"Well, that is a good one," she said, "let us see."',
            ['"Well, that is a good one,"', 'she said, "let us see."'],
            id="english-quotation",
        ),
        pytest.param(
            "## 天气预报\n今天北京的天气很好，适合出门。",
            ["## 天气预报", "今天北京的天气很好，适合出门。"],
            id="first-line-is-the-first-chunk",
        ),
    ],
)
def test_first_chunk_ends_at_a_clause_break(text: str, expected: list[str]) -> None:
    assert chunk_all([text]) == expected


def test_clause_goes_out_when_the_next_character_comes() -> None:
    clause = "今天北京的天气很好，"
    per_delta, rest = feed_each([*clause, "适", "合出门。"])
    assert per_delta == [[]] * len(clause) + [[clause], []]
    assert rest == "适合出门。"


def test_english_clause_waits_for_the_space() -> None:
    assert feed_each(["In Beijing today,", " it", " is sunny."]) == (
        [[], ["In Beijing today,"], []],
        "it is sunny.",
    )


def test_every_answer_gets_an_early_first_clause() -> None:
    chunker = SentenceChunker()
    assert chunker.feed("今天北京的天气很好，适合出门，") == ["今天北京的天气很好，"]
    assert chunker.feed("也适合跑步，对吧") == []
    assert chunker.flush() == "适合出门，也适合跑步，对吧"
    assert chunker.feed("明天上海会下大雨，记得带伞。") == ["明天上海会下大雨，"]


def test_first_clause_chars_is_configurable() -> None:
    text = "今天北京的天气很好，适合出门。"
    assert chunk_all([text], first_clause_chars=0) == [text]
    assert chunk_all([text], first_clause_chars=11) == [text]
    assert chunk_all([text], first_clause_chars=10) == ["今天北京的天气很好，", "适合出门。"]
    # Never shorter than a sentence may be.
    assert chunk_all(["北京晴，适合出门。"], first_clause_chars=1, min_chars=5) == [
        "北京晴，适合出门。"
    ]
    assert DEFAULT_FIRST_CLAUSE_CHARS > 4  # "好的，" and "Well," stay with what follows


@pytest.mark.parametrize(
    ("min_chars", "max_chars"), [(-1, 10), (11, 10), (0, 0)], ids=["negative", "min>max", "max0"]
)
def test_rejects_bad_limits(min_chars: int, max_chars: int) -> None:
    with pytest.raises(ValueError, match="_chars"):
        SentenceChunker(min_chars=min_chars, max_chars=max_chars)


def test_rejects_a_negative_first_clause() -> None:
    with pytest.raises(ValueError, match="first_clause_chars"):
        SentenceChunker(first_clause_chars=-1)


# Properties over text built from the characters that drive decisions.
_ALPHABET = list("天气很好我们ab Z19。！？；…….!?;“（(”’」』）)]\"'，、：:,\n \t")
_texts = st.text(alphabet=st.sampled_from(_ALPHABET), max_size=300)
_limits = st.integers(1, 40).flatmap(
    lambda max_chars: st.tuples(st.integers(0, min(8, max_chars)), st.just(max_chars))
)
_clauses = st.integers(0, 12)
_RUN_CHARS = "。！？；…｡.!?;”’」』）)]\"'》】"


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(cut % (len(text) + 1) for cut in cuts)})
    return [text[start:end] for start, end in itertools.pairwise(points)]


def _assert_lossless(text: str, chunks: list[str]) -> None:
    """The chunks appear in order in text, separated only by whitespace."""
    pos = 0
    for chunk in chunks:
        while text[pos].isspace():
            pos += 1
        assert text.startswith(chunk, pos), (chunk, text[pos:])
        pos += len(chunk)
    assert not text[pos:].strip()


@settings(max_examples=300, deadline=None)
@given(
    text=_texts,
    cuts=st.lists(st.integers(0, 400), max_size=30),
    limits=_limits,
    clause=_clauses,
)
def test_any_delta_split_gives_the_same_chunks(
    text: str, cuts: list[int], limits: tuple[int, int], clause: int
) -> None:
    min_chars, max_chars = limits
    kwargs = {"min_chars": min_chars, "max_chars": max_chars, "first_clause_chars": clause}
    whole = chunk_all([text], **kwargs)
    assert chunk_all(_split(text, cuts), **kwargs) == whole
    assert chunk_all(list(text), **kwargs) == whole


@settings(max_examples=300, deadline=None)
@given(text=_texts, limits=_limits, clause=_clauses)
def test_no_character_lost_or_duplicated(text: str, limits: tuple[int, int], clause: int) -> None:
    min_chars, max_chars = limits
    chunks = chunk_all(
        list(text), min_chars=min_chars, max_chars=max_chars, first_clause_chars=clause
    )
    _assert_lossless(text, chunks)
    for chunk in chunks:
        assert chunk
        assert chunk == chunk.strip()
        assert "\n" not in chunk
        assert len(chunk.rstrip(_RUN_CHARS)) <= max_chars
        assert len(chunk) <= max_chars + MAX_TRAILING_PUNCTUATION


@settings(max_examples=200, deadline=None)
@given(text=_texts.map(lambda text: re.sub(r"\s+", " ", text)), limits=_limits)
def test_chunks_within_a_line_respect_min_chars(text: str, limits: tuple[int, int]) -> None:
    min_chars, max_chars = limits
    chunker = SentenceChunker(min_chars=min_chars, max_chars=max(max_chars, min_chars + 1))
    for chunk in chunker.feed(text):
        assert len(chunk) >= min_chars


@settings(max_examples=300, deadline=None)
@given(text=_texts, limits=_limits, clause=_clauses.filter(bool))
def test_only_the_first_chunk_ends_early(text: str, limits: tuple[int, int], clause: int) -> None:
    min_chars, max_chars = limits
    kwargs = {"min_chars": min_chars, "max_chars": max_chars}
    chunks = chunk_all([text], first_clause_chars=clause, **kwargs)
    sentences = chunk_all([text], first_clause_chars=0, **kwargs)
    if chunks == sentences:
        return
    first = chunks[0]
    assert first.rstrip(_RUN_CHARS)[-1] in "，、：:,"
    if len(chunks) > 1:
        assert len(first) >= max(clause, min_chars)
    # else the answer ended while a closing quote could still have followed the break.
    rest = text.lstrip()[len(first) :]
    # After the first chunk, it is cut exactly as sentences alone would be.
    assert chunks[1:] == chunk_all([rest], first_clause_chars=0, **kwargs)
