"""Tests for the speech cleaner that turns markdown-flavoured chunks into speakable text."""

from __future__ import annotations

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from xiaoai_bridge.pipeline.chunker import SentenceChunker
from xiaoai_bridge.pipeline.speech import SpeechCleaner, clean_text


def clean_each(chunks: list[str]) -> list[str]:
    """Clean chunks of one answer in order, through one cleaner."""
    cleaner = SpeechCleaner()
    return [cleaner.clean(chunk) for chunk in chunks]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param(
            ["示例代码如下：", "```python", "print('你好。')", "x = 1", "```", "运行即可。"],
            ["示例代码如下：", "", "", "", "", "运行即可。"],
            id="backtick-fence",
        ),
        pytest.param(
            ["Run this:", "~~~bash", "ls -la", "~~~", "Done."],
            ["Run this:", "", "", "", "Done."],
            id="tilde-fence",
        ),
        pytest.param(
            ["````markdown", "```", "内部的代码块", "```", "````", "结束了。"],
            ["", "", "", "", "", "结束了。"],
            id="longer-fence-contains-shorter",
        ),
        pytest.param(
            ["```", "a = 1", "~~~", "仍然是代码", "```", "回到正文。"],
            ["", "", "", "", "", "回到正文。"],
            id="other-fence-char-does-not-close",
        ),
        pytest.param(
            ["  ```js", "  console.log(1)", "  ```", "好了。"],
            ["", "", "", "好了。"],
            id="indented-fence-in-list",
        ),
        pytest.param(
            ["开始。", "```", "这个代码块没有结束", "后面也不读"],
            ["开始。", "", "", ""],
            id="unclosed-fence-mutes-the-rest",
        ),
        pytest.param(
            ["用```print```函数输出。"],
            ["用print函数输出。"],
            id="triple-backticks-inline-is-not-a-fence",
        ),
    ],
)
def test_code_fences_span_chunks(chunks: list[str], expected: list[str]) -> None:
    assert clean_each(chunks) == expected


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        # Headings, lists, quotes.
        pytest.param("## 今日天气", "今日天气", id="heading"),
        pytest.param("### Summary ###", "Summary", id="heading-closing-hashes"),
        pytest.param("##总结", "总结", id="heading-without-space-before-chinese"),
        pytest.param("#1 热门话题", "#1 热门话题", id="hash-number-is-not-heading"),
        pytest.param("- 北京：晴", "北京：晴", id="dash-list"),
        pytest.param("* 上海：小雨", "上海：小雨", id="star-list"),
        pytest.param("+ 广州：多云", "广州：多云", id="plus-list"),
        pytest.param("1. 打开设置。", "打开设置。", id="ordered-list-dot"),
        pytest.param("2) Tap Bluetooth.", "Tap Bluetooth.", id="ordered-list-paren"),
        pytest.param("3.点击确定", "点击确定", id="ordered-list-no-space-before-chinese"),
        pytest.param("   - 嵌套的项目", "嵌套的项目", id="nested-list"),
        pytest.param("- [x] 买牛奶", "买牛奶", id="task-list"),
        pytest.param("> 学而时习之。", "学而时习之。", id="blockquote"),
        pytest.param("> > - 引用里的列表", "引用里的列表", id="nested-quote-with-list"),
        pytest.param("-5℃ 很冷", "-5℃ 很冷", id="negative-number-is-not-a-list"),
        pytest.param("3.14 是圆周率", "3.14 是圆周率", id="decimal-is-not-a-list"),
        # Emphasis.
        pytest.param("这一点**非常重要**。", "这一点非常重要。", id="bold"),
        pytest.param("This is __really__ good.", "This is really good.", id="bold-underscores"),
        pytest.param("*注意*：别忘了带伞。", "注意：别忘了带伞。", id="italic-star"),
        pytest.param("an _italic_ word", "an italic word", id="italic-underscore"),
        pytest.param("***都要***", "都要", id="bold-italic"),
        pytest.param("~~原价~~ 现价 99 元", "原价 现价 99 元", id="strikethrough"),
        pytest.param("变量 snake_case_name 很长", "变量 snake_case_name 很长", id="snake-case"),
        pytest.param("2*3=6，a * b 也行", "2*3=6，a * b 也行", id="literal-stars"),
        pytest.param("大约3~5天到货", "大约3~5天到货", id="single-tilde-range"),
        pytest.param(r"\*不是强调\*", "不是强调", id="escaped-marker"),
        # Inline code.
        pytest.param("运行 `pip install regex` 即可", "运行 pip install regex 即可", id="code"),
        pytest.param("调用 `my_func` 函数", "调用 my_func 函数", id="code-keeps-underscore"),
        pytest.param("用 ``a`b`` 表示", "用 ab 表示", id="double-backtick-code"),
        # Links, images, URLs.
        pytest.param("详见[官方文档](https://docs.python.org/3/)。", "详见官方文档。", id="link"),
        pytest.param('See [the docs](https://a.io "Title").', "See the docs.", id="link-title"),
        pytest.param(
            "[维基](https://zh.wikipedia.org/wiki/A_(B))介绍", "维基介绍", id="link-parens"
        ),
        pytest.param("![示意图](https://x.com/a.png)如上所示", "如上所示", id="image"),
        pytest.param("参考[这篇文章][1]。", "参考这篇文章。", id="reference-link"),
        pytest.param("访问 https://example.com/path?q=1 获取", "访问 获取", id="url"),
        pytest.param("访问https://example.com获取更多", "访问获取更多", id="url-glued-to-cjk"),
        pytest.param("Visit www.example.com.", "Visit.", id="www-url-keeps-full-stop"),
        pytest.param("官网（https://example.com）有说明。", "官网有说明。", id="url-in-brackets"),
        pytest.param("链接：<https://example.com>", "链接：", id="autolink"),
        pytest.param("这是结论[^1]。", "这是结论。", id="footnote"),
        # Tables.
        pytest.param("| 城市 | 天气 | 温度 |", "城市，天气，温度", id="table-row-chinese"),
        pytest.param("| City | Weather |", "City, Weather", id="table-row-english"),
        pytest.param("| **北京** | 晴 |  |", "北京，晴", id="table-row-markup-empty-cell"),
        pytest.param("|---|:---:|---:|", "", id="table-separator"),
        pytest.param("| --- | --- |", "", id="table-separator-spaced"),
        pytest.param("---", "", id="thematic-break"),
        pytest.param("* * *", "", id="thematic-break-stars"),
        # HTML.
        pytest.param("第一行<br>第二行", "第一行 第二行", id="html-break"),
        pytest.param('<span style="x">红色</span>的字', "红色的字", id="html-tags"),
        pytest.param("A &amp; B <!-- note -->", "A & B", id="html-entity-and-comment"),
        pytest.param("如果 a < b 且 c > d", "如果 a < b 且 c > d", id="comparison-kept"),
        # Whitespace and nothing speakable.
        pytest.param("  多余   的\t空格  ", "多余 的 空格", id="collapse-whitespace"),
        pytest.param("**", "", id="only-markers"),
        pytest.param("。", "", id="only-punctuation"),
        pytest.param("", "", id="empty"),
    ],
)
def test_markdown_removed(chunk: str, expected: str) -> None:
    assert SpeechCleaner().clean(chunk) == expected


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        pytest.param("好的😊！今天天气不错。", "好的！今天天气不错。", id="smiley"),
        pytest.param("出发吧🚀", "出发吧", id="trailing-emoji"),
        pytest.param("❤️ 爱你", "爱你", id="variation-selector"),
        pytest.param("🇨🇳 中国队加油！🇯🇵🇺🇸", "中国队加油！", id="flags"),
        pytest.param("🏴󠁧󠁢󠁳󠁣󠁴󠁿 苏格兰", "苏格兰", id="subdivision-flag-tags"),
        pytest.param("👨‍👩‍👧‍👦 一家四口", "一家四口", id="zwj-family"),
        pytest.param("👩🏽‍💻 程序员", "程序员", id="zwj-with-skin-tone"),
        pytest.param("👍🏻 点赞", "点赞", id="skin-tone"),
        pytest.param("1️⃣ 打开设置 2️⃣ 点击蓝牙 #️⃣ *️⃣", "打开设置 点击蓝牙", id="keycaps"),
        pytest.param("- ✅ 已完成", "已完成", id="emoji-after-list-marker"),
        pytest.param("## 🎉 总结", "总结", id="emoji-in-heading"),
        pytest.param("Great job 🎉.", "Great job.", id="no-space-left-before-full-stop"),
        pytest.param("☀️🌧️⛄", "", id="only-emoji"),
        pytest.param(
            "温度25℃，湿度60%，价格¥99，约$15。",
            "温度25℃，湿度60%，价格¥99，约$15。",
            id="symbols-kept",
        ),
        pytest.param(
            "《三体》——刘慈欣著，第1、2部「必读」！",
            "《三体》——刘慈欣著，第1、2部「必读」！",
            id="cjk-punctuation-kept",
        ),
        pytest.param("１２３ＡＢＣ", "１２３ＡＢＣ", id="full-width-kept"),
    ],
)
def test_emoji_removed_text_kept(chunk: str, expected: str) -> None:
    assert SpeechCleaner().clean(chunk) == expected


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param(
            ["<think>", "用户问天气。", "我应该简短回答。", "</think>", "今天晴。"],
            ["", "", "", "", "今天晴。"],
            id="think-block-over-chunks",
        ),
        pytest.param(["<think>想一想</think>答案是42。"], ["答案是42。"], id="think-inline"),
        pytest.param(["前言<think>思考", "还在想</think>结论。"], ["前言", "结论。"], id="split"),
    ],
)
def test_reasoning_is_not_spoken(chunks: list[str], expected: list[str]) -> None:
    assert clean_each(chunks) == expected


def test_a_multi_line_chunk_is_cleaned_line_by_line() -> None:
    chunk = "# 标题\n- 第一项\n```\ncode\n```\n1. 最后一项"
    assert SpeechCleaner().clean(chunk) == "标题 第一项 最后一项"


def test_clean_text_cleans_a_whole_answer() -> None:
    answer = (
        "## 北京明天天气 🌤️\n"
        "\n"
        "| 时段 | 天气 | 温度 |\n"
        "|------|------|------|\n"
        "| 上午 | 晴 | 15℃ |\n"
        "| 下午 | **多云** | 22℃ |\n"
        "\n"
        "**建议：**\n"
        "1. 早晚温差大，记得带*外套*。\n"
        "2. 数据来自[中国天气网](http://www.weather.com.cn)。\n"
        "\n"
        "```json\n"
        '{"city": "北京"}\n'
        "```\n"
        "祝你出行愉快！😊"
    )
    assert clean_text(answer) == (
        "北京明天天气 时段，天气，温度 上午，晴，15℃ 下午，多云，22℃ 建议： "
        "早晚温差大，记得带外套。 数据来自中国天气网。 祝你出行愉快！"
    )


def test_clean_text_uses_a_fresh_cleaner_each_time() -> None:
    assert clean_text("```\nprint(1)") == ""
    assert clean_text("新的回答。") == "新的回答。"


def test_chunker_and_cleaner_together_on_a_streamed_answer() -> None:
    answer = (
        "好的！下面是**Python**读取文件的例子：\n"
        "```python\n"
        "with open('a.txt') as f:\n"
        "    print(f.read())\n"
        "```\n"
        "- 使用 `with` 语句，文件会自动关闭。\n"
        "- 详见 https://docs.python.org 。\n"
        "希望对你有帮助😊"
    )
    chunker = SentenceChunker()
    cleaner = SpeechCleaner()
    spoken: list[str] = []
    for index in range(0, len(answer), 3):  # deltas of three characters, as an LLM streams
        spoken.extend(cleaner.clean(chunk) for chunk in chunker.feed(answer[index : index + 3]))
    spoken.append(cleaner.clean(chunker.flush()))
    assert [text for text in spoken if text] == [
        "好的！下面是Python读取文件的例子：",
        "使用 with 语句，文件会自动关闭。",
        "详见。",
        "希望对你有帮助",
    ]


_EMOJI = regex.compile(r"[\p{Extended_Pictographic}\p{Regional_Indicator}\uFE0F\u200D\u20E3]")
# Opening brackets are left out: an empty pair such as "（）" is (rightly) dropped as leftover.
_PLAIN_ALPHABET = st.sampled_from(
    list("天气很好我们北京一二三０１２345℃%¥，。！？；：、”）《》—… ")
)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=_PLAIN_ALPHABET, max_size=80))
def test_plain_chinese_text_passes_through(text: str) -> None:
    """Every non-space character survives, unless there is nothing speakable at all."""
    expected = "".join(text.split())
    if not regex.search(r"[\p{L}\p{N}]", expected):
        expected = ""
    assert clean_text(text).replace(" ", "") == expected


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_output_is_always_speakable_text(text: str) -> None:
    spoken = clean_text(text)
    assert spoken == spoken.strip()
    assert "  " not in spoken
    assert "\n" not in spoken
    assert not _EMOJI.search(spoken)
