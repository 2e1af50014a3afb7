"""Trigger: the seed's prefix regex and keyword mode."""

from __future__ import annotations

import pytest

from xiaoai_bridge.pipeline.trigger import Trigger

SEED = "(.*机器人)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("小爱机器人今天天气怎么样", "今天天气怎么样"),
        ("今天天气怎么样", "今天天气怎么样"),
        # Greedy like the seed's Go regexp: strips through the last 机器人.
        ("机器人你知道机器人三定律吗", "三定律吗"),
        ("  机器人  ", ""),
    ],
)
def test_all_mode_strips_the_seed_prefix(text: str, expected: str) -> None:
    assert Trigger(strip_regex=SEED, mode="all").apply(text) == expected


def test_keyword_mode_only_answers_messages_with_a_keyword() -> None:
    trigger = Trigger(strip_regex=SEED, mode="keyword", keywords=("机器人", "请问"))
    assert trigger.apply("打开客厅的灯") is None
    assert trigger.apply("请问今天几号") == "请问今天几号"
    assert trigger.apply("小爱机器人讲个笑话") == "讲个笑话"


def test_empty_regex_strips_nothing() -> None:
    assert Trigger(strip_regex="", mode="all").apply(" 机器人你好 ") == "机器人你好"
