"""Logging setup, with secrets redacted from every record."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, SecretStr

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_MASK = "***"
# Short values would mask innocent words; real secrets are long.
MIN_SECRET_CHARS = 6


class SecretRegistry:
    """The values to mask: the config's secrets, and tokens learned at run time."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: str | None) -> None:
        """Mask `value` from now on, also in its URL-encoded form (query strings, cookies)."""
        if not value or len(value) < MIN_SECRET_CHARS:
            return
        forms = {value, quote(value, safe="")}
        with self._lock:
            if forms <= self._values:
                return
            self._values |= forms
            # Longest first: a secret containing another is masked whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def mask(self, text: str) -> str:
        """`text` with every known secret replaced by a mask."""
        pattern = self._pattern
        return text if pattern is None else pattern.sub(_MASK, text)


_SECRETS = SecretRegistry()
_FACTORY_LOCK = threading.Lock()
_factory_installed = False


def register_secret(value: str | None) -> None:
    """Mask `value` in every log record from now on, whatever logs it and at any level."""
    _SECRETS.add(value)
    _install_record_factory()


def mask_secrets(text: str) -> str:
    """`text` with every registered secret masked: for what other servers said, shown anywhere."""
    return _SECRETS.mask(text)


def register_secrets_of(model: BaseModel) -> None:
    """Mask every secret the settings hold: each SecretStr field, and passwords in URLs."""
    for value in secret_values(model):
        register_secret(value)


def secret_values(value: object) -> Iterator[str]:
    """The secret strings anywhere in a pydantic model (nested models, lists, dicts)."""
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from secret_values(getattr(value, name))
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from secret_values(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from secret_values(item)
    elif isinstance(value, str) and "@" in value and "://" in value:
        # A broker URL carries its password inline (mqtt://user:password@host).
        try:
            password = urlsplit(value).password
        except ValueError:
            return
        if password:
            yield password  # as written in the URL, and as the broker receives it
            yield unquote(password)


def redact(record: logging.LogRecord) -> None:
    """Mask secrets in a record's message, exception text and stack, in place."""
    if not len(_SECRETS):
        return
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001  # a broken log call is reported when emitted, as usual
        return
    masked = _SECRETS.mask(message)
    if masked != message:
        record.msg, record.args = masked, None
    if record.exc_info and not record.exc_text:
        # Formatters reuse exc_text, so the traceback is rendered (and masked) once, here.
        record.exc_text = _SECRETS.mask(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = _SECRETS.mask(record.exc_text)
    if record.stack_info:
        record.stack_info = _SECRETS.mask(record.stack_info)


def _install_record_factory() -> None:
    # Masking when the record is made, not in one handler's filter: every handler (pytest's,
    # a library's own), every logger and every level then only ever sees the masked record.
    global _factory_installed  # noqa: PLW0603  # one process-wide hook, installed once
    with _FACTORY_LOCK:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            redact(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True


def setup_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """Log to stderr at `level`, masking `secrets`; quiet chatty libraries."""
    for secret in secrets:
        register_secret(secret)
    _install_record_factory()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs each MCP request (pings too) at INFO; the MCP SDK logs session ids at INFO.
    for noisy in ("amqtt", "transitions", "aiomqtt", "httpx", "mcp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
