"""Reading Xiaomi's answers: bytes to text, text to JSON, fields whose type is not trusted."""

from __future__ import annotations

from typing import Any, overload

import aiohttp

from xiaoai_bridge.clients.xiaomi.errors import XiaomiApiError
from xiaoai_bridge.jsonwire import parse_json

# Far above any real answer (a MIoT device list of a few hundred devices is well under 1 MiB);
# a runaway or hostile body past it is refused instead of filling the memory.
MAX_ANSWER_BYTES = 8 * 1024 * 1024


async def read_answer(resp: aiohttp.ClientResponse, service: str) -> bytes:
    """The response body, at most MAX_ANSWER_BYTES; a body cut short raises aiohttp's error."""
    if resp.content_length is not None and resp.content_length > MAX_ANSWER_BYTES:
        raise XiaomiApiError(service, "bad_response", "answer is too large")
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise XiaomiApiError(service, "bad_response", "answer is too large")
    return bytes(body)


def answer_text(service: str, body: bytes) -> str:
    """A response body as text: Xiaomi answers in UTF-8, so other bytes are not its format."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise XiaomiApiError(service, "bad_response", "answer is not UTF-8") from err


def answer_json(service: str, text: str, what: str = "answer") -> Any:
    """Parse JSON from the cloud; anything unreadable (even nested 100,000 deep) is an API error."""
    try:
        return parse_json(text)
    except ValueError as err:
        raise XiaomiApiError(service, "bad_response", f"{what} is not JSON") from err


def text_field(value: object) -> str:
    """A field meant to be text; numbers are spelled out, anything else is "".

    Never `str()` of a list or object: the repr of a value nested a few hundred deep raises
    RecursionError, and such values parse fine.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


@overload
def int_field(value: object) -> int | None: ...
@overload
def int_field(value: object, default: int) -> int: ...
def int_field(value: object, default: int | None = None) -> int | None:
    """A field meant to be an integer (not a bool), else `default`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return default
