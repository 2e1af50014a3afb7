"""A fake Xiaomi cloud on loopback: account login, STS, MiNA, conversation log and MIoT.

It speaks the wire format of the real hosts as the research note describes it, each service
under its own path prefix (`endpoints` gives the base URLs to hand to the clients), and it
records every call with its arrival time. Shapes the note marks as unknown are chosen here
and say so in a comment.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import secrets
import time
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

ACCOUNT = "account"
STS = "sts"
MINA = "mina"
CONVERSATION = "conversation"
MIOT = "miot"
_PREFIXES = {
    ACCOUNT: "/account",
    STS: "/sts",
    MINA: "/mina",
    CONVERSATION: "/userprofile",
    MIOT: "/miot/app",
}
_JSON_PREFIX = "&&&START&&&"
_UBUS_OK = (
    "Msg has been successfully proxy to the device, this service is a simple proxy "
    "and it's not responsible for the result of execution"
)
_HTML_401 = "<html><head><title>401 Unauthorized</title></head><body>Unauthorized</body></html>"
_NOT_OWNED = -704010000


# Answers no parser may die of, whatever service they come from: deep nesting, a body that
# is not an object, invalid UTF-8, an HTML error page with status 200, JSON cut short, an
# envelope whose fields have the wrong types or hold hostile JSON strings.
_DEEP = b"[" * 100_000 + b"]" * 100_000
_DEEP_TEXT = "[" * 100_000 + "]" * 100_000
HOSTILE_BODIES: dict[str, bytes] = {
    "deep nesting": _DEEP,
    "deep nesting in an object": b'{"code":0,"data":' + _DEEP + b"}",
    "a list": b"[1,2,3]",
    "null": b"null",
    "a string": b'"ok"',
    "invalid UTF-8": b'{"code":0,"message":"\xff\xfe","data":"\xc3\x28"}',
    "an HTML page": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    "truncated": b'{"code":0,"message":"Success","data":{"rec',
    "empty": b"",
    "data of the wrong type": b'{"code":0,"message":"ok","data":12,"result":12}',
    "fields of the wrong type": json.dumps(
        {
            "code": 0,
            "message": ["not", "text"],
            "data": {"records": 5, "info": 7, "list": 5},
            "result": {"list": 5, "code": {"x": 1}},
        }
    ).encode(),
    "records of the wrong types": json.dumps(
        {
            "code": 0,
            "message": "Success",
            "data": json.dumps(
                {
                    "records": [
                        {"time": 10**400, "query": "x", "answers": 5},
                        {"time": True, "query": ["x"], "answers": [{"type": 5, "tts": 3}]},
                        {"time": "1", "query": "x"},
                        7,
                    ],
                    "nextEndTime": "soon",
                }
            ),
        }
    ).encode(),
    "hostile JSON in a string field": json.dumps(
        {"code": 0, "message": "ok", "data": _DEEP_TEXT}
    ).encode(),
    "hostile JSON in info": json.dumps(
        {"code": 0, "message": "ok", "data": {"code": 0, "info": _DEEP_TEXT}}
    ).encode(),
    "info that is JSON but no object": json.dumps(
        {"code": 0, "message": "ok", "data": {"code": 0, "info": "[1]"}}
    ).encode(),
    "properties of the wrong types": json.dumps(
        {
            "code": 0,
            "message": "",
            "result": [
                {"did": 1, "siid": "x", "piid": [1], "code": "bad", "value": 1},
                {"siid": 10**400, "piid": 1.5, "code": None},
            ],
        }
    ).encode(),
}


@dataclass(frozen=True)
class Canned:
    """A raw answer served instead of the real one (see `serve_raw`)."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    # Promise this many more bytes than are sent, then drop the connection.
    cut_short: bool = False


@dataclass
class Call:
    """One request the fake received."""

    time: float
    service: str
    method: str
    path: str  # below the service prefix, e.g. "/pass/serviceLogin"
    query: dict[str, str]
    form: dict[str, str]
    cookies: dict[str, str]
    status: int = 0


@dataclass(frozen=True)
class UbusCall:
    """One ubus call relayed to a fake speaker."""

    time: float
    device_id: str
    path: str
    method: str
    message: dict[str, Any]


@dataclass(frozen=True)
class ActionCall:
    """One MIoT action the fake accepted."""

    time: float
    did: str
    siid: int
    aiid: int
    args: list[Any]


@dataclass
class FakeSpeaker:
    """A speaker on the fake account."""

    device_id: str
    name: str
    hardware: str
    miot_did: str
    alias: str = ""
    serial_number: str = "12345/A1B2C3"
    presence: str = "online"
    volume: int = 50
    status: int = 0
    playing_until: float | None = None
    # The device's LAN (miio) token, which the MIoT device list always carries.
    miot_token: str = field(default_factory=lambda: secrets.token_hex(16))
    records: list[dict[str, Any]] = field(default_factory=list)  # oldest first


@dataclass(frozen=True)
class Fetch:
    """An audio URL a fake speaker fetched, as a real one does after a play-URL call."""

    time: float
    device_id: str
    url: str
    status: int
    data: bytes


def _wav_seconds(data: bytes) -> float:
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            return wav.getnframes() / wav.getframerate()
    except (wave.Error, EOFError, ZeroDivisionError):
        return 0.0


class FakeXiaomiCloud:
    """`async with FakeXiaomiCloud() as cloud:` serves on 127.0.0.1 on a free port."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.account = "13800000000"
        self.password = "correct horse battery"
        self.user_id = 2233445566
        # None, "invalid" (70016), "captcha" (87001) or "verification" (securityStatus 16).
        self.login_failure: str | None = None
        # Seconds a TTS keeps the fake speaker "playing", per character.
        self.seconds_per_char = 0.0
        self.calls: list[Call] = []
        self.ubus_calls: list[UbusCall] = []
        self.action_calls: list[ActionCall] = []
        self.fetches: list[Fetch] = []
        self._fetch_tasks: set[asyncio.Task[None]] = set()
        self._client: aiohttp.ClientSession | None = None
        self.speakers: dict[str, FakeSpeaker] = {}
        self.properties: dict[tuple[str, int, int], Any] = {}
        self.pass_tokens: set[str] = set()
        self.service_tokens: dict[str, tuple[str, str]] = {}  # token -> (sid, ssecurity)
        self._tickets: dict[str, tuple[str, int, str]] = {}  # _ssign -> (sid, nonce, ssecurity)
        self._nonces: set[str] = set()
        # service -> statuses (0 = stall) or raw answers, served before the real ones
        self._faults: dict[str, list[int | Canned]] = {}
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.add_speaker("小爱音箱Pro", "LX06", miot_did="123456789")

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> FakeXiaomiCloud:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/account/pass/serviceLogin", self._service_login)
        app.router.add_post("/account/pass/serviceLoginAuth2", self._service_login_auth2)
        app.router.add_get("/sts/{sid}", self._sts)
        app.router.add_get("/mina/admin/v2/device_list", self._device_list)
        app.router.add_post("/mina/remote/ubus", self._ubus)
        app.router.add_get("/userprofile/device_profile/v2/conversation", self._conversation)
        app.router.add_post("/miot/app/{uri:.+}", self._miot)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._client = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        for task in self._fetch_tasks:
            task.cancel()
        if self._fetch_tasks:
            await asyncio.wait(self._fetch_tasks)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def endpoints(self) -> dict[str, str]:
        """Base URLs for the clients: account, mina, conversation, miot."""
        return {
            "account": self.url + _PREFIXES[ACCOUNT],
            "mina": self.url + _PREFIXES[MINA],
            "conversation": self.url + _PREFIXES[CONVERSATION],
            "miot": self.url + _PREFIXES[MIOT],
        }

    # --- test helpers ---------------------------------------------------------------------

    def add_speaker(self, name: str, hardware: str, *, miot_did: str = "") -> FakeSpeaker:
        """Put another speaker on the account."""
        speaker = FakeSpeaker(
            device_id=str(uuid.uuid4()),
            name=name,
            hardware=hardware,
            miot_did=miot_did or str(100000000 + len(self.speakers)),
        )
        self.speakers[speaker.device_id] = speaker
        return speaker

    @property
    def speaker(self) -> FakeSpeaker:
        """The first speaker."""
        return next(iter(self.speakers.values()))

    def say(
        self,
        query: str,
        *,
        device_id: str | None = None,
        answer: str = "好的",
        time_ms: int | None = None,
    ) -> dict[str, Any]:
        """Add a conversation record "said now" (or at `time_ms`) and return it."""
        speaker = self.speakers[device_id] if device_id else self.speaker
        record = {
            "bitSet": [0, 1, 1, 1, 1],
            "answers": [
                {"bitSet": [0, 1, 1, 1], "type": "TTS", "tts": {"bitSet": [0, 1], "text": answer}}
            ],
            "time": time_ms if time_ms is not None else int(self.clock() * 1000),
            "query": query,
            "requestId": uuid.uuid4().hex,
        }
        speaker.records.append(record)
        speaker.records.sort(key=lambda item: item["time"])
        return record

    def expire_tokens(self, sid: str | None = None) -> None:
        """Make issued service tokens invalid (all, or one sid's), as after ~10 h."""
        for token, (token_sid, _) in list(self.service_tokens.items()):
            if sid is None or token_sid == sid:
                del self.service_tokens[token]

    def expire_pass_tokens(self) -> None:
        """Make every passToken invalid, so the next login needs the password."""
        self.pass_tokens.clear()

    def fail(self, service: str, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` requests to `service` with HTTP `status`."""
        self._faults.setdefault(service, []).extend([status] * times)

    def stall(self, service: str, times: int = 1) -> None:
        """Hold the next `times` requests to `service` until the fake closes (a timeout)."""
        self._faults.setdefault(service, []).extend([0] * times)

    def serve_raw(
        self,
        service: str,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "application/json",
        cut_short: bool = False,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests to `service` with exactly `body`.

        `cut_short` announces a longer body than it sends and closes the connection.
        """
        canned = Canned(body, status, content_type, cut_short)
        self._faults.setdefault(service, []).extend([canned] * times)

    @property
    def faults_pending(self) -> int:
        """Failures and raw answers not served yet."""
        return sum(len(faults) for faults in self._faults.values())

    def calls_to(self, service: str, path: str | None = None) -> list[Call]:
        """Recorded calls to one service (and path)."""
        return [
            call
            for call in self.calls
            if call.service == service and (path is None or call.path == path)
        ]

    @property
    def password_logins(self) -> int:
        """How many times a client posted the password."""
        return len(self.calls_to(ACCOUNT, "/pass/serviceLoginAuth2"))

    def tts_texts(self, device_id: str | None = None) -> list[str]:
        """Texts sent to text_to_speech, in order."""
        return [
            str(call.message.get("text"))
            for call in self.ubus_calls
            if call.method == "text_to_speech" and device_id in (None, call.device_id)
        ]

    def player_operations(self, device_id: str | None = None) -> list[str]:
        """Actions sent to player_play_operation (pause, stop, ...), in order."""
        return [
            str(call.message.get("action"))
            for call in self.ubus_calls
            if call.method == "player_play_operation" and device_id in (None, call.device_id)
        ]

    def played_urls(self, device_id: str | None = None) -> list[str]:
        """URLs sent to player_play_url or player_play_music, in order."""
        urls = []
        for call in self.ubus_calls:
            if device_id not in (None, call.device_id):
                continue
            if call.method == "player_play_url":
                urls.append(str(call.message.get("url")))
            elif call.method == "player_play_music":
                urls.append(_music_url(call.message))
        return urls

    # --- plumbing -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        service = next(
            (name for name, prefix in _PREFIXES.items() if request.path.startswith(prefix + "/")),
            "unknown",
        )
        form: dict[str, str] = {}
        if request.method == "POST":
            form = {key: str(value) for key, value in (await request.post()).items()}
        call = Call(
            time=self.clock(),
            service=service,
            method=request.method,
            path=request.path.removeprefix(_PREFIXES.get(service, "")),
            query=dict(request.query),
            form=form,
            cookies=dict(request.cookies),
        )
        self.calls.append(call)
        faults = self._faults.get(service)
        if faults:
            status = faults.pop(0)
            if isinstance(status, Canned):
                call.status = status.status
                return await self._serve_canned(request, status)
            if status == 0:
                await self._release.wait()
                status = 504
            call.status = status
            return web.Response(
                status=status,
                text=f"<html><body>{status} error</body></html>",
                content_type="text/html",
            )
        response = await handler(request)
        call.status = response.status
        return response

    @staticmethod
    async def _serve_canned(request: web.Request, canned: Canned) -> web.StreamResponse:
        if not canned.cut_short:
            return web.Response(
                status=canned.status,
                body=canned.body,
                headers={"Content-Type": canned.content_type},
            )
        response = web.StreamResponse(
            status=canned.status, headers={"Content-Type": canned.content_type}
        )
        response.content_length = len(canned.body) + 1000
        await response.prepare(request)
        await response.write(canned.body)
        if request.transport is not None:
            request.transport.close()
        return response

    def _session_ssecurity(self, request: web.Request, sid: str) -> str | None:
        """The ssecurity of a valid serviceToken cookie for `sid`, with the right userId."""
        token = request.cookies.get("serviceToken", "")
        entry = self.service_tokens.get(token)
        if entry is None or entry[0] != sid:
            return None
        if request.cookies.get("userId") != str(self.user_id):
            return None
        return entry[1]

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.Response(status=401, text=_HTML_401, content_type="text/html")

    @staticmethod
    def _login_json(body: dict[str, Any]) -> web.Response:
        return web.Response(
            text=_JSON_PREFIX + json.dumps(body, ensure_ascii=False),
            content_type="application/json",
        )

    # --- account.xiaomi.com ---------------------------------------------------------------

    def _ticket(self, sid: str, *, pwd: int, pass_token: str = "") -> dict[str, Any]:
        ssecurity = base64.b64encode(secrets.token_bytes(16)).decode()
        nonce = 10**18 + secrets.randbelow(9 * 10**18)  # a 19-digit JSON number
        pass_token = pass_token or "V1:" + base64.b64encode(secrets.token_bytes(24)).decode()
        self.pass_tokens.add(pass_token)
        # Contains + / = so a client that does not keep the encoding breaks, as on the real STS.
        ssign = base64.b64encode(secrets.token_bytes(21)).decode()
        self._tickets[ssign] = (sid, nonce, ssecurity)
        query = urlencode(
            {
                "d": "wb_fake",
                "ticket": "0",
                "pwd": str(pwd),
                "p_ts": str(int(self.clock() * 1000)),
                "nonce": str(nonce),
                "_ssign": ssign,
            },
            quote_via=quote,
        )
        return {
            "qs": "%3Fsid%3D" + sid,
            "ssecurity": ssecurity,
            "code": 0,
            "passToken": pass_token,
            "description": "成功",
            "securityStatus": 0,
            "nonce": nonce,
            "userId": self.user_id,
            "cUserId": "c_" + secrets.token_urlsafe(12),
            "result": "ok",
            "psecurity": base64.b64encode(secrets.token_bytes(16)).decode(),
            "captchaUrl": None,
            "location": f"{self.url}/sts/{sid}?{query}",
            "pwd": 1,
            "child": 0,
            "desc": "成功",
        }

    def _needs_password(self, sid: str) -> dict[str, Any]:
        return {
            "serviceParam": '{"checkSafePhone":false}',
            "qs": f"%3Fsid%3D{sid}%26_json%3Dtrue",
            "code": 70016,
            "description": "登录验证失败",
            "securityStatus": 0,
            "_sign": base64.b64encode(secrets.token_bytes(20)).decode(),
            "sid": sid,
            "result": "error",
            "captchaUrl": None,
            "callback": f"https://sts.example.invalid/sts/{sid}",
            "location": f"/fe/service/login?_json=true&sid={sid}",
            "pwd": 0,
            "child": 0,
            "desc": "登录验证失败",
        }

    async def _service_login(self, request: web.Request) -> web.Response:
        sid = request.query.get("sid", "")
        if request.query.get("_json") != "true" or not sid:
            return web.Response(status=400, text="bad request")
        if self.login_failure == "captcha":
            # Shape unknown beyond "87001 without qs" (research note appendix 1).
            return self._login_json(
                {"code": 87001, "desc": "验证码错误", "captchaUrl": "/pass/getCode?icodeType=login"}
            )
        pass_token = request.cookies.get("passToken", "")
        if pass_token in self.pass_tokens and request.cookies.get("userId") == str(self.user_id):
            # The location says pwd=0 while the body keeps "pwd": 1 (research note appendix 8).
            body = self._ticket(sid, pwd=0, pass_token=pass_token)
            body["notificationUrl"] = ""
            return self._login_json(body)
        return self._login_json(self._needs_password(sid))

    async def _service_login_auth2(self, request: web.Request) -> web.Response:
        form = await request.post()
        sid = str(form.get("sid", ""))
        required = ("_json", "qs", "sid", "_sign", "callback", "user", "hash")
        if any(not form.get(name) for name in required):
            return web.Response(status=400, text="missing form field")
        if self.login_failure == "captcha":
            return self._login_json({"code": 87001, "desc": "验证码错误"})
        expected = hashlib.md5(self.password.encode(), usedforsecurity=False).hexdigest().upper()
        if (
            self.login_failure == "invalid"
            or form.get("user") not in (self.account, str(self.user_id))
            or form.get("hash") != expected
        ):
            body = self._needs_password(sid)
            body["location"] = ""
            return self._login_json(body)
        if self.login_failure == "verification":
            context = secrets.token_urlsafe(16)
            return self._login_json(
                {
                    "code": 0,
                    "result": "ok",
                    "desc": "成功",
                    "securityStatus": 16,
                    "location": "",
                    "notificationUrl": f"{self.url}/account/identity/authStart?sid={sid}"
                    f"&context={context}&_locale=zh_CN",
                }
            )
        return self._login_json(self._ticket(sid, pwd=1))

    async def _sts(self, request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        ticket = self._tickets.pop(request.query.get("_ssign", ""), None)
        if ticket is None or ticket[0] != sid or request.query.get("nonce") != str(ticket[1]):
            return web.Response(status=403, text="invalid ticket")
        _, nonce, ssecurity = ticket
        digest = hashlib.sha1(f"nonce={nonce}&{ssecurity}".encode(), usedforsecurity=False)
        if request.query.get("clientSign") != base64.b64encode(digest.digest()).decode():
            return web.Response(status=403, text="invalid clientSign")
        token = secrets.token_urlsafe(48)
        self.service_tokens[token] = (sid, ssecurity)
        if sid == "micoapi":
            response = web.json_response({"R": "", "S": "OK"})
        else:
            response = web.Response(text="ok")
        response.set_cookie("serviceToken", token, path="/", httponly=True)
        response.set_cookie("userId", str(self.user_id), path="/")
        return response

    # --- MiNA ------------------------------------------------------------------------------

    async def _device_list(self, request: web.Request) -> web.Response:
        if self._session_ssecurity(request, "micoapi") is None:
            return self._unauthorized()
        data = [
            {
                "deviceID": speaker.device_id,
                "serialNumber": speaker.serial_number,
                "name": speaker.name,
                "alias": speaker.alias or speaker.name,
                "current": False,
                "presence": speaker.presence,
                "address": "192.168.1.50",
                "miotDID": speaker.miot_did,
                "hardware": speaker.hardware,
                "romVersion": "1.80.11",
                "capabilities": {"yunduantts": 1, "multiroom_music": 1},
                "deviceSNProfile": "fake",
                "deviceProfile": "fake",
                "brokerEndpoint": "fake",
                "brokerIndex": 0,
                "mac": "AA:BB:CC:DD:EE:FF",
                "ssid": "home",
            }
            for speaker in self.speakers.values()
        ]
        return web.json_response({"code": 0, "message": "Success", "data": data})

    async def _ubus(self, request: web.Request) -> web.Response:
        if self._session_ssecurity(request, "micoapi") is None:
            return self._unauthorized()
        form = await request.post()
        speaker = self.speakers.get(str(form.get("deviceId", "")))
        if speaker is None:
            # Unknown-device answer: shape not captured (research note), chosen here.
            return web.json_response({"code": 101, "message": "device not found", "data": None})
        try:
            message = json.loads(str(form.get("message", "")))
        except ValueError:
            return web.json_response({"code": 400, "message": "bad message", "data": None})
        path, method = str(form.get("path", "")), str(form.get("method", ""))
        self.ubus_calls.append(UbusCall(self.clock(), speaker.device_id, path, method, message))
        info: dict[str, Any] = {}
        if method == "text_to_speech":
            speaker.status = 1
            text = str(message.get("text", ""))
            speaker.playing_until = self.clock() + len(text) * self.seconds_per_char
        elif method in ("player_play_url", "player_play_music"):
            url = message.get("url") if method == "player_play_url" else _music_url(message)
            # Playing from now on; how long is known once the speaker has the file.
            speaker.status = 1
            speaker.playing_until = None
            task = asyncio.create_task(self._fetch(speaker, str(url)))
            self._fetch_tasks.add(task)
            task.add_done_callback(self._fetch_tasks.discard)
        elif method == "player_play_operation":
            action = message.get("action")
            speaker.status = {"pause": 2, "stop": 3, "play": 1}.get(str(action), speaker.status)
            speaker.playing_until = None
        elif method == "player_get_play_status":
            self._settle(speaker)
            info = {"status": speaker.status, "volume": speaker.volume, "loop_type": 1}
        elif method == "player_set_volume":
            speaker.volume = int(message.get("volume", speaker.volume))
        # `info` is a JSON string, written with spaces as the real one is.
        data = {"code": 0, "info": json.dumps(info)}
        return web.json_response({"code": 0, "message": _UBUS_OK, "data": data})

    async def _fetch(self, speaker: FakeSpeaker, url: str) -> None:
        """Download the audio as the speaker would and play it for the WAV's length."""
        assert self._client is not None
        status, data = 0, b""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self._client.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                status, data = resp.status, await resp.read()
        self.fetches.append(Fetch(self.clock(), speaker.device_id, url, status, data))
        if speaker.status == 1 and speaker.playing_until is None:
            seconds = _wav_seconds(data) if status == 200 else 0.0
            speaker.playing_until = self.clock() + seconds

    def _settle(self, speaker: FakeSpeaker) -> None:
        if (
            speaker.status == 1
            and speaker.playing_until is not None
            and self.clock() >= speaker.playing_until
        ):
            speaker.status = 0
            speaker.playing_until = None

    # --- conversation log ------------------------------------------------------------------

    async def _conversation(self, request: web.Request) -> web.Response:
        if "userId" not in request.cookies:
            return web.json_response(
                {
                    "code": 601,
                    "message": "illegal argument exception",
                    "data": "MissingRequestCookieException: Required cookie 'userId' for method "
                    "parameter type String is not present",
                }
            )
        speaker = self.speakers.get(request.cookies.get("deviceId", ""))
        if self._session_ssecurity(request, "micoapi") is None or speaker is None:
            return self._unauthorized()
        if request.query.get("source") != "dialogu":
            return web.json_response({"code": 400, "message": "bad source", "data": None})
        limit = int(request.query.get("limit", "2"))
        records = list(reversed(speaker.records))  # newest first
        if "timestamp" in request.query:
            upper = int(request.query["timestamp"])  # inclusive, per mi-gpt's comment
            records = [record for record in records if record["time"] <= upper]
        page = records[:limit]
        next_end = page[-1]["time"] - 1 if len(records) > limit else 0
        data = {"bitSet": [0, 1, 1], "records": page, "nextEndTime": next_end}
        return web.json_response(
            {"code": 0, "message": "Success", "data": json.dumps(data, ensure_ascii=False)}
        )

    # --- MIoT ------------------------------------------------------------------------------

    async def _miot(self, request: web.Request) -> web.Response:
        uri = "/" + request.match_info["uri"]
        ssecurity = self._session_ssecurity(request, "xiaomiio")
        if ssecurity is None:
            return web.json_response({"code": 3, "message": "auth err"})
        form = await request.post()
        nonce, data = str(form.get("_nonce", "")), str(form.get("data", ""))
        if not self.signature_ok(uri, ssecurity, nonce, data, str(form.get("signature", ""))):
            # The real answer to a bad signature (hass-xiaomi-miot issues #1943, #1951).
            return web.json_response({"code": 0, "message": "invalid signature"})
        if nonce in self._nonces:
            # Replay answer: shape not captured (research note), chosen here.
            return web.json_response({"code": -1, "message": "nonce already used"})
        self._nonces.add(nonce)
        try:
            payload = json.loads(data)
        except ValueError:
            return web.json_response({"code": -1, "message": "bad data"})
        if uri == "/miotspec/action":
            result: Any = self._action(payload["params"])
        elif uri in ("/miotspec/prop/get", "/miotspec/prop/set"):
            result = self._properties(payload["params"], write=uri.endswith("/set"))
        elif uri == "/home/device_list":
            result = {"list": self._miot_devices()}
        else:
            return web.json_response({"code": -1, "message": f"unknown api {uri}"})
        # Property answers carry an empty top-level message (research note appendix 11).
        message = "" if uri.startswith("/miotspec/prop/") else "ok"
        return web.json_response({"code": 0, "message": message, "result": result})

    @staticmethod
    def signature_ok(uri: str, ssecurity: str, nonce: str, data: str, signature: str) -> bool:
        """Check a MIoT request signature the way the real server must."""
        try:
            key = hashlib.sha256(base64.b64decode(ssecurity) + base64.b64decode(nonce)).digest()
        except ValueError:
            return False
        signed = base64.b64encode(key).decode()
        message = f"{uri}&{signed}&{nonce}&data={data}".encode()
        expected = base64.b64encode(hmac.new(key, message, "sha256").digest()).decode()
        return hmac.compare_digest(expected, signature)

    def _dids(self) -> set[str]:
        return {speaker.miot_did for speaker in self.speakers.values()}

    def _action(self, params: dict[str, Any]) -> dict[str, Any]:
        did = str(params["did"])
        owned = did in self._dids()
        if owned:
            self.action_calls.append(
                ActionCall(self.clock(), did, params["siid"], params["aiid"], params["in"])
            )
        return {
            "did": did,
            "miid": 0,
            "siid": params["siid"],
            "aiid": params["aiid"],
            "code": 0 if owned else _NOT_OWNED,
            "out": [],
            "exe_time": 0,
        }

    def _properties(self, params: list[dict[str, Any]], *, write: bool) -> list[dict[str, Any]]:
        items = []
        for param in params:
            key = (str(param["did"]), int(param["siid"]), int(param["piid"]))
            item: dict[str, Any] = {"did": key[0], "siid": key[1], "piid": key[2], "code": 0}
            if key[0] not in self._dids():
                item["code"] = _NOT_OWNED
            elif write:
                self.properties[key] = param.get("value")
            else:
                item["value"] = self.properties.get(key)
            items.append(item)
        return items

    def _miot_devices(self) -> list[dict[str, Any]]:
        return [
            {
                "did": speaker.miot_did,
                "name": speaker.name,
                "model": f"xiaomi.wifispeaker.{speaker.hardware.lower()}",
                "token": speaker.miot_token,
                "localip": "192.168.1.50",
                "mac": "AA:BB:CC:DD:EE:FF",
                "isOnline": speaker.presence == "online",
            }
            for speaker in self.speakers.values()
        ]


def _music_url(message: dict[str, Any]) -> str:
    """The stream URL inside player_play_music's `music` JSON string."""
    music = json.loads(str(message.get("music", "{}")))
    return str(music["payload"]["audio_items"][0]["stream"]["url"])
