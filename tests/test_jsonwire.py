"""Outside JSON: every malformed input is a ValueError, never anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xiaoai_bridge.jsonwire import JsonInputError, parse_json


def test_valid_json_parses() -> None:
    assert parse_json('{"text": "你好", "n": [1, 2]}') == {"text": "你好", "n": [1, 2]}
    assert parse_json(b'["a"]') == ["a"]


@pytest.mark.parametrize(
    "data",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError inside json.loads
        '{"text":' + "[" * 1000 + "]" * 1000 + "}",  # the 2 KB message that stopped the service
        b"\xff\xfe{",
        "",
        "{",
        "1" * 5000,  # beyond Python's digit limit for int()
    ],
)
def test_hostile_json_is_a_value_error(data: str | bytes) -> None:
    with pytest.raises(JsonInputError):
        parse_json(data)


@given(st.one_of(st.binary(max_size=200), st.text(alphabet='[]{}":,0123456789ae ', max_size=200)))
def test_any_input_parses_as_json_does_or_raises_value_error(data: str | bytes) -> None:
    try:
        expected = json.loads(data)
    except (ValueError, RecursionError):
        with pytest.raises(JsonInputError):
            parse_json(data)
    else:
        assert parse_json(data) == expected
