"""Backend for any OpenAI-compatible chat-completions API, via the official SDK."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import openai

from xiaoai_bridge.errors import LLMError, LLMNotConfiguredError
from xiaoai_bridge.llm.base import ChatMessage

if TYPE_CHECKING:
    from xiaoai_bridge.config import LLMSettings

_LOGGER = logging.getLogger(__name__)

# Local servers (Ollama, vLLM, llama.cpp) ignore the key but the SDK insists on one.
_PLACEHOLDER_KEY = "not-needed"  # not a secret: a placeholder


class OpenAICompatBackend:
    """Streams chat completions; vendor errors become LLMError reasons at this edge."""

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        key = settings.api_key.get_secret_value() if settings.api_key else None
        self._configured = bool(key) or not settings.needs_key
        # The SDK retries 429/5xx/connection errors with backoff and honours Retry-After.
        self._client = openai.AsyncOpenAI(
            api_key=key or _PLACEHOLDER_KEY,
            base_url=settings.base_url,
            timeout=settings.timeout_s,
            max_retries=settings.max_retries,
        )

    @property
    def configured(self) -> bool:
        """False when the provider needs a key and none was given."""
        return self._configured

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """Yield content deltas of one streamed completion."""
        if not self._configured:
            raise LLMNotConfiguredError
        request: dict[str, Any] = {
            "model": self._settings.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
        }
        if self._settings.temperature is not None:
            request["temperature"] = self._settings.temperature
        if self._settings.max_tokens is not None:
            request["max_tokens"] = self._settings.max_tokens
        produced = False
        try:
            stream = await self._client.chat.completions.create(**request)
            async with stream:
                async for chunk in stream:
                    # Some providers send keep-alive or usage chunks with no choices.
                    if not chunk.choices:
                        continue
                    delta = chunk.choices[0].delta.content
                    if delta:
                        produced = True
                        yield delta
        except openai.APIError as err:
            raise _translate(err) from err
        except ValueError as err:  # a frame that is not JSON
            raise LLMError("malformed", f"unreadable response from the LLM: {err}") from err
        if not produced:
            raise LLMError("empty", "the LLM returned no content")

    async def check(self) -> str:
        """List the provider's models; say whether the configured one is among them."""
        if not self._configured:
            raise LLMNotConfiguredError
        try:
            page = await self._client.models.list()
        except openai.NotFoundError:
            # Some compatible servers have no /models; a one-token completion proves access.
            async for _ in self.stream([ChatMessage("user", "ping")]):
                break
            return f"{self._settings.base_url} answers with model {self._settings.model}"
        except openai.APIError as err:
            raise _translate(err) from err
        names = [model.id for model in page.data]
        if names and self._settings.model not in names:
            raise LLMError(
                "unknown_model",
                f"model {self._settings.model!r} is not offered by "
                f"{self._settings.base_url} (it has: {', '.join(names[:8])})",
            )
        return f"{self._settings.base_url} reachable, model {self._settings.model} available"

    async def aclose(self) -> None:
        """Close the SDK's HTTP connections."""
        await self._client.close()


def _translate(err: openai.APIError) -> LLMError:
    """Map SDK errors to short reasons; the detail goes to the log, never the speaker."""
    if isinstance(err, openai.APITimeoutError):
        return LLMError("timeout", "the LLM did not answer in time")
    if isinstance(err, openai.APIConnectionError):
        return LLMError("connection", f"cannot reach the LLM: {err}")
    if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
        return LLMError("auth", f"the LLM rejected the API key ({err.status_code})")
    if isinstance(err, openai.RateLimitError):
        return LLMError("rate_limited", f"the LLM is rate limiting us: {err.message}")
    if isinstance(err, openai.NotFoundError):
        return LLMError("not_found", f"model or URL not found: {err.message}")
    if isinstance(err, openai.APIStatusError):
        if err.status_code >= 500:
            return LLMError("server_error", f"the LLM failed ({err.status_code}): {err.message}")
        return LLMError(
            "bad_request", f"the LLM refused the request ({err.status_code}): {err.message}"
        )
    return LLMError("malformed", f"unexpected LLM response: {err}")
