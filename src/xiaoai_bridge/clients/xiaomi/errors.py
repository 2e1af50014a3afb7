"""Errors of the Xiaomi cloud clients, each with a machine code and a CLI exit code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiohttp

from xiaoai_bridge.errors import BridgeError


class XiaomiError(BridgeError):
    """Root of the Xiaomi cloud errors; `code` is stable, the message is for people."""

    code = "xiaomi_error"
    exit_code = 20

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- login problems: retrying soon will not help, the user has to act -----------------------


class XiaomiAuthError(XiaomiError):
    """Logging in to the Xiaomi account failed; not worth retrying fast."""

    code = "auth_failed"
    exit_code = 21


class InvalidCredentialsError(XiaomiAuthError):
    """Xiaomi answered 70016: wrong account/password, or the login was blocked."""

    code = "invalid_credentials"
    exit_code = 22
    xiaomi_code = 70016

    def __init__(self) -> None:
        super().__init__(
            "Xiaomi rejected the account or password (code 70016). Check [xiaomi] account and "
            "password; the numeric Xiaomi ID often works where a phone number or e-mail does not. "
            "If they are right, Xiaomi may be blocking logins from this network: log in once "
            "with `xiaoai-bridge login` from a home network, or paste a passToken."
        )


class CaptchaRequiredError(XiaomiAuthError):
    """Xiaomi answered 87001: captcha / too many login attempts (risk control)."""

    code = "captcha_required"
    exit_code = 23
    xiaomi_code = 87001

    def __init__(self) -> None:
        super().__init__(
            "Xiaomi wants a captcha (code 87001): too many login attempts from here. Wait an "
            "hour before retrying, or log in at https://account.xiaomi.com in a browser on the "
            "same network and paste its passToken into `xiaoai-bridge login`."
        )


class VerificationRequiredError(XiaomiAuthError):
    """Xiaomi wants a second factor (securityStatus 16); the user must open the URL."""

    code = "verification_required"
    exit_code = 24

    def __init__(self, notification_url: str) -> None:
        self.notification_url = notification_url
        where = notification_url or "https://account.xiaomi.com"
        super().__init__(
            "Xiaomi asks for security verification of this login (securityStatus 16). Open "
            f"{where} in a browser, finish the SMS/e-mail check, then retry; or log in there and "
            "paste the passToken cookie into `xiaoai-bridge login`."
        )


class LoginRequiredError(XiaomiAuthError):
    """No usable saved login and no password to make a new one."""

    code = "login_required"
    exit_code = 25


class TokenExpiredError(XiaomiAuthError):
    """The service token was rejected (HTTP 401 / "auth err") even after logging in again."""

    code = "token_expired"
    exit_code = 26


# --- transient problems: back off and retry -------------------------------------------------


class XiaomiUnavailableError(XiaomiError):
    """The cloud could not be reached or failed; retry with backoff."""

    code = "unavailable"
    exit_code = 27


class XiaomiNetworkError(XiaomiUnavailableError):
    """Connection failure or timeout talking to a Xiaomi host."""

    code = "network"


class XiaomiServerError(XiaomiUnavailableError):
    """A Xiaomi host answered 5xx or 429."""

    code = "server_error"

    def __init__(self, service: str, status: int) -> None:
        self.status = status
        if status == 429:
            self.code = "rate_limited"
        super().__init__(f"{service} answered HTTP {status}")


# --- the request reached the cloud but it said no -------------------------------------------


class XiaomiApiError(XiaomiError):
    """The cloud answered with an error code, or with something that is not its format."""

    code = "api_error"
    exit_code = 28

    def __init__(self, service: str, api_code: object, detail: str) -> None:
        self.service = service
        if not isinstance(api_code, str | int | float | None):
            # The code comes from the answer: a list or object could be nested deep enough
            # that formatting it raises RecursionError.
            api_code = "bad_response"
        self.api_code = api_code
        self.detail = detail
        super().__init__(f"{service} error {api_code}: {detail}")


def check_status(service: str, status: int) -> None:
    """Turn an HTTP status into the matching error; 2xx passes."""
    if status == 401:
        raise TokenExpiredError(f"{service} rejected the service token (HTTP 401)")
    if status == 429 or status >= 500:
        raise XiaomiServerError(service, status)
    if status >= 400:
        raise XiaomiApiError(service, status, f"HTTP {status}")


@contextlib.contextmanager
def network_errors(service: str) -> Iterator[None]:
    """Translate aiohttp/timeout failures into XiaomiNetworkError.

    The message names only the service and the error type: aiohttp's own messages carry the
    URL, and login URLs carry one-time secrets.
    """
    try:
        yield
    except TimeoutError as err:
        raise XiaomiNetworkError(f"{service}: request timed out") from err
    except aiohttp.ClientError as err:
        raise XiaomiNetworkError(f"{service}: {type(err).__name__}") from err
