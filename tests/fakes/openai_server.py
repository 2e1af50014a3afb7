"""Loopback fake of the OpenAI chat-completions API, speaking its exact wire format."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

from aiohttp import web

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
DEFAULT_API_KEY = "test-key"
DEFAULT_MODEL = "fake-model"
DEFAULT_CHARS_PER_TOKEN = 2
DEFAULT_RETRY_AFTER = 1.0
DEFAULT_FAULT_AFTER_TOKENS = 2
# The benchmark runs for minutes at hundreds of requests a second; keep memory flat.
DEFAULT_RECORD_LIMIT = 10_000
# Deeper than Python's recursion limit: json.loads raises RecursionError on it.
DEEP_NESTING = 100_000
_SYSTEM_FINGERPRINT = "fp_fake0001"
_OWNED_BY = "fake-openai"

Messages = list[dict[str, Any]]
AnswerSource = str | Callable[[Messages], str]
TOOLS_UNSUPPORTED_MESSAGE = "Unsupported parameter: 'tools' is not supported with this model."


TOOL_GAPS_PATH = "/_bench/tool-gaps"


class Fault(StrEnum):
    """Ways the fake can misbehave; mid-stream faults fire after ``after_tokens`` tokens."""

    SERVER_ERROR = "500"  # OpenAI's server_error body
    RATE_LIMIT = "429"  # rate_limit_exceeded body plus Retry-After
    HANG = "hang"  # no response at all until the client gives up
    HANG_MID_STREAM = "hang_mid_stream"  # some tokens, then silence (non-stream: like HANG)
    MALFORMED_FRAME = "malformed"  # one cut-off JSON frame, then the rest (non-stream: cut body)
    EMPTY_CHOICES = "empty_choices"  # ``choices: []`` in the body or in every chunk
    DROP_MID_STREAM = "drop"  # some tokens, then the TCP connection is aborted
    DEEP_FRAME = "deep_frame"  # one frame of JSON nested too deep to parse (non-stream: the body)
    DEEP_ERROR = "deep_error"  # a 500 whose body is JSON nested too deep to parse


@dataclass(frozen=True)
class ScriptedCall:
    """One tool call a scripted round asks for; `arguments` arrive in `pieces` fragments."""

    id: str
    name: str
    arguments: str
    pieces: int = 1


@dataclass(frozen=True)
class ToolRound:
    """An answer that asks for tool calls, streamed as OpenAI's `delta.tool_calls[]`.

    ``text`` is streamed as content before the calls; ``interleave`` alternates the deltas of
    different calls; ``whole`` sends each call in one delta, as some compatible servers do.
    """

    calls: tuple[ScriptedCall, ...]
    text: str = ""
    interleave: bool = False
    whole: bool = False
    finish_reason: str = "tool_calls"


@dataclass(frozen=True)
class RawRound:
    """Stream-only: these ``delta`` objects verbatim, one per chunk, to test broken shapes."""

    deltas: tuple[Any, ...]
    finish_reason: str | None = "tool_calls"


# A scripted answer: plain text, a tool round, or raw deltas.
Round = str | ToolRound | RawRound


def split_evenly(text: str, pieces: int) -> list[str]:
    """Cut ``text`` into at most ``pieces`` non-empty consecutive parts ([""] for no text)."""
    if not text:
        return [""]
    pieces = max(1, min(pieces, len(text)))
    base, extra = divmod(len(text), pieces)
    parts: list[str] = []
    start = 0
    for index in range(pieces):
        end = start + base + (1 if index < extra else 0)
        parts.append(text[start:end])
        start = end
    return parts


def tool_call_deltas(round_: ToolRound) -> list[dict[str, Any]]:
    """The ``delta`` objects carrying a round's calls, in the order they go on the wire."""
    per_call: list[list[dict[str, Any]]] = []
    for index, call in enumerate(round_.calls):
        head: dict[str, Any] = {"index": index, "id": call.id, "type": "function"}
        if round_.whole:
            head["function"] = {"name": call.name, "arguments": call.arguments}
            per_call.append([{"tool_calls": [head]}])
            continue
        # Only the first delta of a call carries its id, type and name.
        head["function"] = {"name": call.name, "arguments": ""}
        fragments = [
            {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            for piece in split_evenly(call.arguments, call.pieces)
            if piece
        ]
        per_call.append([{"tool_calls": [head]}, *fragments])
    if round_.interleave:
        ordered = [d for group in itertools.zip_longest(*per_call) for d in group if d is not None]
    else:
        ordered = [d for deltas in per_call for d in deltas]
    if ordered and not round_.text:
        # With no content first, the first delta also opens the assistant message.
        ordered[0] = {"role": "assistant", "content": None, **ordered[0]}
    return ordered


def tool_message_error(messages: Messages) -> tuple[str, str] | None:
    """OpenAI's 400 (message, param) for tool messages that do not answer the calls before."""
    if not isinstance(messages, list):
        return None
    pending: list[object] = []  # ids of the last assistant tool calls not yet answered
    opener = -1
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            call_id = message.get("tool_call_id")
            if opener < 0 or call_id not in pending:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{position}].role",
                )
            pending.remove(call_id)
            continue
        if pending:
            break
        opener = -1
        calls = message.get("tool_calls") if role == "assistant" else None
        if isinstance(calls, list) and calls:
            pending = [c.get("id") for c in calls if isinstance(c, dict)]
            opener = position
    if pending:
        return (
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(str(i) for i in pending)}",
            f"messages.[{opener}].role",
        )
    return None


def _whole_calls(round_: ToolRound) -> list[dict[str, Any]]:
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in round_.calls
    ]


@dataclass(frozen=True)
class FaultSpec:
    """A fault plus its knobs; ``None`` knobs fall back to the server's current defaults."""

    fault: Fault
    retry_after: float | None = None
    after_tokens: int | None = None


@dataclass
class RecordedRequest:
    """One request as the fake saw it (the Authorization value is redacted)."""

    received_at: float
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    auth_ok: bool
    fault: Fault | None = None
    status: int | None = None
    answer: str | None = None
    tokens: list[str] = field(default_factory=list)
    round: Round | None = None

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The ``tools`` array the client offered (empty when absent)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("tools"), list):
            return list(self.body["tools"])
        return []

    @property
    def tool_messages(self) -> Messages:
        """The ``role: "tool"`` result messages of the request."""
        return [m for m in self.messages if isinstance(m, dict) and m.get("role") == "tool"]

    @property
    def messages(self) -> Messages:
        """The ``messages`` array of a chat request (empty when absent)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("messages"), list):
            return list(self.body["messages"])
        return []

    @property
    def stream(self) -> bool:
        """Whether the client asked for a streamed answer."""
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def model(self) -> str | None:
        """The model the client asked for."""
        if isinstance(self.body, dict) and isinstance(self.body.get("model"), str):
            return str(self.body["model"])
        return None

    @property
    def last_user_message(self) -> str:
        """Text of the last ``user`` message (empty when there is none)."""
        return last_user_text(self.messages)


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Text of the last user message, joining the text parts of multi-part content."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        return ""
    return ""


def default_answer(messages: Messages) -> str:
    """Deterministic two-sentence answer echoing the last user message."""
    return f"你问的是：{last_user_text(messages)}。这是第二句话。"


def split_tokens(
    text: str, *, tokens: int | None = None, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN
) -> list[str]:
    """Cut ``text`` into stream tokens.

    With ``tokens`` set, the result has exactly that many non-empty pieces whose concatenation
    is ``text`` repeated as often as needed to have at least one character per token.
    """
    if tokens is None:
        if chars_per_token < 1:
            raise ValueError("chars_per_token must be >= 1")
        return [text[i : i + chars_per_token] for i in range(0, len(text), chars_per_token)]
    if tokens < 1:
        raise ValueError("tokens must be >= 1")
    if not text:
        raise ValueError("cannot split an empty answer into tokens")
    full = text * -(-tokens // len(text)) if len(text) < tokens else text
    base, extra = divmod(len(full), tokens)
    pieces: list[str] = []
    start = 0
    for index in range(tokens):
        end = start + base + (1 if index < extra else 0)
        pieces.append(full[start:end])
        start = end
    return pieces


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> str:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class FakeOpenAI:
    """OpenAI-compatible chat server on 127.0.0.1 with settable timing, answers and faults.

    ``first_token_delay`` passes before the response headers, as with the real API;
    ``token_delay`` passes between tokens (for a non-stream answer, once per token in total).
    Every attribute set in the constructor may be changed between requests.

    Usage::

        async with FakeOpenAI(api_key="test-key") as llm:
            client = AsyncOpenAI(base_url=llm.base_url, api_key="test-key")
            llm.fail_next(Fault.RATE_LIMIT, times=2, retry_after=0)
    """

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        model: str = DEFAULT_MODEL,
        models: Sequence[str] | None = None,
        answer: AnswerSource | None = None,
        tokens: int | None = None,
        chars_per_token: int = DEFAULT_CHARS_PER_TOKEN,
        first_token_delay: float = 0.0,
        token_delay: float = 0.0,
        retry_after: float = DEFAULT_RETRY_AFTER,
        fault_after_tokens: int = DEFAULT_FAULT_AFTER_TOKENS,
        record_limit: int | None = DEFAULT_RECORD_LIMIT,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.model = model
        self.models: list[str] = list(models) if models is not None else [model]
        self.answer: AnswerSource | None = answer
        self.tokens = tokens
        self.chars_per_token = chars_per_token
        self.first_token_delay = first_token_delay
        self.token_delay = token_delay
        self.retry_after = retry_after
        self.fault_after_tokens = fault_after_tokens
        self.fault: FaultSpec | None = None
        self.fault_counts: Counter[Fault] = Counter()
        # A model without function calling: any request offering `tools` gets OpenAI's 400.
        self.reject_tools = False
        self.rounds: deque[Round] = deque()
        # Benchmark mode: answer a question offering the tool named `call_tool` with a call of
        # it, and the request carrying its result (after `after_tools_delay`) as usual.
        self.call_tool: str | None = None
        self.after_tools_delay = 0.0
        # Seconds from the end of a tool round's response to the arrival of its results: the
        # client's own time per round (plus the tool's), measured on this process's clock.
        self.tool_gaps: list[float] = []
        self._round_ended: dict[str, float] = {}
        self.request_count = 0
        self.all_requests: deque[RecordedRequest] = deque(maxlen=record_limit)
        self._fault_queue: deque[FaultSpec] = deque()
        self._port = port
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to 127.0.0.1 and start serving."""
        if self._runner is not None:
            raise RuntimeError("FakeOpenAI is already running")
        app = web.Application()
        app.router.add_post(CHAT_PATH, self._handle_chat)
        app.router.add_get(MODELS_PATH, self._handle_models)
        # Not OpenAI's: the benchmark reads the tool-round gaps of the fake in its own process.
        app.router.add_get(TOOL_GAPS_PATH, self._handle_tool_gaps)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        # Cancelling handlers when the client disconnects lets "hang" faults end with the client.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, HOST, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._closing.clear()
        self._runner = runner

    async def close(self) -> None:
        """Release hanging handlers and stop serving."""
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound TCP port (valid after start)."""
        return self._port

    @property
    def base_url(self) -> str:
        """Value for the SDK's ``base_url``, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{HOST}:{self._port}/v1"

    # -- behaviour controls ------------------------------------------------------------------

    def fail_next(
        self,
        fault: Fault | str,
        *,
        times: int = 1,
        retry_after: float | None = None,
        after_tokens: int | None = None,
    ) -> None:
        """Queue ``fault`` for the next ``times`` chat requests (before any persistent fault)."""
        spec = FaultSpec(Fault(fault), retry_after, after_tokens)
        self._fault_queue.extend([spec] * times)

    def set_fault(
        self,
        fault: Fault | str | None,
        *,
        retry_after: float | None = None,
        after_tokens: int | None = None,
    ) -> None:
        """Apply ``fault`` to every chat request until cleared with ``set_fault(None)``."""
        self.fault = None if fault is None else FaultSpec(Fault(fault), retry_after, after_tokens)

    def script(self, *rounds: Round) -> None:
        """Answer the next chat requests with these rounds, one each, before the usual answer."""
        self.rounds.extend(rounds)

    def clear_faults(self) -> None:
        """Drop queued and persistent faults."""
        self._fault_queue.clear()
        self.fault = None

    @property
    def pending_faults(self) -> int:
        """How many queued one-shot faults are still waiting for a request."""
        return len(self._fault_queue)

    def reset(self) -> None:
        """Forget recorded requests, counters and faults (timing and answer settings stay)."""
        self.clear_faults()
        self.rounds.clear()
        self.all_requests.clear()
        self.fault_counts.clear()
        self.request_count = 0

    def answer_for(self, messages: Messages) -> str:
        """The full answer text the fake will produce for ``messages`` (before token padding)."""
        if self.answer is None:
            return default_answer(messages)
        if isinstance(self.answer, str):
            return self.answer
        return self.answer(messages)

    def tokens_for(self, messages: Messages) -> list[str]:
        """The exact stream tokens the fake will send for ``messages``."""
        return split_tokens(
            self.answer_for(messages), tokens=self.tokens, chars_per_token=self.chars_per_token
        )

    # -- inspection --------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Recorded chat-completion requests, oldest first."""
        return [r for r in self.all_requests if r.path == CHAT_PATH]

    @property
    def last_request(self) -> RecordedRequest:
        """The most recent chat-completion request."""
        chat = self.requests
        if not chat:
            raise LookupError("no chat-completion request has arrived")
        return chat[-1]

    async def wait_for_requests(self, count: int) -> list[RecordedRequest]:
        """Wait until ``count`` chat requests arrived in total; bound it with asyncio.timeout()."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.request_count >= count)
        return self.requests

    # -- handlers ----------------------------------------------------------------------------

    def _record(self, request: web.Request, body: Any) -> RecordedRequest:
        headers = {name.lower(): value for name, value in request.headers.items()}
        auth = headers.get("authorization")
        if auth is not None:
            headers["authorization"] = "Bearer <redacted>"
        record = RecordedRequest(
            received_at=time.monotonic(),
            method=request.method,
            path=request.path,
            headers=headers,
            body=body,
            auth_ok=auth == f"Bearer {self.api_key}",
        )
        self.all_requests.append(record)
        return record

    async def _note_arrival(self) -> None:
        self.request_count += 1
        async with self._arrived:
            self._arrived.notify_all()

    def _take_fault(self) -> FaultSpec | None:
        if self._fault_queue:
            return self._fault_queue.popleft()
        return self.fault

    def _json_response(
        self,
        record: RecordedRequest,
        status: int,
        text: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        record.status = status
        all_headers = {"x-request-id": f"req_{uuid.uuid4().hex}", **(headers or {})}
        return web.Response(
            status=status, text=text, content_type="application/json", headers=all_headers
        )

    def _unauthorized(self, record: RecordedRequest) -> web.Response:
        message = (
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        return self._json_response(
            record, 401, _error_body(message, "invalid_request_error", "invalid_api_key")
        )

    async def _handle_models(self, request: web.Request) -> web.Response:
        record = self._record(request, None)
        if not record.auth_ok:
            return self._unauthorized(record)
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": _OWNED_BY}
            for name in self.models
        ]
        return self._json_response(record, 200, _dumps({"object": "list", "data": data}))

    async def _handle_tool_gaps(self, request: web.Request) -> web.Response:
        return web.json_response(self.tool_gaps)

    async def _handle_unknown(self, request: web.Request) -> web.Response:
        record = self._record(request, None)
        message = f"Invalid URL ({request.method} {request.path})"
        return self._json_response(record, 404, _error_body(message, "invalid_request_error", None))

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        arrived = time.monotonic()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        record = self._record(request, body)
        await self._note_arrival()
        if not record.auth_ok:
            return self._unauthorized(record)
        if not isinstance(body, dict):
            message = (
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                "but what was sent was not valid JSON."
            )
            return self._json_response(
                record, 400, _error_body(message, "invalid_request_error", None)
            )
        for name in ("model", "messages"):
            if name not in body:
                return self._json_response(
                    record,
                    400,
                    _error_body(
                        f"Missing required parameter: '{name}'.",
                        "invalid_request_error",
                        "missing_required_parameter",
                        name,
                    ),
                )

        misplaced = tool_message_error(body["messages"])
        if misplaced is not None:
            message, param = misplaced
            return self._json_response(
                record, 400, _error_body(message, "invalid_request_error", None, param)
            )
        if self.reject_tools and "tools" in body:
            return self._json_response(
                record,
                400,
                _error_body(
                    TOOLS_UNSUPPORTED_MESSAGE,
                    "invalid_request_error",
                    "unsupported_parameter",
                    "tools",
                ),
            )

        spec = self._take_fault()
        if spec is not None:
            record.fault = spec.fault
            self.fault_counts[spec.fault] += 1
            response = await self._early_fault(request, record, spec)
            if response is not None:
                return response

        messages: Messages = body["messages"]
        results = record.tool_messages
        scripted = self.rounds.popleft() if self.rounds else self._benchmark_round(record, arrived)
        record.round = scripted
        tokens = self._round_tokens(scripted, messages)
        record.tokens = tokens
        record.answer = "".join(tokens)
        delay = self.after_tools_delay if results else self.first_token_delay
        if delay > 0:
            await asyncio.sleep(delay)
        if isinstance(scripted, ToolRound | RawRound):
            return await self._tool_round(request, record, tokens, scripted)
        if record.stream:
            return await self._stream(request, record, tokens, spec)
        return await self._complete(record, tokens, spec)

    def _benchmark_round(self, record: RecordedRequest, arrived: float) -> Round | None:
        """In benchmark mode, a call of `call_tool` if offered; note the gap of results."""
        results = record.tool_messages
        for result in results:
            ended = self._round_ended.pop(str(result.get("tool_call_id")), None)
            if ended is not None:
                self.tool_gaps.append(arrived - ended)
        offered = {str(t.get("function", {}).get("name")) for t in record.tools}
        if self.call_tool not in offered or results:
            return None
        return ToolRound((ScriptedCall(f"call_{next(self._ids)}", str(self.call_tool), "{}"),))

    def _round_tokens(self, scripted: Round | None, messages: Messages) -> list[str]:
        """Content tokens of this answer: the scripted text, or the usual answer."""
        if scripted is None:
            return self.tokens_for(messages)
        text = scripted if isinstance(scripted, str) else ""
        if isinstance(scripted, ToolRound):
            text = scripted.text
        return split_tokens(text, chars_per_token=self.chars_per_token) if text else []

    async def _early_fault(
        self, request: web.Request, record: RecordedRequest, spec: FaultSpec
    ) -> web.StreamResponse | None:
        """Serve faults that happen before any answer bytes; None lets the answer proceed."""
        fault = spec.fault
        if fault is Fault.SERVER_ERROR:
            message = "The server had an error while processing your request. Sorry about that!"
            return self._json_response(record, 500, _error_body(message, "server_error", None))
        if fault is Fault.DEEP_ERROR:
            return self._json_response(record, 500, "[" * DEEP_NESTING + "]" * DEEP_NESTING)
        if fault is Fault.RATE_LIMIT:
            retry_after = self.retry_after if spec.retry_after is None else spec.retry_after
            message = (
                f"Rate limit reached for {record.model} on requests per min (RPM): "
                "Limit 3, Used 3, Requested 1. Please try again in 20s."
            )
            return self._json_response(
                record,
                429,
                _error_body(message, "requests", "rate_limit_exceeded"),
                {"retry-after": f"{retry_after:g}"},
            )
        if fault is Fault.HANG or (fault is Fault.HANG_MID_STREAM and not record.stream):
            await self._hang()
            self._drop(request)
            raise web.HTTPServiceUnavailable  # never reaches the client: the socket is gone
        if fault is Fault.DROP_MID_STREAM and not record.stream:
            self._drop(request)
            raise web.HTTPServiceUnavailable
        return None

    async def _hang(self) -> None:
        # Ends when the client disconnects (handler cancelled) or the fake shuts down.
        await self._closing.wait()

    @staticmethod
    def _drop(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    def _completion_id(self) -> str:
        return f"chatcmpl-fake{next(self._ids):08d}"

    def _usage(self, record: RecordedRequest, tokens: Sequence[str]) -> dict[str, int]:
        prompt = sum(len(str(m.get("content", ""))) for m in record.messages) // 2 + 1
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(tokens),
            "total_tokens": prompt + len(tokens),
        }

    async def _complete(
        self, record: RecordedRequest, tokens: list[str], spec: FaultSpec | None
    ) -> web.Response:
        if self.token_delay > 0:
            await asyncio.sleep(self.token_delay * len(tokens))
        choices: list[dict[str, Any]] = [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(tokens),
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ]
        fault = spec.fault if spec is not None else None
        payload = {
            "id": self._completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": record.model,
            "choices": [] if fault is Fault.EMPTY_CHOICES else choices,
            "usage": self._usage(record, tokens),
            "service_tier": "default",
            "system_fingerprint": _SYSTEM_FINGERPRINT,
        }
        text = _dumps(payload)
        if fault is Fault.MALFORMED_FRAME:
            text = text[: len(text) // 2]
        elif fault is Fault.DEEP_FRAME:
            text = "[" * DEEP_NESTING + "]" * DEEP_NESTING
        return self._json_response(record, 200, text)

    async def _stream(
        self,
        request: web.Request,
        record: RecordedRequest,
        tokens: list[str],
        spec: FaultSpec | None,
    ) -> web.StreamResponse:
        fault = spec.fault if spec is not None else None
        after = self.fault_after_tokens
        if spec is not None and spec.after_tokens is not None:
            after = spec.after_tokens
        include_usage = _wants_usage(record)
        frames = _ChunkFrames(
            self._completion_id(), int(time.time()), str(record.model), include_usage
        )

        response = web.StreamResponse(status=200, headers=_stream_headers())
        record.status = 200
        await response.prepare(request)

        if fault is Fault.EMPTY_CHOICES:
            await response.write(frames.empty_choices() * 2 + frames.done())
            await response.write_eof()
            return response

        if self.token_delay <= 0 and fault is None:
            # Frames produced in the same instant go out in one write: the benchmark needs speed.
            parts = [frames.role(), *(frames.token(t) for t in tokens), frames.finish()]
            if include_usage:
                parts.append(frames.usage(self._usage(record, tokens)))
            parts.append(frames.done())
            body = b"".join(parts)
            await response.write(body)
            await response.write_eof()
            return response

        await response.write(frames.role())
        for index, token in enumerate(tokens):
            if index == after and not await self._mid_stream_fault(
                request, response, frames, fault
            ):
                return response
            if index > 0 and self.token_delay > 0:
                await asyncio.sleep(self.token_delay)
            await response.write(frames.token(token))
        # A fault point past the answer fires right before the final frame.
        if after >= len(tokens) and not await self._mid_stream_fault(
            request, response, frames, fault
        ):
            return response
        await response.write(frames.finish())
        if include_usage:
            await response.write(frames.usage(self._usage(record, tokens)))
        await response.write(frames.done())
        await response.write_eof()
        return response

    async def _tool_round(
        self,
        request: web.Request,
        record: RecordedRequest,
        tokens: list[str],
        round_: ToolRound | RawRound,
    ) -> web.StreamResponse:
        """Serve a scripted tool round (faults other than early ones do not apply)."""
        if not record.stream:
            if isinstance(round_, RawRound):
                message = "the fake streams raw rounds only"
                return self._json_response(record, 500, _error_body(message, "server_error", None))
            whole = self._json_response(record, 200, self._tool_completion(record, tokens, round_))
            self._round_done(round_)
            return whole
        frames = _ChunkFrames(
            self._completion_id(), int(time.time()), str(record.model), _wants_usage(record)
        )
        response = web.StreamResponse(status=200, headers=_stream_headers())
        record.status = 200
        await response.prepare(request)
        parts: list[bytes] = []
        if tokens:
            parts += [frames.role(), *(frames.token(t) for t in tokens)]
        if isinstance(round_, ToolRound):
            deltas: list[Any] = tool_call_deltas(round_)
            finish_reason: str | None = round_.finish_reason
        else:
            deltas, finish_reason = list(round_.deltas), round_.finish_reason
        parts += [frames.delta(d) for d in deltas]
        parts.append(frames.delta({}, finish_reason))
        if frames.include_usage:
            parts.append(frames.usage(self._usage(record, tokens)))
        parts.append(frames.done())
        for index, part in enumerate(parts):
            if index > 0 and self.token_delay > 0:
                await asyncio.sleep(self.token_delay)
            await response.write(part)
        await response.write_eof()
        if isinstance(round_, ToolRound):
            self._round_done(round_)
        return response

    def _round_done(self, round_: ToolRound) -> None:
        ended = time.monotonic()
        self._round_ended.update((call.id, ended) for call in round_.calls)

    def _tool_completion(
        self, record: RecordedRequest, tokens: list[str], round_: ToolRound
    ) -> str:
        message = {
            "role": "assistant",
            "content": "".join(tokens) or None,
            "refusal": None,
            "annotations": [],
            "tool_calls": _whole_calls(round_),
        }
        return _dumps(
            {
                "id": self._completion_id(),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": record.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": round_.finish_reason,
                    }
                ],
                "usage": self._usage(record, tokens),
                "service_tier": "default",
                "system_fingerprint": _SYSTEM_FINGERPRINT,
            }
        )

    async def _mid_stream_fault(
        self,
        request: web.Request,
        response: web.StreamResponse,
        frames: _ChunkFrames,
        fault: Fault | None,
    ) -> bool:
        """Inject a fault between tokens; False means the stream is over."""
        if fault is Fault.MALFORMED_FRAME:
            await response.write(frames.malformed())
        elif fault is Fault.DEEP_FRAME:
            await response.write(b"data: " + b"[" * DEEP_NESTING + b"]" * DEEP_NESTING + b"\n\n")
        elif fault is Fault.HANG_MID_STREAM:
            await self._hang()
            self._drop(request)
            return False
        elif fault is Fault.DROP_MID_STREAM:
            self._drop(request)
            return False
        return True


def _wants_usage(record: RecordedRequest) -> bool:
    options = record.body.get("stream_options") if isinstance(record.body, dict) else None
    return bool(isinstance(options, dict) and options.get("include_usage"))


def _stream_headers() -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "x-request-id": f"req_{uuid.uuid4().hex}",
    }


class _ChunkFrames:
    """Pre-rendered SSE frames of one ``chat.completion.chunk`` stream."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        head = _dumps(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": _SYSTEM_FINGERPRINT,
            }
        )
        # Every chunk shares the envelope; splice choices (and usage) in as text for speed.
        self.include_usage = include_usage
        self._prefix = "data: " + head[:-1] + ',"choices":'
        self._suffix = (',"usage":null}' if include_usage else "}") + "\n\n"
        self._token_head = self._prefix + '[{"index":0,"delta":{"content":'
        self._token_tail = '},"logprobs":null,"finish_reason":null}]' + self._suffix

    def _choice(self, delta: Any, finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return (self._prefix + _dumps([choice]) + self._suffix).encode()

    def delta(self, delta: Any, finish_reason: str | None = None) -> bytes:
        return self._choice(delta, finish_reason)

    def role(self) -> bytes:
        return self._choice({"role": "assistant", "content": "", "refusal": None}, None)

    def token(self, text: str) -> bytes:
        return (self._token_head + _dumps(text) + self._token_tail).encode()

    def finish(self) -> bytes:
        return self._choice({}, "stop")

    def usage(self, usage: Mapping[str, int]) -> bytes:
        return (self._prefix + "[]," + '"usage":' + _dumps(usage) + "}\n\n").encode()

    def empty_choices(self) -> bytes:
        return (self._prefix + "[]" + self._suffix).encode()

    def malformed(self) -> bytes:
        # A frame cut off mid-object, as a broken proxy or buffer bug would emit.
        return (self._token_head + '"","logprobs":\n\n').encode()

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeOpenAI(
        api_key=args.api_key,
        model=args.model,
        tokens=args.tokens,
        answer=args.answer,
        first_token_delay=args.first_token_ms / 1000,
        token_delay=args.token_ms / 1000,
        record_limit=0,
        port=args.port,
    )
    fake.call_tool = args.call_tool
    fake.after_tools_delay = args.after_tools_ms / 1000
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with fake:
        print(f"READY {fake.base_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake as a process until SIGTERM/SIGINT (used by the benchmark)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    parser.add_argument("--first-token-ms", type=float, default=0.0)
    parser.add_argument("--token-ms", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=None, help="exact tokens per answer")
    parser.add_argument("--answer", default=None, help="fixed answer (default: echo question)")
    parser.add_argument(
        "--call-tool", default=None, help="answer a question offering this tool with a call of it"
    )
    parser.add_argument(
        "--after-tools-ms", type=float, default=0.0, help="first-token delay after tool results"
    )
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
