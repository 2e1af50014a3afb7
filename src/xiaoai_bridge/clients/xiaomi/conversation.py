"""The speaker's conversation log, and a per-speaker cursor that yields each new record once."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from xiaoai_bridge.clients.xiaomi.answers import answer_json, int_field, text_field
from xiaoai_bridge.clients.xiaomi.auth import SID_MINA, ServiceCredentials, XiaomiAuth
from xiaoai_bridge.clients.xiaomi.errors import XiaomiApiError
from xiaoai_bridge.clients.xiaomi.transport import Outgoing, ServiceTransport

_LOGGER = logging.getLogger(__name__)

DEFAULT_CONVERSATION_URL = "https://userprofile.mina.mi.com"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_USER_AGENT = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 14_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 /XiaoMi/HybridView/ micoSoundboxApp/i appVersion/A_2.4.40"
)
DEFAULT_LIMIT = 2  # one poll normally sees at most one new record; 2 tells us if there is more
DEFAULT_PAGE_LIMIT = 10
DEFAULT_MAX_PAGES = 3
# Records older than this are never answered, e.g. after a cloud outage or a stalled poller.
DEFAULT_FRESHNESS_S = 60.0
_SEEN_LIMIT = 64
_SERVICE = "conversation log"
_PATH = "/device_profile/v2/conversation"
_MAX_TIME_MS = 2**53  # far beyond any real clock, still exact as a float


@dataclass(frozen=True, slots=True)
class ConversationAnswer:
    """One of XiaoAi's answers to a record: `type` is TTS, LLM, AUDIO, …"""

    type: str
    text: str


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    """One thing said to the speaker, with XiaoAi's own answers."""

    time_ms: int  # server time, ms since the epoch
    query: str
    answers: tuple[ConversationAnswer, ...] = ()
    request_id: str = ""

    @property
    def key(self) -> str:
        """Identity used to never hand out a record twice."""
        return self.request_id or f"{self.time_ms}:{self.query}"


@dataclass(frozen=True, slots=True)
class ConversationPage:
    """One answer of the log endpoint; `records` newest first, as Xiaomi sends them."""

    records: tuple[ConversationRecord, ...]
    next_end_time: int = 0


def parse_answer(item: dict[str, Any]) -> ConversationAnswer:
    """One entry of a record's `answers`."""
    kind = text_field(item.get("type"))
    payload = item.get(kind.lower())
    text = ""
    if isinstance(payload, dict):
        if isinstance(payload.get("text"), str):
            text = payload["text"]
        elif isinstance(payload.get("audioInfoList"), list):
            titles = [
                text_field(info.get("title"))
                for info in payload["audioInfoList"]
                if isinstance(info, dict)
            ]
            text = ", ".join(title for title in titles if title)
    return ConversationAnswer(type=kind, text=text)


def parse_conversation(text: str) -> ConversationPage:
    """The endpoint's body: an envelope whose `data` is itself a JSON string."""
    body = answer_json(_SERVICE, text)
    if not isinstance(body, dict):
        raise XiaomiApiError(_SERVICE, "bad_response", "answer is not a JSON object")
    if body.get("code") != 0:
        raise XiaomiApiError(_SERVICE, body.get("code"), text_field(body.get("message"))[:120])
    raw = body.get("data")
    data = answer_json(_SERVICE, raw, "data") if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise XiaomiApiError(_SERVICE, "bad_response", "data is not a JSON object")
    items = data.get("records")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise XiaomiApiError(_SERVICE, "bad_response", "records is not a list")
    records = []
    for item in items:
        time_ms = int_field(item.get("time")) if isinstance(item, dict) else None
        # A time that no clock reaches would only overflow later arithmetic.
        if time_ms is None or not 0 <= time_ms <= _MAX_TIME_MS:
            continue
        answers = item.get("answers")
        records.append(
            ConversationRecord(
                time_ms=time_ms,
                query=text_field(item.get("query")),
                answers=tuple(
                    parse_answer(answer)
                    for answer in (answers if isinstance(answers, list) else ())
                    if isinstance(answer, dict)
                ),
                request_id=text_field(item.get("requestId")),
            )
        )
    return ConversationPage(
        records=tuple(records), next_end_time=int_field(data.get("nextEndTime"), 0)
    )


class ConversationClient:
    """Reads a speaker's conversation log (needs the micoapi login)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: XiaomiAuth,
        *,
        base_url: str = DEFAULT_CONVERSATION_URL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> None:
        self._transport = ServiceTransport(
            session,
            auth,
            service=_SERVICE,
            sid=SID_MINA,
            base_url=base_url,
            timeout_s=timeout_s,
            user_agent=user_agent,
        )

    async def fetch(
        self,
        device_id: str,
        hardware: str,
        *,
        limit: int = DEFAULT_LIMIT,
        timestamp_ms: int | None = None,
    ) -> ConversationPage:
        """The newest `limit` records, or those at or before `timestamp_ms` when paging."""
        params = {"source": "dialogu", "hardware": hardware, "limit": str(limit)}
        # Only sent when paging: as an upper bound taken from the local clock it would hide
        # new records whenever the local clock runs behind Xiaomi's.
        if timestamp_ms is not None:
            params["timestamp"] = str(timestamp_ms)

        def build(creds: ServiceCredentials) -> Outgoing:
            cookies = {
                "userId": creds.user_id,
                "serviceToken": creds.service_token,
                "deviceId": device_id,
            }
            return Outgoing(cookies=cookies, params=params)

        return await self._transport.request("GET", _PATH, build, parse_conversation)


class ConversationCursor:
    """Per speaker: turns repeated log fetches into "records said since last time".

    Records come out oldest first, each once; records from before `start_ms` or older than
    the freshness window are skipped; when the newest page is all new it pages back.
    """

    def __init__(
        self,
        client: ConversationClient,
        device_id: str,
        hardware: str,
        *,
        start_ms: int | None = None,
        freshness_s: float = DEFAULT_FRESHNESS_S,
        limit: int = DEFAULT_LIMIT,
        page_limit: int = DEFAULT_PAGE_LIMIT,
        max_pages: int = DEFAULT_MAX_PAGES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._device_id = device_id
        self._hardware = hardware
        self._clock = clock
        self._cursor_ms = start_ms if start_ms is not None else int(clock() * 1000)
        self._freshness_ms = int(freshness_s * 1000)
        self._limit = limit
        self._page_limit = page_limit
        self._max_pages = max_pages
        self._seen: collections.deque[str] = collections.deque(maxlen=_SEEN_LIMIT)

    @property
    def cursor_ms(self) -> int:
        """Time of the newest record consumed so far (or the start)."""
        return self._cursor_ms

    def _is_new(self, record: ConversationRecord) -> bool:
        if record.key in self._seen:
            return False
        return record.time_ms >= self._cursor_ms

    async def poll(self) -> list[ConversationRecord]:
        """Fetch the log and return the records not returned before, oldest first."""
        page = await self._client.fetch(self._device_id, self._hardware, limit=self._limit)
        fetched = list(page.records)
        keys = {record.key for record in fetched}
        requested = self._limit
        pages = 0
        while fetched and len(page.records) >= requested and fetched[-1].time_ms > self._cursor_ms:
            if pages == self._max_pages:
                _LOGGER.warning(
                    "more than %d records since the last poll; the oldest are skipped",
                    len(fetched),
                )
                break
            pages += 1
            requested = self._page_limit
            # `timestamp` is inclusive, so the page repeats its first record; keys dedupe.
            page = await self._client.fetch(
                self._device_id,
                self._hardware,
                limit=self._page_limit,
                timestamp_ms=fetched[-1].time_ms,
            )
            older = [record for record in page.records if record.key not in keys]
            if not older:
                break
            keys.update(record.key for record in older)
            fetched.extend(older)

        now_ms = int(self._clock() * 1000)
        fresh_after = now_ms - self._freshness_ms
        new: list[ConversationRecord] = []
        for record in fetched:
            if not self._is_new(record):
                continue
            self._seen.append(record.key)
            if record.time_ms < fresh_after:
                _LOGGER.debug("skipping a record %.1f s old", (now_ms - record.time_ms) / 1000)
                continue
            new.append(record)
        if fetched:
            self._cursor_ms = max(self._cursor_ms, *(record.time_ms for record in fetched))
        new.sort(key=lambda record: record.time_ms)
        return new
