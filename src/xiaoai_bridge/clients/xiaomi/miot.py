"""MIoT cloud client: signed requests, spec actions and properties, the speaker action table."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from xiaoai_bridge.clients.xiaomi.answers import answer_json, int_field, text_field
from xiaoai_bridge.clients.xiaomi.auth import SID_MIOT, ServiceCredentials, XiaomiAuth
from xiaoai_bridge.clients.xiaomi.errors import TokenExpiredError, XiaomiApiError
from xiaoai_bridge.clients.xiaomi.transport import Outgoing, ServiceTransport

_LOGGER = logging.getLogger(__name__)

DEFAULT_MIOT_URL = "https://api.io.mi.com/app"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MIOT_USER_AGENT = "iOS-14.4-6.0.103-iPhone12,3--xiaoai-bridge-iPhone"
_SERVICE = "MIoT"
_AUTH_ERROR_CODE = 3  # {"code":3,"message":"auth err"}: the xiaomiio token expired
_ERROR_HINTS = {-704010000: "the device does not belong to this account"}
_NO_CODE = -1  # an answer item whose `code` is not a number
_MIOT_HEADERS = {"x-xiaomi-protocal-flag-cli": "PROTOCAL-HTTP2"}


# --- signing (the "legacy" HMAC scheme: plain form in, plain JSON out) ----------------------


def make_nonce(random_bytes: bytes | None = None, unix_time: float | None = None) -> str:
    """8 random bytes then the minutes since the epoch as a big-endian uint32, base64."""
    rand = random_bytes if random_bytes is not None else os.urandom(8)
    minutes = int((unix_time if unix_time is not None else time.time()) / 60)
    return base64.b64encode(rand + minutes.to_bytes(4, "big")).decode()


def signed_nonce(ssecurity: str, nonce: str) -> str:
    """base64(SHA256(ssecurity bytes + nonce bytes)): the per-request key."""
    digest = hashlib.sha256(base64.b64decode(ssecurity) + base64.b64decode(nonce)).digest()
    return base64.b64encode(digest).decode()


def signature(uri: str, signed: str, nonce: str, data: str) -> str:
    """base64(HMAC-SHA256(signed nonce, "<uri>&<signed nonce>&<nonce>&data=<data>")).

    `uri` is the path below `/app`, e.g. `/miotspec/action`.
    """
    message = f"{uri}&{signed}&{nonce}&data={data}".encode()
    mac = hmac.new(base64.b64decode(signed), message, hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def signed_form(uri: str, data: str, ssecurity: str, nonce: str) -> dict[str, str]:
    """The POST form of a MIoT request: `_nonce`, `data`, `signature`."""
    signed = signed_nonce(ssecurity, nonce)
    return {"_nonce": nonce, "data": data, "signature": signature(uri, signed, nonce, data)}


# --- the per-model action table --------------------------------------------------------------

SiidAiid = tuple[int, int]


@dataclass(frozen=True, slots=True)
class SpeakerActions:
    """Where a speaker model keeps its intelligent-speaker actions (siid, aiid)."""

    play_text: SiidAiid | None
    wake_up: SiidAiid | None
    execute_text_directive: SiidAiid | None
    # (siid, piid, value meaning "playing") where the property is readable.
    playing_property: tuple[int, int, int] | None = None
    # execute-text-directive's "silent" argument: a bool on most models, uint8 on some.
    silent_as_int: bool = False
    # Models whose ubus text_to_speech is unreliable: speak through play-text instead.
    prefer_miot_tts: bool = False
    # Whether MiNA player_get_play_status tells when speech ends (pacing depends on it).
    reports_play_status: bool = True


DEFAULT_SPEAKER_ACTIONS = SpeakerActions(
    play_text=(5, 1), wake_up=(5, 3), execute_text_directive=(5, 5)
)

_SPEC5 = DEFAULT_SPEAKER_ACTIONS
_SPEC7 = SpeakerActions(play_text=(7, 3), wake_up=(7, 1), execute_text_directive=(7, 4))
_SPEC7_PLAYING = SpeakerActions(
    play_text=(7, 3), wake_up=(7, 1), execute_text_directive=(7, 4), playing_property=(3, 1, 1)
)
_SPEC7_SCREEN = SpeakerActions(
    play_text=(7, 3), wake_up=(7, 1), execute_text_directive=(7, 4), reports_play_status=False
)
_MINI = SpeakerActions(play_text=(5, 1), wake_up=(5, 2), execute_text_directive=(5, 5))
_PLAY = SpeakerActions(
    play_text=(5, 3),
    wake_up=(5, 1),
    execute_text_directive=(5, 4),
    prefer_miot_tts=True,
    reports_play_status=False,
)

# Keyed by MiNA `hardware` (upper case). From the research note's table (xiaogpt, mi-gpt,
# xiaomusic and miot-spec pages); rows marked unsure there leave the entry None here.
SPEAKER_ACTIONS: Mapping[str, SpeakerActions] = {
    "LX06": _SPEC5,  # its playing-state property is notify-only, MiNA status works
    "OH2P": _SPEC7_PLAYING,
    "L15A": _SPEC7_PLAYING,
    "L16A": _SPEC7_PLAYING,
    "L17A": _SPEC7_PLAYING,
    "X08E": _SPEC7_SCREEN,
    "X6A": _SPEC7_SCREEN,
    "X8F": _SPEC7_SCREEN,
    "X10A": SpeakerActions(
        play_text=(7, 3), wake_up=(7, 1), execute_text_directive=(7, 4), prefer_miot_tts=True
    ),
    "S12": _SPEC5,
    "S12A": _SPEC5,
    "LX5A": _SPEC5,
    "LX05A": _SPEC5,
    "LX05": SpeakerActions(
        play_text=(5, 1), wake_up=(5, 3), execute_text_directive=(5, 5), playing_property=(3, 1, 1)
    ),
    "LX01": _MINI,
    "L06A": _MINI,
    "LX04": SpeakerActions(
        play_text=(5, 1),
        wake_up=(5, 2),
        execute_text_directive=(5, 4),
        prefer_miot_tts=True,
        reports_play_status=False,
    ),
    "L05B": _PLAY,
    "L05C": _PLAY,
    "L09A": SpeakerActions(
        play_text=(3, 1),
        wake_up=(3, 2),
        execute_text_directive=(3, 5),
        playing_property=(2, 1, 1),
        silent_as_int=True,
    ),
    "X4B": SpeakerActions(
        play_text=(5, 3), wake_up=(5, 1), execute_text_directive=None, reports_play_status=False
    ),
    "ASX4B": SpeakerActions(
        play_text=(5, 3), wake_up=(5, 1), execute_text_directive=None, reports_play_status=False
    ),
    "OH2": SpeakerActions(play_text=(5, 3), wake_up=None, execute_text_directive=None),
    # Unsupported by every known project.
    "SM4": SpeakerActions(
        play_text=None, wake_up=None, execute_text_directive=None, reports_play_status=False
    ),
}


def hardware_of(model_or_hardware: str) -> str:
    """`xiaomi.wifispeaker.lx06` or `lx06` -> `LX06`."""
    return model_or_hardware.rsplit(".", 1)[-1].upper()


def is_known_model(model_or_hardware: str) -> bool:
    """True when the action table has a row for this model."""
    return hardware_of(model_or_hardware) in SPEAKER_ACTIONS


def speaker_actions(
    model_or_hardware: str, overrides: Mapping[str, SpeakerActions] | None = None
) -> SpeakerActions:
    """The model's row (config overrides first), else the common 5-1/5-3/5-5 layout."""
    hardware = hardware_of(model_or_hardware)
    if overrides:
        for key, actions in overrides.items():
            if hardware_of(key) == hardware:
                return actions
    return SPEAKER_ACTIONS.get(hardware, DEFAULT_SPEAKER_ACTIONS)


# --- the client ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MiotDevice:
    """One device of /home/device_list."""

    did: str
    name: str
    model: str
    online: bool


@dataclass(frozen=True, slots=True)
class PropertyValue:
    """One answer item of /miotspec/prop/get or prop/set; `code` 0 means it worked."""

    did: str
    siid: int
    piid: int
    code: int
    value: Any = None


class MiotClient:
    """Signed MIoT calls, retried once after a re-login when the token is rejected."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: XiaomiAuth,
        *,
        base_url: str = DEFAULT_MIOT_URL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        user_agent: str = DEFAULT_MIOT_USER_AGENT,
        nonce_factory: Callable[[], str] = make_nonce,
    ) -> None:
        self._transport = ServiceTransport(
            session,
            auth,
            service=_SERVICE,
            sid=SID_MIOT,
            base_url=base_url,
            timeout_s=timeout_s,
            user_agent=user_agent,
        )
        self._nonce_factory = nonce_factory

    async def request(self, uri: str, data: Mapping[str, Any]) -> Any:
        """POST a signed request to `<base><uri>` and return its `result`."""
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)

        def build(creds: ServiceCredentials) -> Outgoing:
            # A fresh nonce per attempt: the server refuses a nonce it has seen.
            form = signed_form(uri, payload, creds.ssecurity, self._nonce_factory())
            cookies = {
                "userId": creds.user_id,
                "serviceToken": creds.service_token,
                "PassportDeviceId": creds.device_id,
            }
            return Outgoing(cookies=cookies, form=form, headers=_MIOT_HEADERS)

        def parse(text: str) -> Any:
            return _result(uri, text)

        _LOGGER.debug("MIoT %s", uri)
        return await self._transport.request("POST", uri, build, parse)

    async def device_list(self) -> list[MiotDevice]:
        """Every device on the account."""
        result = await self.request(
            "/home/device_list", {"getVirtualModel": False, "getHuamiDevices": 0}
        )
        items = result.get("list") if isinstance(result, dict) else None
        if items is None:
            items = []
        if not isinstance(items, list):
            raise XiaomiApiError(_SERVICE, "bad_response", "device_list without a list")
        return [
            MiotDevice(
                did=text_field(item.get("did")),
                name=text_field(item.get("name")),
                model=text_field(item.get("model")),
                online=bool(item.get("isOnline")),
            )
            for item in items
            if isinstance(item, dict)
        ]

    async def get_properties(
        self, did: str, properties: Sequence[tuple[int, int]]
    ) -> list[PropertyValue]:
        """Read properties (siid, piid); check each item's `code`."""
        params = [{"did": did, "siid": siid, "piid": piid} for siid, piid in properties]
        return _property_values(await self.request("/miotspec/prop/get", {"params": params}))

    async def set_property(self, did: str, siid: int, piid: int, value: Any) -> None:
        """Write one property; raises if the device refuses."""
        params = [{"did": did, "siid": siid, "piid": piid, "value": value}]
        for item in _property_values(await self.request("/miotspec/prop/set", {"params": params})):
            if item.code != 0:
                raise _item_error("MIoT prop/set", item.code)

    async def action(
        self, did: str, siid: int, aiid: int, args: Sequence[Any] = ()
    ) -> dict[str, Any]:
        """Run a spec action; raises unless the result's `code` is 0."""
        params = {"did": did, "siid": siid, "aiid": aiid, "in": list(args)}
        result = await self.request("/miotspec/action", {"params": params})
        if not isinstance(result, dict):
            raise XiaomiApiError(_SERVICE, "bad_response", "action result is not an object")
        code = result.get("code", 0)
        if code != 0:
            raise _item_error("MIoT action", code)
        return result

    async def play_text(self, did: str, actions: SpeakerActions, text: str) -> None:
        """Speak `text` through the model's play-text action."""
        await self.action(did, *_need(actions.play_text, "play-text"), [text])

    async def wake_up(self, did: str, actions: SpeakerActions) -> None:
        """Make the speaker listen, as after its wake word."""
        await self.action(did, *_need(actions.wake_up, "wake-up"))

    async def execute_text_directive(
        self, did: str, actions: SpeakerActions, text: str, *, silent: bool = True
    ) -> None:
        """Act as if the user had said `text`; `silent` suppresses XiaoAi's spoken reply."""
        flag: bool | int = int(silent) if actions.silent_as_int else silent
        where = _need(actions.execute_text_directive, "execute-text-directive")
        await self.action(did, *where, [text, flag])

    async def is_playing(self, did: str, actions: SpeakerActions) -> bool | None:
        """Read the model's playing-state property; None where the model has none."""
        if actions.playing_property is None:
            return None
        siid, piid, playing = actions.playing_property
        items = await self.get_properties(did, [(siid, piid)])
        if len(items) != 1:
            raise XiaomiApiError(_SERVICE, "bad_response", "prop/get did not answer one item")
        (item,) = items
        if item.code != 0:
            raise _item_error("MIoT prop/get", item.code)
        return bool(item.value == playing)


def _result(uri: str, text: str) -> Any:
    body = answer_json(_SERVICE, text)
    if not isinstance(body, dict):
        raise XiaomiApiError(_SERVICE, "bad_response", "answer is not a JSON object")
    message = text_field(body.get("message"))
    code = body.get("code")
    if code == _AUTH_ERROR_CODE or "auth" in message.lower():
        raise TokenExpiredError("MIoT rejected the xiaomiio service token")
    if "signature" in message.lower():
        # Xiaomi answers {"code":0,"message":"invalid signature"}: the ssecurity no longer
        # matches the token, and logging in again issues a matching pair.
        raise TokenExpiredError("MIoT rejected the request signature")
    if code != 0:
        raise XiaomiApiError(_SERVICE, code, message[:120] or uri)
    if "result" not in body:
        raise XiaomiApiError(_SERVICE, "bad_response", f"{uri}: answer without a result")
    return body["result"]


def _property_values(result: Any) -> list[PropertyValue]:
    if not isinstance(result, list):
        raise XiaomiApiError(_SERVICE, "bad_response", "property result is not a list")
    return [
        PropertyValue(
            did=text_field(item.get("did")),
            siid=int_field(item.get("siid"), 0),
            piid=int_field(item.get("piid"), 0),
            # No code means it worked; a code that is not a number did not say so.
            code=0 if item.get("code") is None else int_field(item.get("code"), _NO_CODE),
            value=item.get("value"),
        )
        for item in result
        if isinstance(item, dict)
    ]


def _item_error(service: str, code: object) -> XiaomiApiError:
    hint = _ERROR_HINTS.get(code, "the device refused") if isinstance(code, int) else ""
    return XiaomiApiError(service, code, hint or "the device refused")


def _need(where: SiidAiid | None, name: str) -> SiidAiid:
    if where is None:
        raise XiaomiApiError(_SERVICE, "unsupported", f"this speaker model has no {name} action")
    return where
