"""Parsing JSON that arrives from outside: any input either parses or raises ValueError."""

from __future__ import annotations

import json
from typing import Any


class JsonInputError(ValueError):
    """The text is not JSON this service can read; the message says why, for the log."""


def parse_json(data: str | bytes | bytearray) -> Any:
    """Parse outside JSON; malformed, undecodable or too deeply nested input is a ValueError.

    `json.loads` raises RecursionError, not ValueError, on deeply nested arrays: a 2 KB message
    could otherwise stop a task that only expects ValueError.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise JsonInputError("JSON nested too deeply") from None
    except UnicodeDecodeError as err:
        raise JsonInputError(f"not valid UTF-8 ({err.reason})") from None
    except ValueError as err:
        raise JsonInputError(f"not valid JSON ({err})") from None
