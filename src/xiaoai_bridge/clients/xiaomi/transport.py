"""The one request path of the Xiaomi service clients: login cookies, timeout, re-login, errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from xiaoai_bridge.clients.xiaomi.answers import answer_text, read_answer
from xiaoai_bridge.clients.xiaomi.auth import ServiceCredentials, XiaomiAuth, cookie_header
from xiaoai_bridge.clients.xiaomi.errors import check_status, network_errors

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one attempt sends; built afresh per attempt, as a re-login changes the cookies."""

    cookies: Mapping[str, str]
    params: Mapping[str, str] | None = None
    form: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class ServiceTransport:
    """Requests to one Xiaomi service under one sid's login, retried once after a re-login.

    HTTP 401 and whatever `parse` raises as TokenExpiredError trigger the re-login; network
    failures, HTTP errors and bodies that are not UTF-8 become the clients' own errors
    (errors.py). `parse` gets the body as text and raises XiaomiApiError for anything else.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: XiaomiAuth,
        *,
        service: str,
        sid: str,
        base_url: str,
        timeout_s: float,
        user_agent: str,
    ) -> None:
        self._session = session
        self._auth = auth
        self.service = service
        self._sid = sid
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._user_agent = user_agent

    async def request(
        self,
        method: str,
        path: str,
        build: Callable[[ServiceCredentials], Outgoing],
        parse: Callable[[str], _T],
    ) -> _T:
        """Send `build(credentials)` to `<base><path>` and return `parse(body)`."""

        async def attempt(creds: ServiceCredentials) -> _T:
            outgoing = build(creds)
            headers = {
                "User-Agent": self._user_agent,
                **outgoing.headers,
                "Cookie": cookie_header(outgoing.cookies),
            }
            with network_errors(self.service):
                async with self._session.request(
                    method,
                    f"{self._base_url}{path}",
                    params=outgoing.params,
                    data=outgoing.form,
                    headers=headers,
                    timeout=self._timeout,
                ) as resp:
                    check_status(self.service, resp.status)
                    # Bytes, not resp.text(): a bad byte must become our error, not a
                    # UnicodeDecodeError; a body cut short fails here as a network error.
                    body = await read_answer(resp, self.service)
            return parse(answer_text(self.service, body))

        return await self._auth.call(self._sid, attempt)
