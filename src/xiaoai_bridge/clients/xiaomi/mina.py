"""MiNA API client: the speaker list and ubus calls (cloud TTS, pause/stop, play status)."""

from __future__ import annotations

import enum
import json
import logging
import secrets
import string
from dataclasses import dataclass
from typing import Any

import aiohttp

from xiaoai_bridge.clients.xiaomi.answers import answer_json, int_field, text_field
from xiaoai_bridge.clients.xiaomi.auth import SID_MINA, ServiceCredentials, XiaomiAuth
from xiaoai_bridge.clients.xiaomi.errors import XiaomiApiError
from xiaoai_bridge.clients.xiaomi.transport import Outgoing, ServiceTransport

_LOGGER = logging.getLogger(__name__)

DEFAULT_MINA_URL = "https://api2.mina.mi.com"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MINA_USER_AGENT = (
    "MiHome/6.0.103 (com.xiaomi.mihome; build:6.0.103.1; iOS 14.4.0) "
    "Alamofire/6.0.103 MICO/iOSApp/appStore/6.0.103"
)
# The media name the iOS app uses for player operations.
_MEDIA = "app_ios"
_REQUEST_ID_LEN = 30
_SERVICE = "MiNA"
# Models that ignore player_play_url and play a URL only as a one-item music list
# (research note, from xiaogpt's and mi-gpt's tables).
PLAY_MUSIC_HARDWARE = frozenset(
    {"LX04", "LX05", "L05B", "L05C", "L06", "L06A", "X08A", "X10A", "X08C", "X08E", "X8F"}
    | {"X4B", "OH2", "OH2P", "X6A"}
)
# Fixed ids for that one-item list; the speaker needs some, not particular ones.
_MUSIC_AUDIO_ID = "1582971365183456177"
_MUSIC_CP_ID = "355454500"


class PlayState(enum.IntEnum):
    """`status` of player_get_play_status."""

    IDLE = 0
    PLAYING = 1
    PAUSED = 2
    STOPPED = 3


@dataclass(frozen=True, slots=True)
class MinaDevice:
    """One speaker as MiNA lists it."""

    device_id: str  # MiNA deviceID (UUID): ubus and conversation-log deviceId
    name: str
    alias: str
    hardware: str  # e.g. "LX06"
    miot_did: str  # numeric MIoT did, "" if MiNA does not know it
    serial_number: str
    online: bool


@dataclass(frozen=True, slots=True)
class PlayStatus:
    """The speaker's player state; `status` is kept raw because models add values."""

    status: int
    volume: int | None = None
    media_type: int | None = None
    position_ms: int | None = None
    duration_ms: int | None = None

    @property
    def playing(self) -> bool:
        """True while the speaker is playing (speech or media)."""
        return self.status == PlayState.PLAYING


def new_request_id() -> str:
    """A MiNA requestId as the iOS app makes them: `app_ios_` and 30 random characters."""
    alphabet = string.ascii_letters + string.digits
    return "app_ios_" + "".join(secrets.choice(alphabet) for _ in range(_REQUEST_ID_LEN))


def parse_device(item: dict[str, Any]) -> MinaDevice:
    """One entry of device_list's `data`."""
    return MinaDevice(
        device_id=text_field(item.get("deviceID")),
        name=text_field(item.get("name")),
        alias=text_field(item.get("alias")),
        hardware=text_field(item.get("hardware")),
        miot_did=text_field(item.get("miotDID")),
        serial_number=text_field(item.get("serialNumber")),
        online=item.get("presence") == "online",
    )


def parse_play_status(data: object) -> PlayStatus:
    """player_get_play_status's `data`, whose `info` is a JSON string."""
    info_text = data.get("info") if isinstance(data, dict) else None
    info = (
        answer_json(_SERVICE, info_text, "play status info") if isinstance(info_text, str) else None
    )
    status = int_field(info.get("status")) if isinstance(info, dict) else None
    if not isinstance(info, dict) or status is None:
        raise XiaomiApiError(_SERVICE, "bad_response", "play status without a status")
    detail = info.get("play_song_detail")
    detail = detail if isinstance(detail, dict) else {}
    return PlayStatus(
        status=status,
        volume=int_field(info.get("volume")),
        media_type=int_field(info.get("media_type")),
        position_ms=int_field(detail.get("position")),
        duration_ms=int_field(detail.get("duration")),
    )


class MinaClient:
    """MiNA calls, each retried once after a re-login when the token is rejected."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: XiaomiAuth,
        *,
        base_url: str = DEFAULT_MINA_URL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        user_agent: str = DEFAULT_MINA_USER_AGENT,
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

    async def device_list(self) -> list[MinaDevice]:
        """Every speaker on the account (shared devices are not listed by Xiaomi)."""

        def build(creds: ServiceCredentials) -> Outgoing:
            params = {"master": "0", "requestId": new_request_id()}
            return Outgoing(cookies=_cookies(creds), params=params)

        data = await self._transport.request("GET", "/admin/v2/device_list", build, _envelope_data)
        if not isinstance(data, list):
            raise XiaomiApiError(_SERVICE, "bad_response", "device_list data is not a list")
        return [parse_device(item) for item in data if isinstance(item, dict)]

    async def ubus(self, device_id: str, path: str, method: str, message: dict[str, Any]) -> Any:
        """Relay `ubus call <path> <method> <message>` to the speaker; returns `data`.

        Success means delivered, not done: the speaker may still drop it silently.
        """
        form = {
            "deviceId": device_id,
            "path": path,
            "method": method,
            "message": json.dumps(message, ensure_ascii=False),
        }

        def build(creds: ServiceCredentials) -> Outgoing:
            return Outgoing(cookies=_cookies(creds), form={**form, "requestId": new_request_id()})

        _LOGGER.debug("ubus %s %s", path, method)
        return await self._transport.request("POST", "/remote/ubus", build, _envelope_data)

    async def text_to_speech(self, device_id: str, text: str) -> None:
        """Speak `text` with XiaoAi's cloud TTS."""
        await self.ubus(device_id, "mibrain", "text_to_speech", {"text": text})

    async def player_operation(self, device_id: str, action: str) -> None:
        """player_play_operation: "pause", "play", "stop" or "toggle"."""
        await self.ubus(
            device_id, "mediaplayer", "player_play_operation", {"action": action, "media": _MEDIA}
        )

    async def pause(self, device_id: str) -> None:
        """Pause whatever the speaker is saying or playing."""
        await self.player_operation(device_id, "pause")

    async def stop(self, device_id: str) -> None:
        """Stop whatever the speaker is saying or playing."""
        await self.player_operation(device_id, "stop")

    async def play_status(self, device_id: str) -> PlayStatus:
        """The speaker's player state."""
        data = await self.ubus(
            device_id, "mediaplayer", "player_get_play_status", {"media": _MEDIA}
        )
        return parse_play_status(data)

    async def play_url(self, device_id: str, url: str, *, music: bool = False) -> None:
        """Play an audio URL (type 1 lights the ring as for music, type 2 does not)."""
        await self.ubus(
            device_id,
            "mediaplayer",
            "player_play_url",
            {"url": url, "type": 1 if music else 2, "media": _MEDIA},
        )

    async def play_music_url(self, device_id: str, url: str) -> None:
        """Play an audio URL as a one-item music list (player_play_music)."""
        music = {
            "payload": {
                "audio_type": "MUSIC",
                "audio_items": [
                    {
                        "item_id": {
                            "audio_id": _MUSIC_AUDIO_ID,
                            "cp": {
                                "album_id": "-1",
                                "episode_index": 0,
                                "id": _MUSIC_CP_ID,
                                "name": "xiaowei",
                            },
                        },
                        "stream": {"url": url},
                    }
                ],
                "list_params": {
                    "listId": "-1",
                    "loadmore_offset": 0,
                    "origin": "xiaowei",
                    "type": "MUSIC",
                },
            },
            "play_behavior": "REPLACE_ALL",
        }
        await self.ubus(
            device_id,
            "mediaplayer",
            "player_play_music",
            {"startaudioid": _MUSIC_AUDIO_ID, "music": json.dumps(music)},
        )

    async def play_audio(self, device_id: str, hardware: str, url: str) -> None:
        """Play an audio URL with the message this model understands."""
        if hardware.upper() in PLAY_MUSIC_HARDWARE:
            await self.play_music_url(device_id, url)
        else:
            # Type 1 is what xiaogpt's URL TTS uses.
            await self.play_url(device_id, url, music=True)

    async def set_volume(self, device_id: str, volume: int) -> None:
        """Set the speaker volume (0-100)."""
        await self.ubus(
            device_id, "mediaplayer", "player_set_volume", {"volume": volume, "media": _MEDIA}
        )


def _cookies(creds: ServiceCredentials) -> dict[str, str]:
    return {"userId": creds.user_id, "serviceToken": creds.service_token}


def _envelope_data(text: str) -> Any:
    """`data` of a MiNA `{"code", "message", "data"}` answer; a non-zero code raises."""
    body = answer_json(_SERVICE, text)
    if not isinstance(body, dict):
        raise XiaomiApiError(_SERVICE, "bad_response", "answer is not a JSON object")
    code = body.get("code")
    if code != 0:
        raise XiaomiApiError(_SERVICE, code, text_field(body.get("message"))[:120])
    return body.get("data")
