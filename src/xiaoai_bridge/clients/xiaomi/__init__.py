"""Xiaomi cloud clients: account login, MiNA, the conversation log and MIoT."""

from __future__ import annotations

import aiohttp

from xiaoai_bridge.clients.xiaomi.auth import (
    DEFAULT_ACCOUNT_URL,
    SID_MINA,
    SID_MIOT,
    SIDS,
    ServiceCredentials,
    XiaomiAuth,
    parse_pasted_login,
)
from xiaoai_bridge.clients.xiaomi.conversation import (
    DEFAULT_CONVERSATION_URL,
    ConversationAnswer,
    ConversationClient,
    ConversationCursor,
    ConversationRecord,
)
from xiaoai_bridge.clients.xiaomi.errors import (
    CaptchaRequiredError,
    InvalidCredentialsError,
    LoginRequiredError,
    TokenExpiredError,
    VerificationRequiredError,
    XiaomiApiError,
    XiaomiAuthError,
    XiaomiError,
    XiaomiNetworkError,
    XiaomiServerError,
    XiaomiUnavailableError,
)
from xiaoai_bridge.clients.xiaomi.mina import (
    DEFAULT_MINA_URL,
    MinaClient,
    MinaDevice,
    PlayState,
    PlayStatus,
)
from xiaoai_bridge.clients.xiaomi.miot import (
    DEFAULT_MIOT_URL,
    SPEAKER_ACTIONS,
    MiotClient,
    MiotDevice,
    SpeakerActions,
    is_known_model,
    speaker_actions,
)

__all__ = [
    "DEFAULT_ACCOUNT_URL",
    "DEFAULT_CONVERSATION_URL",
    "DEFAULT_MINA_URL",
    "DEFAULT_MIOT_URL",
    "SIDS",
    "SID_MINA",
    "SID_MIOT",
    "SPEAKER_ACTIONS",
    "CaptchaRequiredError",
    "ConversationAnswer",
    "ConversationClient",
    "ConversationCursor",
    "ConversationRecord",
    "InvalidCredentialsError",
    "LoginRequiredError",
    "MinaClient",
    "MinaDevice",
    "MiotClient",
    "MiotDevice",
    "PlayState",
    "PlayStatus",
    "ServiceCredentials",
    "SpeakerActions",
    "TokenExpiredError",
    "VerificationRequiredError",
    "XiaomiApiError",
    "XiaomiAuth",
    "XiaomiAuthError",
    "XiaomiError",
    "XiaomiNetworkError",
    "XiaomiServerError",
    "XiaomiUnavailableError",
    "is_known_model",
    "new_session",
    "parse_pasted_login",
    "speaker_actions",
]


def new_session() -> aiohttp.ClientSession:
    """An HTTP session for these clients: they send cookies by hand, so no cookie jar.

    A shared jar would send one host's cookies (e.g. the account's deviceId) to the others.
    Must be created inside a running event loop and closed by the caller.
    """
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
