"""The HTTP face of the service: status page, live events, /healthz, /metrics, a small API."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, SecretBytes, SecretStr

from xiaoai_bridge import __version__
from xiaoai_bridge.audio import AUDIO_PATH, NAME_RE
from xiaoai_bridge.config import ANY_HOST, HttpSettings
from xiaoai_bridge.errors import ConfigError
from xiaoai_bridge.jsonwire import parse_json
from xiaoai_bridge.log import mask_secrets
from xiaoai_bridge.metrics import BridgeMetrics
from xiaoai_bridge.models import SpeakerId
from xiaoai_bridge.pipeline.memory import source_of_legacy_device
from xiaoai_bridge.reconnect import ConnectionState, ReconnectPolicy
from xiaoai_bridge.sinks.web import WebSink
from xiaoai_bridge.sources.web import WebSource
from xiaoai_bridge.status import ConversationLog, Event

if TYPE_CHECKING:
    from xiaoai_bridge.audio import AudioStore
    from xiaoai_bridge.config import Settings
    from xiaoai_bridge.pipeline.controls import Controls
    from xiaoai_bridge.pipeline.dispatcher import Dispatcher
    from xiaoai_bridge.pipeline.toolbox import Toolbox

_LOGGER = logging.getLogger(__name__)

# Every request body is a small JSON object; anything bigger is a mistake or an attack.
MAX_BODY_BYTES = 64 * 1024
MAX_ASK_CHARS = 2000
DEVICE_RE = re.compile(r"[\w.:@-]{1,64}")
# How often a live page's connection checks the adapters and whether the page is still there.
ADAPTER_POLL_S = 1.0
# Proxies close idle streams; a comment line now and then keeps the event stream open.
KEEPALIVE_S = 15.0
# Open event streams are ended on shutdown; other requests get this long to finish.
SHUTDOWN_TIMEOUT_S = 2.0
# Each live page costs a connection and a queue; a few tabs are normal, hundreds are a mistake.
MAX_LIVE_PAGES = 32
LIVE_RETRY_AFTER_S = 30
# A page that takes longer than this to accept one write has stopped reading: it is cut off.
LIVE_WRITE_TIMEOUT_S = 10.0
# Events for a live page are gathered this long into one write: unnoticeable to a reader,
# and a burst costs each page a few writes a second instead of one per event.
LIVE_BATCH_S = 0.05
MASK = "***"
WEB_DIR = Path(__file__).parent / "web"
_ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
_OPEN_PATHS = frozenset({"/healthz"})
# What a live page is told again whenever it changes.
_LIVE_HEALTH = ("status", "adapters", "tools")
# Read by machines under names the bridge cannot know (a Docker health check, Prometheus by a
# compose service name); they show no conversation and no config, so any Host may read them.
_ANY_HOST_PATHS = frozenset({"/healthz", "/metrics"})
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})
_SAFE_METHODS = frozenset({"GET", "HEAD"})
# Sec-Fetch-Site values of requests the page itself (or the user, typing a URL) makes.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})
_JSON_TYPE = "application/json"
_CROSS_ORIGIN = (
    "cross-origin requests are refused: only the status page itself (or a client that is not a "
    "browser) may change anything"
)
_STATIC_PREFIX = "/static/"
_SECRET_NAME_RE = re.compile(r"token|passw|secret|api_?key|credential|auth", re.IGNORECASE)
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Rejected(Exception):
    """A request we refuse, with the status and the message its client gets."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def mask_url(text: str) -> str:
    """`text` with a URL's password and secret-looking query values replaced by ***."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        has_password = parts.password is not None
    except ValueError:
        return text
    netloc = parts.netloc
    if has_password:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{host}"
    query = "&".join(
        f"{key}={MASK}" if _SECRET_NAME_RE.search(unquote(key)) and value else f"{key}{sep}{value}"
        for key, sep, value in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def masked_config(settings: BaseModel) -> dict[str, Any]:
    """The effective configuration as JSON, with every secret replaced by ***."""
    masked = _mask("", settings.model_dump(mode="python"))
    assert isinstance(masked, dict)  # noqa: S101 - model_dump always returns a dict
    return masked


def _mask(name: str, value: Any) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return MASK if value.get_secret_value() else ""
    if isinstance(value, Mapping):
        return {str(key): _mask(str(key), item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask(name, item) for item in value]
    if isinstance(value, str):
        # A plain-text field named like a secret is masked too, whatever its type says.
        if value and _SECRET_NAME_RE.search(name):
            return MASK
        return mask_url(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, enum.Enum):
        return _mask(name, value.value)
    return mask_url(str(value))  # paths and other plain values


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def adapter_state(policy: ReconnectPolicy) -> dict[str, Any]:
    """One adapter's connection as /healthz reports it."""
    return {
        "state": policy.state.value,
        "since": _iso(policy.since),
        "last_error": policy.last_error or None,
        "failures": policy.failures,
        "reconnects": policy.reconnects,
    }


class ServedService(Protocol):
    """What the HTTP server reads of the running service (the app's `Service` has it)."""

    @property
    def settings(self) -> Settings:
        """The effective configuration, shown masked."""
        ...

    @property
    def controls(self) -> Controls:
        """Answering on/off and "forget", shared with the voice commands and Home Assistant."""
        ...

    @property
    def dispatcher(self) -> Dispatcher:
        """Takes questions asked here; tells the page and metrics about every answer."""
        ...

    @property
    def connections(self) -> Mapping[str, ReconnectPolicy]:
        """Adapter name -> its connection's state, for /healthz."""
        ...

    @property
    def tools(self) -> Toolbox:
        """The tool sources, each up or down (an MCP server may come and go)."""
        ...

    @property
    def audio(self) -> AudioStore | None:
        """Clips for the speakers to fetch, if the Xiaomi sink speaks by URL."""
        ...


class _AccessLogger(AbstractAccessLogger):
    """Request lines without the query string, which may carry the access token."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s -> %d in %.1f ms", request.method, request.path, response.status, time * 1000
        )


class HttpServer:
    """The status page, /healthz, /metrics and the API, serving one running service."""

    def __init__(
        self,
        service: ServedService,
        settings: HttpSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service
        self._settings = settings
        self._clock = clock
        self.metrics = BridgeMetrics(
            service.connections,
            lambda: service.dispatcher.in_flight,
            stats=lambda: service.dispatcher.stats,
            tool_sources=service.tools.report,
        )
        self.log = ConversationLog(clock=clock)
        # The "ask" box: an adapter like the others, with its own source and sink.
        self._asked = WebSource(service.dispatcher.submit, clock=clock)
        self._assets: dict[str, bytes] = {}
        self._runner: web.AppRunner | None = None
        self._host_names: frozenset[str] = frozenset()
        self._live_pages = 0
        # The adapters' health, shared by every live page polling it (time, health).
        self._polled: tuple[float, dict[str, Any]] | None = None
        self.port = 0

    @property
    def live_pages(self) -> int:
        """Live-page connections open now (at most MAX_LIVE_PAGES)."""
        return self._live_pages

    @property
    def url(self) -> str:
        """Where the status page is, e.g. http://127.0.0.1:8099/."""
        host = self._settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    async def start(self) -> None:
        """Start listening, then watch the dispatcher (the app opens it only when enabled)."""
        self._assets = await asyncio.to_thread(_load_assets)
        self._host_names = _own_host_names(self._settings)
        runner = web.AppRunner(
            self._application(),
            access_log_class=_AccessLogger,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._settings.host, self._settings.port)
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise ConfigError(
                f"http: cannot listen on {self._settings.host}:{self._settings.port}: "
                f"{err.strerror or err} (change [http] port, or set [http] enabled = false)"
            ) from err
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        dispatcher = self._service.dispatcher
        dispatcher.add_observer(self.metrics)
        dispatcher.add_observer(self.log)
        dispatcher.add_sink(WebSink())
        # The page shows every switch and forget, whoever asked (voice, Home Assistant, here).
        controls = self._service.controls
        controls.on_answering(lambda on: self.log.publish("answering", {"enabled": on}))
        controls.on_forget(
            lambda speaker, turns: self.log.publish(
                "forgot", {"source": speaker.source, "device": speaker.device, "turns": turns}
            )
        )
        _LOGGER.info("HTTP server listening on port %d: status page at %s", self.port, self.url)

    async def stop(self) -> None:
        """End the live streams and stop listening."""
        self.log.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- what the endpoints report -----------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body): healthy when every adapter the config requires is connected."""
        adapters = {
            name: adapter_state(policy)
            for name, policy in sorted(self._service.connections.items())
        }
        down = [
            name
            for name, policy in sorted(self._service.connections.items())
            if policy.state is not ConnectionState.CONNECTED
        ]
        tools = self.tool_sources()
        return not down, {
            "status": "ok" if not down else "unavailable",
            "down": down,
            "adapters": adapters,
            # A tool source that is down (an MCP server away) degrades answers, but the
            # bridge still hears and answers: detail here, never a 503.
            "tools_down": [name for name, source in tools.items() if not source["ok"]],
            "tools": tools,
            "answering": self._service.controls.answering,
            "in_flight": self._service.dispatcher.in_flight,
        }

    def tool_sources(self) -> dict[str, dict[str, Any]]:
        """Each tool source's state and tool count, by name, in the order they were added."""
        return {
            source.name: {
                "ok": source.health.ok,
                "detail": mask_secrets(source.health.detail),
                "tools": len(source.tools),
            }
            for source in self._service.tools.report()
        }

    def state(self) -> dict[str, Any]:
        """Everything the status page shows, secrets masked."""
        _, health = self.health()
        return {
            "version": __version__,
            "now": self._clock(),
            "status": health["status"],
            "adapters": health["adapters"],
            "tools_enabled": self._service.settings.tools.enabled,
            "tools": health["tools"],
            "tools_down": health["tools_down"],
            "answering": health["answering"],
            "in_flight": health["in_flight"],
            "speakers": self._speakers(),
            "conversations": self.log.snapshot(),
            "config": masked_config(self._service.settings),
        }

    def _speakers(self) -> list[str]:
        speakers = self.log.devices()
        configured = self._service.settings.homeassistant.speakers or {}
        speakers += [player for player in configured.values() if player not in speakers]
        return [speaker for speaker in speakers if speaker]

    # -- the web application -----------------------------------------------------------------

    def _application(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            # The token is checked before the body, so a stranger learns nothing of the API.
            middlewares=[self._errors, self._own_name, self._auth, self._same_origin],
        )
        app.router.add_get("/", self._page)
        app.router.add_get(_STATIC_PREFIX + "{name}", self._asset)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/ask", self._ask)
        app.router.add_post("/api/answering", self._answering)
        app.router.add_post("/api/forget", self._forget)
        if self._service.audio is not None:
            app.router.add_get(AUDIO_PATH + "{name}", self._audio)
        return app

    @web.middleware
    async def _errors(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Rejected as err:
            return _error(err.status, err.message, err.headers)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else {}
            return _error(err.status, _describe(err, request), headers)
        except Exception:
            # The request boundary: one bad request must never take the service down.
            _LOGGER.exception("HTTP %s %s failed", request.method, request.path)
            return _error(500, "internal error; the service log has the details")

    @web.middleware
    async def _own_name(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Answer only names of this machine, and no CORS preflight."""
        host = request.headers.get("Host")
        if (
            host is not None
            and request.path not in _ANY_HOST_PATHS
            # A speaker fetches clips by public_url; the clip's random name is its key.
            and not request.path.startswith(AUDIO_PATH)
            and not self._names_this_machine(host)
        ):
            # A page whose name was re-pointed at this machine (DNS rebinding) gets nothing.
            raise _Rejected(
                421,
                f"this server does not answer to the name {_host_name(host)!r} (a guard "
                "against DNS rebinding); open it by IP address or as localhost, or add the "
                "name to [http] allowed_hosts",
            )
        if request.method == "OPTIONS":
            # A CORS preflight: no other site may call the API from a browser.
            raise _Rejected(403, _CROSS_ORIGIN)
        return await handler(request)

    @web.middleware
    async def _same_origin(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Refuse changes sent by web pages of other sites, through the user's browser."""
        if request.method in _SAFE_METHODS or request.match_info.http_exception is not None:
            return await handler(request)
        if not _from_own_page(request):
            raise _Rejected(403, _CROSS_ORIGIN)
        # Only a "simple" content type skips the browser's preflight; JSON never does.
        if request.content_type != _JSON_TYPE:
            raise _Rejected(
                415,
                f"send the body as JSON with 'Content-Type: {_JSON_TYPE}' "
                f"(got {request.headers.get('Content-Type') or 'none'!r})",
            )
        return await handler(request)

    def _names_this_machine(self, host_header: str) -> bool:
        name = _host_name(host_header)
        if not name or ANY_HOST in self._host_names or name in self._host_names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True  # an address literal cannot be re-pointed by DNS

    @web.middleware
    async def _auth(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        token = self._settings.token
        if (
            token is None
            or request.path in _OPEN_PATHS
            or request.path.startswith(_STATIC_PREFIX)
            # A speaker cannot send a token; the clip's random name is its key.
            or request.path.startswith(AUDIO_PATH)
        ):
            return await handler(request)
        presented = _presented_token(request)
        challenge = {"WWW-Authenticate": 'Bearer realm="xiaoai-bridge"'}
        if presented is None:
            raise _Rejected(
                401,
                "an access token is required: send 'Authorization: Bearer <token>' or add "
                "?token=<token> to the URL (the token is [http] token in the config)",
                challenge,
            )
        if not hmac.compare_digest(presented.encode(), token.get_secret_value().encode()):
            raise _Rejected(401, "wrong access token", challenge)
        return await handler(request)

    async def _page(self, request: web.Request) -> web.Response:
        return self._asset_response("index.html")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _ASSETS or name == "index.html":
            raise web.HTTPNotFound
        return self._asset_response(name)

    def _asset_response(self, name: str) -> web.Response:
        return web.Response(
            body=self._assets[name],
            content_type=_ASSETS[name],
            charset="utf-8" if _ASSETS[name].startswith("text/") else None,
            headers=_PAGE_HEADERS,
        )

    async def _audio(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        store = self._service.audio
        clip = store.get(name) if store is not None and NAME_RE.fullmatch(name) else None
        if clip is None:
            raise _Rejected(404, "no such audio clip (they expire a few minutes after playing)")
        # A body of known length: some speakers cannot play a chunked response.
        return web.Response(
            body=clip.data,
            content_type=clip.content_type,
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        healthy, body = self.health()
        return web.json_response(body, status=200 if healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        # The exposition content type carries a version parameter aiohttp cannot set alone.
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state(), dumps=_dumps)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self._live_pages >= MAX_LIVE_PAGES:
            raise _Rejected(
                503,
                f"too many live pages ({MAX_LIVE_PAGES}) follow this server already: close "
                "some status page tabs; this page retries by itself",
                {"Retry-After": str(LIVE_RETRY_AFTER_S)},
            )
        self._live_pages += 1
        try:
            return await self._follow(request)
        finally:
            self._live_pages -= 1

    async def _follow(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        await response.prepare(request)
        transport = request.transport
        if transport is None:
            return response  # the page left before its stream began
        loop = asyncio.get_running_loop()
        finished = False  # by the server's shutdown: the stream ends properly
        # A page too slow for its queue may be stuck in a write: end its connection at once.
        with (
            self.log.subscribe(on_drop=transport.abort) as subscription,
            # A write that timed out: the page stopped reading.
            contextlib.suppress(ConnectionResetError, TimeoutError),
        ):
            # The state comes first, through the same stream: no event falls between the two.
            await _write(response, Event("state", self.state()).frame)
            last_sent = loop.time()
            adapters = self._polled_health()
            while True:
                try:
                    async with asyncio.timeout(ADAPTER_POLL_S):
                        batch = await subscription.next_batch(LIVE_BATCH_S)
                except TimeoutError:
                    if transport.is_closing():
                        break  # the page went away
                    now = self._polled_health()
                    if any(now[key] != adapters[key] for key in _LIVE_HEALTH):
                        adapters = now
                        await _write(response, Event("adapters", now).frame)
                        last_sent = loop.time()
                    elif loop.time() - last_sent >= KEEPALIVE_S:
                        await _write(response, b": keepalive\n\n")
                        last_sent = loop.time()
                    continue
                if not batch:
                    finished = not subscription.dropped
                    break  # shutting down, or the page fell too far behind
                await _write(response, b"".join(event.frame for event in batch))
                last_sent = loop.time()
        if not finished:
            transport.abort()  # no goodbye to a page that left or stopped reading
        return response

    def _polled_health(self) -> dict[str, Any]:
        """/healthz's body, computed once per poll interval however many pages ask."""
        now = asyncio.get_running_loop().time()
        if self._polled is None or now - self._polled[0] >= ADAPTER_POLL_S / 2:
            self._polled = (now, self.health()[1])
        return self._polled[1]

    async def _ask(self, request: web.Request) -> web.Response:
        body = await _json_object(request, required=("text",), optional=("device",))
        text = body["text"]
        if not isinstance(text, str) or not text.strip():
            raise _Rejected(400, '"text" must be a non-empty string')
        if len(text) > MAX_ASK_CHARS:
            raise _Rejected(400, f'"text" is longer than {MAX_ASK_CHARS} characters')
        device = _device(body, default="default")
        utterance = self._asked.ask(text.strip(), device)
        _LOGGER.info("question for %s asked over HTTP", device)
        return web.json_response({"id": utterance.id, "device": device}, status=202)

    async def _answering(self, request: web.Request) -> web.Response:
        body = await _json_object(request, required=("enabled",))
        enabled = body["enabled"]
        if not isinstance(enabled, bool):
            raise _Rejected(400, '"enabled" must be true or false')
        self._service.controls.set_answering(enabled, by="the status page")
        return web.json_response({"enabled": enabled})

    async def _forget(self, request: web.Request) -> web.Response:
        body = await _json_object(request, required=("device",), optional=("source",))
        device = _device(body)
        source = body.get("source")
        if source is None:  # callers from before speakers were (source, device)
            source = source_of_legacy_device(device)
        if not isinstance(source, str) or not DEVICE_RE.fullmatch(source):
            raise _Rejected(400, '"source" must be an adapter name such as "mqtt"')
        speaker = SpeakerId(source, device)
        turns = await self._service.controls.forget(speaker, by="the status page")
        return web.json_response({"source": source, "device": device, "forgotten": turns})


@contextlib.asynccontextmanager
async def open_http(service: ServedService, settings: HttpSettings) -> AsyncIterator[HttpServer]:
    """Serve the status page and endpoints for `service` until the block exits."""
    server = HttpServer(service, settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _own_host_names(settings: HttpSettings) -> frozenset[str]:
    """The names a browser may use for this server (address literals are always fine)."""
    names = set(_LOCAL_NAMES) | set(settings.allowed_hosts)
    names.add(settings.host.lower())
    hostname = socket.gethostname().lower().rstrip(".")
    if hostname:
        short = hostname.split(".")[0]
        names |= {hostname, short, f"{short}.local"}
    if settings.public_url:
        public = urlsplit(settings.public_url).hostname
        if public:
            names.add(public.lower())
    return frozenset(names)


def _host_name(host_header: str) -> str:
    """The name in a Host header: no port, no IPv6 brackets, no trailing dot, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _from_own_page(request: web.Request) -> bool:
    """False when a browser says the request comes from a page of another origin."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site.lower() in _OWN_FETCH_SITES
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser (browsers send Origin on every POST)
    return _same_authority(origin, request.headers.get("Host", ""))


def _same_authority(origin: str, host_header: str) -> bool:
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null": a sandboxed frame, a file, a data: URL
    default = 443 if parts.scheme == "https" else 80
    try:
        served = urlsplit(f"//{host_header}")
        served_port = served.port
    except ValueError:
        return False
    return (parts.hostname, port or default) == (served.hostname, served_port or default)


def _load_assets() -> dict[str, bytes]:
    return {name: (WEB_DIR / name).read_bytes() for name in _ASSETS}


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Write to a live page; TimeoutError when it has stopped reading."""
    async with asyncio.timeout(LIVE_WRITE_TIMEOUT_S):
        await response.write(data)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _describe(err: web.HTTPException, request: web.Request) -> str:
    if isinstance(err, web.HTTPNotFound):
        return f"no such endpoint: {request.path}"
    if isinstance(err, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(err.allowed_methods))
        return f"{err.method} is not allowed on {request.path}; use {allowed}"
    if isinstance(err, web.HTTPRequestEntityTooLarge):
        return f"request body too large: the limit is {MAX_BODY_BYTES} bytes"
    return err.reason


def _presented_token(request: web.Request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.query.get("token") or None


async def _json_object(
    request: web.Request, *, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    raw = await request.read()  # beyond client_max_size: HTTPRequestEntityTooLarge (413)
    example = json.dumps(dict.fromkeys(required, "..."))
    try:
        data = parse_json(raw)
    except ValueError as err:
        raise _Rejected(400, f"the body cannot be read: {err}; send e.g. {example}") from None
    if not isinstance(data, dict):
        raise _Rejected(400, f"the body must be a JSON object, e.g. {example}")
    for name in required:
        if name not in data:
            raise _Rejected(400, f'missing field "{name}"')
    for name in data:
        if name not in required and name not in optional:
            raise _Rejected(400, f'unknown field "{name}"')
    return data


def _device(body: Mapping[str, Any], default: str | None = None) -> str:
    device = body.get("device", default)
    if not isinstance(device, str) or not DEVICE_RE.fullmatch(device):
        raise _Rejected(400, '"device" must be 1-64 letters, digits or . : @ _ - (e.g. "default")')
    return device
