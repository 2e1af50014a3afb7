"""Xiaomi account login, one service token per sid, cached in an owner-only JSON file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import string
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from xiaoai_bridge.clients.xiaomi.answers import (
    answer_json,
    answer_text,
    read_answer,
    text_field,
)
from xiaoai_bridge.clients.xiaomi.errors import (
    CaptchaRequiredError,
    InvalidCredentialsError,
    LoginRequiredError,
    TokenExpiredError,
    VerificationRequiredError,
    XiaomiApiError,
    XiaomiAuthError,
    XiaomiServerError,
    network_errors,
)
from xiaoai_bridge.jsonwire import parse_json
from xiaoai_bridge.log import register_secret

_LOGGER = logging.getLogger(__name__)

DEFAULT_ACCOUNT_URL = "https://account.xiaomi.com"
SID_MINA = "micoapi"  # MiNA and the conversation log
SID_MIOT = "xiaomiio"  # MIoT
SIDS = (SID_MINA, SID_MIOT)
DEFAULT_TIMEOUT_S = 15.0
# A fresh token rejected again right away means something else is wrong (e.g. a deviceId the
# account does not own): do not hammer the login endpoint, which triggers risk control.
DEFAULT_RELOGIN_COOLDOWN_S = 30.0
# Kept stable on purpose: a changing UA/deviceId is linked to Xiaomi's security verification.
DEFAULT_LOGIN_USER_AGENT = "APP/com.xiaomi.mihome APPV/6.0.103 iosPassportSDK/3.9.0 iOS/14.4 miHSTS"

_JSON_PREFIX = "&&&START&&&"
_ACCOUNT_SERVICE = "Xiaomi account"
_SDK_VERSION = "3.9"
_DEVICE_ID_LEN = 16
_MAX_STS_HOPS = 5
_CODE_INVALID = 70016
_CODE_CAPTCHA = 87001
_SECURITY_STATUS_VERIFY = 16
_OWNER_ONLY = 0o600

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ServiceCredentials:
    """What a request to one Xiaomi service needs; secrets are kept out of repr."""

    sid: str
    user_id: str = field(repr=False)
    device_id: str = field(repr=False)
    ssecurity: str = field(repr=False)
    service_token: str = field(repr=False)


@dataclass(slots=True)
class SavedLogin:
    """The token cache contents (MiService's `.mi.token` shape plus `account`)."""

    device_id: str
    account: str = ""
    user_id: str = field(default="", repr=False)
    pass_token: str = field(default="", repr=False)
    # sid -> (ssecurity, serviceToken)
    services: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)


def cookie_header(cookies: Mapping[str, str]) -> str:
    """Build a Cookie header value; sent by hand so no cookie jar mixes hosts."""
    return "; ".join(f"{name}={value}" for name, value in cookies.items())


def password_hash(password: str) -> str:
    """The `hash` form field of serviceLoginAuth2: upper-case hex MD5 of the password."""
    return hashlib.md5(password.encode(), usedforsecurity=False).hexdigest().upper()


def client_sign(nonce: object, ssecurity: str) -> str:
    """The `clientSign` of the STS step (before URL-encoding)."""
    digest = hashlib.sha1(f"nonce={nonce}&{ssecurity}".encode(), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


def parse_login_json(text: str) -> dict[str, Any]:
    """Parse an account.xiaomi.com answer, which prefixes its JSON with `&&&START&&&`."""
    text = text.strip()
    text = text.removeprefix(_JSON_PREFIX)
    body = answer_json(_ACCOUNT_SERVICE, text)
    if not isinstance(body, dict):
        raise XiaomiApiError(_ACCOUNT_SERVICE, "bad_response", "answer is not a JSON object")
    return body


def parse_pasted_login(text: str) -> tuple[str, str]:
    """Read (userId, passToken) from a pasted browser cookie string `userId=…; passToken=…`."""
    values: dict[str, str] = {}
    for part in text.replace("\n", ";").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            values[name.strip()] = value.strip().strip('"')
    user_id = values.get("userId", "")
    pass_token = values.get("passToken", "")
    if not user_id or not pass_token:
        raise LoginRequiredError(
            "the pasted text must contain both cookies `userId=…` and `passToken=…` "
            "(copy them from account.xiaomi.com in the browser's developer tools)"
        )
    return user_id, pass_token


def new_device_id() -> str:
    """A client deviceId like MiService's: 16 random upper-case letters and digits."""
    alphabet = string.ascii_uppercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(_DEVICE_ID_LEN))


class TokenCache:
    """The JSON token file, readable and writable by its owner only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> SavedLogin | None:
        """Read the cache; None when it is missing or unreadable."""
        try:
            raw = self.path.read_bytes()
            if self.path.stat().st_mode & 0o077:
                # Copied in by hand (e.g. a MiService .mi.token): tighten it.
                self.path.chmod(_OWNER_ONLY)
        except FileNotFoundError:
            return None
        except OSError as err:
            _LOGGER.warning("cannot read the Xiaomi token cache %s: %s", self.path, err.strerror)
            return None
        try:
            # parse_json: bad UTF-8 or deep nesting in a hand-copied file is "unreadable" too.
            return _saved_from_json(parse_json(raw))
        except (ValueError, TypeError, KeyError):
            _LOGGER.warning("ignoring the unreadable Xiaomi token cache %s", self.path)
            return None

    def save(self, saved: SavedLogin) -> None:
        """Write the cache atomically; the file is 0600 from the moment it exists."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file with mode 0600 whatever the umask; replace() keeps it.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(_saved_to_json(saved), handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _saved_to_json(saved: SavedLogin) -> dict[str, Any]:
    data: dict[str, Any] = {"deviceId": saved.device_id, "account": saved.account}
    if saved.user_id:
        # MiService writes userId as a number; keep its file format interchangeable.
        data["userId"] = int(saved.user_id) if saved.user_id.isdigit() else saved.user_id
    if saved.pass_token:
        data["passToken"] = saved.pass_token
    for sid, (ssecurity, token) in saved.services.items():
        data[sid] = [ssecurity, token]
    return data


def _saved_from_json(data: Any) -> SavedLogin:
    if not isinstance(data, dict) or not isinstance(data.get("deviceId"), str):
        raise TypeError("not a token cache")
    services: dict[str, tuple[str, str]] = {}
    for sid in SIDS:
        pair = data.get(sid)
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair):
            services[sid] = (pair[0], pair[1])
    user_id = data.get("userId", "")
    pass_token = data.get("passToken", "")
    account = data.get("account", "")
    return SavedLogin(
        device_id=data["deviceId"],
        account=account if isinstance(account, str) else "",
        user_id=str(user_id) if isinstance(user_id, int | str) else "",
        pass_token=pass_token if isinstance(pass_token, str) else "",
        services=services,
    )


class XiaomiAuth:
    """Logs in to the Xiaomi account once per sid and hands out service credentials.

    Order of preference: the cached service token, then a passToken login (no password),
    then a password login. Logins are serialised, so concurrent 401s cause one re-login.
    `pass_token` + `user_id` (copied from a browser) stand in for a cached passToken.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        account: str = "",
        password: str | None = None,
        pass_token: str | None = None,
        user_id: str | None = None,
        token_path: Path | None = None,
        base_url: str = DEFAULT_ACCOUNT_URL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        user_agent: str = DEFAULT_LOGIN_USER_AGENT,
        relogin_cooldown_s: float = DEFAULT_RELOGIN_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
        on_secret: Callable[[str], None] = register_secret,
    ) -> None:
        # Every password, token and id this login learns is handed to `on_secret` at once, so
        # the log can mask it (whatever logs it: this module, aiohttp, a caller's traceback).
        self._on_secret = on_secret
        self._learned(password, password_hash(password) if password else None, pass_token, user_id)
        self._session = session
        self._account = account
        self._password = password or None
        # A passToken/userId pasted into the config: used when the cache has no passToken.
        self._seed = (user_id, pass_token) if pass_token and user_id else None
        self._cache = TokenCache(token_path) if token_path is not None else None
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._user_agent = user_agent
        self._relogin_cooldown_s = relogin_cooldown_s
        self._clock = clock
        self._saved: SavedLogin | None = None
        self._lock = asyncio.Lock()
        self._last_relogin: dict[str, float] = {}

    @property
    def device_id(self) -> str:
        """The persisted client deviceId sent to the account service (PassportDeviceId)."""
        return self._state().device_id

    @property
    def user_id(self) -> str:
        """The numeric Xiaomi user id once logged in, else ''. Never log it."""
        return self._state().user_id

    def has_credentials(self, sid: str) -> bool:
        """True when a service token for `sid` is cached (it may still turn out expired)."""
        return self._cached(sid) is not None

    async def credentials(self, sid: str) -> ServiceCredentials:
        """Credentials for `sid`: cached if present, else after logging in."""
        cached = self._cached(sid)
        if cached is not None:
            return cached
        async with self._lock:
            cached = self._cached(sid)
            if cached is not None:
                return cached
            return await self._login(sid)

    async def relogin(self, sid: str, stale: ServiceCredentials) -> ServiceCredentials:
        """Replace credentials the service rejected; other waiters reuse the new ones."""
        async with self._lock:
            current = self._cached(sid)
            if current is not None and current.service_token != stale.service_token:
                return current
            last = self._last_relogin.get(sid)
            if last is not None and self._clock() - last < self._relogin_cooldown_s:
                raise TokenExpiredError(
                    f"Xiaomi rejected a freshly issued {sid} token; not logging in again for "
                    f"{self._relogin_cooldown_s:.0f} s (is the speaker still on this account?)"
                )
            self._last_relogin[sid] = self._clock()
            self._state().services.pop(sid, None)
            _LOGGER.info("Xiaomi %s token rejected; logging in again", sid)
            return await self._login(sid)

    async def call(self, sid: str, request: Callable[[ServiceCredentials], Awaitable[_T]]) -> _T:
        """Run `request`; if the token was rejected, log in again and run it once more."""
        creds = await self.credentials(sid)
        try:
            return await request(creds)
        except TokenExpiredError:
            creds = await self.relogin(sid, creds)
        return await request(creds)

    async def login(self, sids: Iterable[str] = SIDS) -> None:
        """Log in afresh to each sid (passToken first, then password) and save the cache."""
        async with self._lock:
            state = self._state()
            for sid in sids:
                state.services.pop(sid, None)
                await self._login(sid)

    async def login_with_pass_token(
        self, user_id: str, pass_token: str, sids: Iterable[str] = SIDS
    ) -> None:
        """Log in with a passToken pasted from a browser (the answer to 2FA and captchas)."""
        async with self._lock:
            state = self._state()
            self._learned(user_id, pass_token)
            state.user_id, state.pass_token = user_id, pass_token
            state.services.clear()
            for sid in sids:
                body = await self._service_login(sid)
                if not _is_ticket(body):
                    state.user_id, state.pass_token = "", ""
                    _raise_for_login_body(body, step=1)
                    raise LoginRequiredError(
                        "Xiaomi did not accept the pasted passToken/userId: copy them again from "
                        "a browser session that is logged in to account.xiaomi.com"
                    )
                await self._finish(sid, body)

    # --- internals ----------------------------------------------------------------------

    def _state(self) -> SavedLogin:
        if self._saved is None:
            saved = self._cache.load() if self._cache is not None else None
            if saved is None:
                # Persist the new deviceId at once so it stays stable even if login fails.
                self._saved = SavedLogin(device_id=new_device_id(), account=self._account)
                self._persist()
            else:
                if self._account and saved.account and saved.account != self._account:
                    _LOGGER.info("Xiaomi account changed; the cached login is not reused")
                    saved = SavedLogin(device_id=saved.device_id, account=self._account)
                elif self._account:
                    saved.account = self._account
                self._saved = saved
            if self._seed is not None and not self._saved.pass_token:
                self._saved.user_id, self._saved.pass_token = self._seed
                self._saved.services.clear()
            saved = self._saved
            self._learned(
                saved.user_id, saved.pass_token, *(v for p in saved.services.values() for v in p)
            )
        return self._saved

    def _learned(self, *values: str | None) -> None:
        for value in values:
            if value:
                self._on_secret(value)

    def _cached(self, sid: str) -> ServiceCredentials | None:
        state = self._state()
        pair = state.services.get(sid)
        if pair is None or not state.user_id:
            return None
        return ServiceCredentials(
            sid=sid,
            user_id=state.user_id,
            device_id=state.device_id,
            ssecurity=pair[0],
            service_token=pair[1],
        )

    def _persist(self) -> None:
        if self._cache is None or self._saved is None:
            return
        try:
            self._cache.save(self._saved)
        except OSError as err:
            _LOGGER.warning(
                "cannot write the Xiaomi token cache %s (%s); the next start logs in again",
                self._cache.path,
                err.strerror,
            )

    async def _login(self, sid: str) -> ServiceCredentials:
        state = self._state()
        body = await self._service_login(sid)
        if _is_ticket(body):
            _LOGGER.debug("Xiaomi %s: logged in with the saved passToken", sid)
            return await self._finish(sid, body)
        if state.pass_token:
            _LOGGER.info("Xiaomi %s: the saved passToken is no longer accepted", sid)
            state.pass_token = ""
        _raise_for_login_body(body, step=1)
        if not self._password:
            raise LoginRequiredError(
                "no valid saved Xiaomi login and no password configured: set the [xiaomi] "
                "password, or run `xiaoai-bridge login`"
            )
        body = await self._service_login_auth2(body)
        _raise_for_login_body(body, step=2)
        if not _is_ticket(body):
            raise XiaomiAuthError(
                f"unexpected Xiaomi login answer (code {_text(body.get('code'))!r}, "
                f"{_short(body.get('desc'))}); try `xiaoai-bridge login`"
            )
        _LOGGER.info("Xiaomi %s: logged in with the password", sid)
        return await self._finish(sid, body)

    async def _service_login(self, sid: str) -> dict[str, Any]:
        state = self._state()
        cookies = {"sdkVersion": _SDK_VERSION, "deviceId": state.device_id}
        if state.pass_token and state.user_id:
            cookies["userId"] = state.user_id
            cookies["passToken"] = state.pass_token
        with network_errors("Xiaomi account"):
            async with self._session.get(
                f"{self._base_url}/pass/serviceLogin",
                params={"sid": sid, "_json": "true"},
                headers=self._headers(cookies),
                timeout=self._timeout,
            ) as resp:
                _check_account_status(resp.status)
                body = await read_answer(resp, _ACCOUNT_SERVICE)
        return parse_login_json(answer_text(_ACCOUNT_SERVICE, body))

    async def _service_login_auth2(self, step1: dict[str, Any]) -> dict[str, Any]:
        assert self._password is not None  # checked by the caller  # noqa: S101
        state = self._state()
        form = {
            "_json": "true",
            "qs": _text(step1.get("qs")),
            "sid": _text(step1.get("sid")),
            "_sign": _text(step1.get("_sign")),
            "callback": _text(step1.get("callback")),
            "user": self._account,
            "hash": password_hash(self._password),
        }
        cookies = {"sdkVersion": _SDK_VERSION, "deviceId": state.device_id}
        with network_errors("Xiaomi account"):
            async with self._session.post(
                f"{self._base_url}/pass/serviceLoginAuth2",
                data=form,
                headers=self._headers(cookies),
                timeout=self._timeout,
            ) as resp:
                _check_account_status(resp.status)
                body = await read_answer(resp, _ACCOUNT_SERVICE)
        return parse_login_json(answer_text(_ACCOUNT_SERVICE, body))

    async def _finish(self, sid: str, body: dict[str, Any]) -> ServiceCredentials:
        """Trade the login ticket for the sid's serviceToken at its STS and save it."""
        state = self._state()
        ssecurity = _text(body.get("ssecurity"))
        location = _text(body.get("location"))
        sign = quote(client_sign(_text(body.get("nonce")), ssecurity), safe="")
        separator = "&" if "?" in location else "?"
        self._learned(ssecurity, _text(body.get("passToken")), _text(body.get("userId")))
        token = await self._fetch_service_token(f"{location}{separator}clientSign={sign}")
        self._learned(token)
        state.user_id = _text(body["userId"])
        state.pass_token = _text(body.get("passToken")) or state.pass_token
        state.services[sid] = (ssecurity, token)
        self._persist()
        creds = self._cached(sid)
        assert creds is not None  # just stored  # noqa: S101
        return creds

    async def _fetch_service_token(self, url: str) -> str:
        try:
            return await self._follow_sts(url)
        except ValueError as err:
            # yarl refuses a malformed location (a bad port or IPv6 host) with ValueError.
            raise XiaomiAuthError(
                "Xiaomi's login answer pointed to a malformed token service address; retry "
                "later or run `xiaoai-bridge login`"
            ) from err

    async def _follow_sts(self, url: str) -> str:
        # The location is already URL-encoded; keep yarl from encoding it twice.
        target = URL(url, encoded=True)
        for _ in range(_MAX_STS_HOPS):
            with network_errors("Xiaomi STS"):
                async with self._session.get(
                    target,
                    allow_redirects=False,
                    headers={"User-Agent": self._user_agent},
                    timeout=self._timeout,
                ) as resp:
                    morsel = resp.cookies.get("serviceToken")
                    if morsel is not None and morsel.value:
                        return morsel.value
                    location = resp.headers.get("Location")
                    if resp.status in {301, 302, 303, 307, 308} and location:
                        target = resp.url.join(URL(location, encoded=True))
                        continue
                    _check_account_status(resp.status)
                    break
        raise XiaomiAuthError(
            "Xiaomi's token service did not return a serviceToken; retry later or run "
            "`xiaoai-bridge login`"
        )

    def _headers(self, cookies: Mapping[str, str]) -> dict[str, str]:
        return {"User-Agent": self._user_agent, "Cookie": cookie_header(cookies)}


def _is_ticket(body: Mapping[str, Any]) -> bool:
    """A login answer that carries everything the STS step needs."""
    return (
        body.get("code") == 0
        and body.get("userId") not in (None, "")
        and bool(body.get("ssecurity"))
        and bool(body.get("location"))
        and body.get("nonce") is not None
    )


def _raise_for_login_body(body: Mapping[str, Any], *, step: int) -> None:
    code = body.get("code")
    if code == _CODE_CAPTCHA:
        raise CaptchaRequiredError
    notification_url = _text(body.get("notificationUrl"))
    if body.get("securityStatus") == _SECURITY_STATUS_VERIFY or (
        notification_url and not body.get("location")
    ):
        raise VerificationRequiredError(notification_url)
    if step == 1:
        if "qs" not in body and code != 0:
            raise XiaomiAuthError(
                f"Xiaomi refused to start a login (code {_text(code)!r}, "
                f"{_short(body.get('desc'))}); wait a while and retry"
            )
        return
    if code == _CODE_INVALID:
        raise InvalidCredentialsError


def _check_account_status(status: int) -> None:
    if status == 429 or status >= 500:
        raise XiaomiServerError("Xiaomi account", status)
    if status >= 400:
        raise XiaomiAuthError(f"Xiaomi account answered HTTP {status}; retry later")


def _text(value: object) -> str:
    return text_field(value)


def _short(value: object) -> str:
    """A server-supplied description, trimmed for a one-line message."""
    return _text(value)[:80] or "no description"
