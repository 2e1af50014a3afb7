"""The one error root; foreign errors are translated into these at the boundary."""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error xiaoai-bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration is invalid; the message names the key and the fix."""


class LLMError(BridgeError):
    """The LLM call failed; `reason` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class LLMNotConfiguredError(LLMError):
    """No API key for a provider that needs one."""

    def __init__(self) -> None:
        super().__init__("not_configured", "no LLM API key configured")


class BadInputError(BridgeError):
    """An incoming message cannot be turned into a question."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataDirError(BridgeError):
    """The data dir or a file in it cannot be used; the message names the path and the fix."""
