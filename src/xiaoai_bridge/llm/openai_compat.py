"""Backend for any OpenAI-compatible chat-completions API, streamed over aiohttp.

Not the official SDK: on the bridge's hot path it cost 85% of the service's CPU (its request
transforms and per-chunk models), capping a two-core box below 300 questions/s. What we use of
the API is small and stable: one POST, server-sent events, OpenAI's error bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import aiohttp

from xiaoai_bridge import __version__
from xiaoai_bridge.errors import LLMError, LLMNotConfiguredError
from xiaoai_bridge.jsonwire import parse_json
from xiaoai_bridge.llm.base import (
    ChatMessage,
    Message,
    RoundEvent,
    ToolCall,
    ToolCalls,
    ToolResult,
    ToolSpec,
)

if TYPE_CHECKING:
    from xiaoai_bridge.config import LLMSettings

_LOGGER = logging.getLogger(__name__)

# Statuses worth retrying, as OpenAI documents them: timeouts, conflicts, rate limits, 5xx.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
# A longer Retry-After than this is not worth keeping a speaker waiting for.
MAX_RETRY_AFTER_S = 20.0
_DATA_PREFIX = b"data:"
_DONE = b"[DONE]"
# Words in a 400's error that mean "this model or server does not do function calling".
_TOOLS_WORDS = ("tool", "function")


class OpenAICompatBackend:
    """Streams chat completions; provider errors become LLMError reasons at this edge."""

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._configured = bool(key) or not settings.needs_key
        self._headers = {"User-Agent": f"xiaoai-bridge/{__version__}"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()  # noqa: S311  # retry jitter, not cryptography

    @property
    def configured(self) -> bool:
        """False when the provider needs a key and none was given."""
        return self._configured

    @overload
    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]: ...

    @overload
    def stream(
        self, messages: Sequence[Message], *, tools: Sequence[ToolSpec]
    ) -> AsyncIterator[RoundEvent]: ...

    async def stream(
        self, messages: Sequence[Message], *, tools: Sequence[ToolSpec] | None = None
    ) -> AsyncIterator[RoundEvent]:
        """Yield content deltas of one streamed completion; with `tools`, then its tool calls."""
        if not self._configured:
            raise LLMNotConfiguredError
        body: dict[str, Any] = {
            "model": self._settings.model,
            "messages": [_wire_message(m) for m in messages],
            "stream": True,
        }
        if tools:
            body["tools"] = [_wire_tool(t) for t in tools]
            body["tool_choice"] = "auto"
        if self._settings.temperature is not None:
            body["temperature"] = self._settings.temperature
        if self._settings.max_tokens is not None:
            body["max_tokens"] = self._settings.max_tokens
        # `timeout_s` bounds the wait for the first words (or, in a tool round without words,
        # for the finished calls), every attempt and backoff included: the speaker apologises
        # in time even if each retry would have hung again.
        deadline = asyncio.get_running_loop().time() + self._settings.timeout_s
        async with (
            self._post("/chat/completions", body, deadline) as response,
            contextlib.aclosing(_events(response, with_tools=bool(tools))) as events,
        ):
            try:
                async with asyncio.timeout_at(deadline):
                    first = await anext(events, None)
            except TimeoutError as err:
                raise _timeout_error() from err
            if first is None:
                raise LLMError("empty", "the LLM returned no content")
            yield first
            # From here each read has its own `timeout_s` (the session's sock_read).
            async for event in events:
                yield event

    async def check(self) -> str:
        """List the provider's models; say whether the configured one is among them."""
        if not self._configured:
            raise LLMNotConfiguredError
        try:
            async with self._get("/models") as response:
                if response.status >= 400:
                    raise await _status_error(response)
                listing = parse_json(await response.read())
        except LLMError as err:
            if err.reason != "not_found":
                raise
            # Some compatible servers have no /models; a short completion proves access.
            async for _ in self.stream([ChatMessage("user", "ping")]):
                break
            return f"{self._settings.base_url} answers with model {self._settings.model}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise _connection_error(err) from err
        data = listing.get("data") if isinstance(listing, dict) else None
        names = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if names and self._settings.model not in names:
            offered = ", ".join(str(n) for n in names[:8])
            raise LLMError(
                "unknown_model",
                f"model {self._settings.model!r} is not offered by {self._settings.base_url} "
                f"(it has: {offered})",
            )
        return f"{self._settings.base_url} reachable, model {self._settings.model} available"

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=self._settings.timeout_s,
                # Per read: catches a provider that hangs before or in the middle of a stream.
                sock_read=self._settings.timeout_s,
            )
            # The pipeline bounds concurrency; the connector must not add a hidden queue.
            self._session = aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
            )
        return self._session

    @contextlib.asynccontextmanager
    async def _get(self, path: str) -> AsyncIterator[aiohttp.ClientResponse]:
        async with self._client().get(
            self._settings.base_url + path, headers=self._headers
        ) as response:
            yield response

    @contextlib.asynccontextmanager
    async def _post(
        self, path: str, body: dict[str, Any], deadline: float
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        response = await self._post_with_retries(path, body, deadline)
        try:
            yield response
        finally:
            response.release()

    async def _post_with_retries(
        self, path: str, body: dict[str, Any], deadline: float
    ) -> aiohttp.ClientResponse:
        """POST; retry fast failures and retryable statuses while the deadline allows."""
        url = self._settings.base_url + path
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                async with asyncio.timeout_at(deadline):
                    response = await self._client().post(url, json=body, headers=self._headers)
            except (aiohttp.ClientError, TimeoutError) as err:
                error = _connection_error(err)
            else:
                if response.status < 400:
                    return response
                retry_after = _retry_after(response)
                try:
                    error = await _status_error(response, sent_tools="tools" in body)
                finally:
                    response.release()
                if response.status not in RETRYABLE_STATUSES:
                    raise error
            delay = retry_delay(
                error.reason,
                attempt,
                max_retries=self._settings.max_retries,
                retry_after=retry_after,
                remaining_s=deadline - loop.time(),
                jitter=self._rng.random(),
            )
            if delay is None:
                raise error
            _LOGGER.info(
                "LLM call failed (%s), retry %d in %.1f s", error.reason, attempt + 1, delay
            )
            attempt += 1
            await asyncio.sleep(delay)


def retry_delay(
    reason: str,
    attempt: int,
    *,
    max_retries: int,
    retry_after: float | None,
    remaining_s: float,
    jitter: float,
) -> float | None:
    """Seconds to wait before retry `attempt` + 1, or None when the failure is final.

    `jitter` in [0, 1] shortens the backoff by up to a quarter; `remaining_s` is what is left
    of the budget for the first words: a wait that ends past it cannot help.
    """
    # A timeout is not retried: it spent the whole budget (a retry would only hang again).
    if reason == "timeout" or attempt >= max_retries:
        return None
    if retry_after is not None:
        delay = retry_after
    else:
        ceiling = min(MAX_RETRY_DELAY_S, INITIAL_RETRY_DELAY_S * 2.0**attempt)
        delay = ceiling * (0.75 + jitter / 4)
    if delay > MAX_RETRY_AFTER_S or delay >= remaining_s:
        return None
    return delay


def _wire_message(message: Message) -> dict[str, Any]:
    """A message in the chat-completions request shape."""
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": message.content}
    if isinstance(message, ToolResult):
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    return {
        "role": "assistant",
        "content": message.content,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.calls
        ],
    }


def _wire_tool(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": dict(tool.parameters),
        },
    }


@dataclass
class _PartialCall:
    """One tool call being assembled from its deltas."""

    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


class _ToolCallAssembler:
    """Joins `delta.tool_calls[]` fragments per `index` into whole calls."""

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}

    def feed(self, fragments: object) -> None:
        """Take one delta's `tool_calls` value; LLMError("malformed") on a shape we cannot use."""
        if fragments is None:
            return
        if not isinstance(fragments, list):
            raise _malformed("tool_calls is not a list")
        for fragment in fragments:
            if not isinstance(fragment, dict):
                raise _malformed("a tool call delta is not an object")
            index = fragment.get("index")
            # bool is an int to Python, never to the wire format.
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise _malformed("a tool call delta has no valid index")
            call = self._calls.setdefault(index, _PartialCall())
            call.id = _same_or_first(call.id, fragment.get("id"), "id")
            kind = fragment.get("type")
            if kind is not None and kind != "function":
                raise _malformed(f"tool call of unknown type {kind!r}")
            function = fragment.get("function")
            if function is None:
                continue
            if not isinstance(function, dict):
                raise _malformed("tool call function is not an object")
            call.name = _same_or_first(call.name, function.get("name"), "name")
            arguments = function.get("arguments")
            if arguments is None:
                continue
            if not isinstance(arguments, str):
                raise _malformed("tool call arguments are not a string")
            call.arguments.append(arguments)

    def finish(self) -> ToolCalls | None:
        """The whole calls in index order, or None when the round asked for none."""
        if not self._calls:
            return None
        calls: list[ToolCall] = []
        for index in sorted(self._calls):
            partial = self._calls[index]
            if not partial.id or not partial.name:
                raise _malformed(f"tool call {index} came without an id or a name")
            calls.append(ToolCall(partial.id, partial.name, "".join(partial.arguments)))
        self._calls.clear()
        return ToolCalls(tuple(calls))


def _same_or_first(known: str | None, value: object, what: str) -> str | None:
    """Keep the first `what` of a call; providers that repeat it must repeat it unchanged."""
    if value is None or value == "":
        return known
    if not isinstance(value, str):
        raise _malformed(f"tool call {what} is not a string")
    if known is not None and value != known:
        raise _malformed(f"tool call {what} changed mid-call")
    return value


def _malformed(detail: str) -> LLMError:
    return LLMError("malformed", f"unusable stream frame from the LLM: {detail}")


async def _events(
    response: aiohttp.ClientResponse, *, with_tools: bool
) -> AsyncGenerator[RoundEvent, None]:
    """Content deltas from an SSE body of chat.completion.chunk objects, then any tool calls.

    Tool calls are handed over only whole, at the round's end: their arguments are JSON that
    is useless until its last fragment.
    """
    assembler = _ToolCallAssembler() if with_tools else None
    try:
        async for raw in response.content:
            line = raw.strip()
            # Blank lines end events, ":" lines are keep-alive comments; both carry nothing.
            if not line.startswith(_DATA_PREFIX):
                continue
            data = line[len(_DATA_PREFIX) :].strip()
            if data == _DONE:
                break
            choice = _choice_of(data)
            if choice is None:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    yield content
                if assembler is not None:
                    assembler.feed(delta.get("tool_calls"))
            # Some providers end a tool round with "stop" rather than "tool_calls": any finish
            # ends the round, and usage chunks may still follow.
            if assembler is not None and choice.get("finish_reason") is not None:
                calls = assembler.finish()
                if calls is not None:
                    yield calls
    except (aiohttp.ClientError, TimeoutError) as err:
        raise _connection_error(err, mid_stream=True) from err
    if assembler is not None:
        calls = assembler.finish()  # a stream that ended without a finish_reason
        if calls is not None:
            yield calls


def _choice_of(data: bytes) -> dict[str, Any] | None:
    """The first choice of one stream frame, or None for frames without one."""
    try:
        chunk = parse_json(data)
    except ValueError as err:
        raise LLMError("malformed", f"unreadable stream frame from the LLM: {err}") from err
    if not isinstance(chunk, dict):
        raise LLMError("malformed", "stream frame is not a JSON object")
    if "error" in chunk:  # some providers report failures inside the stream
        raise LLMError("server_error", f"the LLM failed mid-answer: {_message(chunk)}")
    choices = chunk.get("choices")
    # Keep-alive and usage chunks come with no choices.
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    return choices[0]


async def _status_error(response: aiohttp.ClientResponse, *, sent_tools: bool = False) -> LLMError:
    """The LLMError an HTTP error response stands for."""
    status = response.status
    try:
        text = await response.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        text = ""
    try:
        parsed = parse_json(text)
    except ValueError:
        parsed = None
        message = text[:200] or response.reason or ""
    else:
        message = _message(parsed)
    if status in (401, 403):
        return LLMError("auth", f"the LLM rejected the API key ({status}): {message}")
    if status == 429:
        return LLMError("rate_limited", f"the LLM is rate limiting us: {message}")
    if status == 404:
        return LLMError("not_found", f"model or URL not found: {message}")
    if status >= 500:
        return LLMError("server_error", f"the LLM failed ({status}): {message}")
    if sent_tools and status == 400 and _names_tools(parsed, message):
        return LLMError("tools_unsupported", f"the LLM does not take tools ({status}): {message}")
    return LLMError("bad_request", f"the LLM refused the request ({status}): {message}")


def _names_tools(body: object, message: str) -> bool:
    """Whether a 400 blames the request's tools rather than, say, its messages."""
    param = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        value = body["error"].get("param")
        param = value if isinstance(value, str) else None
    if param is not None and param.startswith("messages"):
        return False  # our tool/assistant messages are at fault, not the offer of tools
    texts = (message, param or "")
    return any(word in text.lower() for text in texts for word in _TOOLS_WORDS)


def _message(body: object) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return str(body)[:200]


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date; our own backoff is good enough


def _timeout_error() -> LLMError:
    return LLMError("timeout", "the LLM did not answer in time")


def _connection_error(err: BaseException, *, mid_stream: bool = False) -> LLMError:
    if isinstance(err, TimeoutError | aiohttp.ServerTimeoutError):
        return _timeout_error()
    where = "while answering" if mid_stream else "before answering"
    return LLMError("connection", f"lost the LLM connection {where}: {err}")
