"""The HTTP server of the running service: /healthz, /metrics, the state, the API, the feed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tests.conftest import API_KEY, WAIT_S, Probe, make_settings
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI, Fault, ScriptedCall, ToolRound
from tests.pipeline.test_tool_loop import Shelf
from xiaoai_bridge.app import Service, open_service, serve
from xiaoai_bridge.config import HttpSettings, MqttSettings, Settings, ToolsSettings
from xiaoai_bridge.errors import ConfigError
from xiaoai_bridge.http import MAX_BODY_BYTES, MAX_LIVE_PAGES, HttpServer, open_http
from xiaoai_bridge.metrics import UNKNOWN_TOOL
from xiaoai_bridge.pipeline.tool_ports import ToolOutput

TOKEN = "page-token-7f3a9c"
MQTT_PASSWORD = "mqtt-pass-51d2e8"
_POLL_S = 0.05
JSON_TYPE = {"Content-Type": "application/json"}


@dataclass
class Running:
    """The service under test with its HTTP server and a client for it."""

    service: Service
    http: HttpServer
    client: aiohttp.ClientSession

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.http.port}"

    async def call(
        self, method: str, path: str, *, expect: int | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        """One request: (status, parsed JSON body or text)."""
        async with self.client.request(method, self.base + path, **kwargs) as response:
            text = await response.text()
            is_json = response.content_type == "application/json"
            body = json.loads(text) if is_json else text
            if expect is not None:
                assert response.status == expect, (response.status, body)
            return response.status, body

    async def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics (0 when absent)."""
        _, text = await self.call("GET", "/metrics", expect=200)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    async def wait_health(self, status: int) -> dict[str, Any]:
        """Poll /healthz until it answers `status`; its body."""
        async with asyncio.timeout(WAIT_S):
            while True:
                code, body = await self.call("GET", "/healthz")
                if code == status:
                    assert isinstance(body, dict)
                    return body
                await asyncio.sleep(_POLL_S)


@contextlib.asynccontextmanager
async def running(settings: Settings, *, token: str | None = None) -> AsyncIterator[Running]:
    """Run the service with its HTTP server until the block exits, as the app would."""
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(open_service(settings))
        # The app opens the server itself once it is wired in; until then the test does.
        found = getattr(service, "http", None)
        server = (
            found
            if isinstance(found, HttpServer)
            else await stack.enter_async_context(open_http(service, settings.http))
        )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = await stack.enter_async_context(aiohttp.ClientSession(headers=headers))
        task = asyncio.create_task(serve(service, stop))
        try:
            yield Running(service, server, client)
        finally:
            stop.set()
            async with asyncio.timeout(WAIT_S + 5):
                await task


def http_settings(tmp_path: Path, broker: Mosquitto, llm: FakeOpenAI, **http: Any) -> Settings:
    """Test settings with the HTTP server on a free port."""
    return make_settings(tmp_path, broker, llm, http=HttpSettings(port=0, **http))


async def wait_logged(bridge: Running, device: str, count: int) -> None:
    """Wait until the status log holds `count` finished conversations of `device`."""
    async with asyncio.timeout(WAIT_S):
        while True:
            entries = bridge.http.log.recent(device)
            if len(entries) >= count and all(entry.outcome for entry in entries):
                return
            await asyncio.sleep(_POLL_S)


async def read_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """Server-sent events as (kind, data), parsed as a browser's EventSource would."""
    kind, data = "message", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            continue
        if line.startswith("event:"):
            kind = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data += line.removeprefix("data:").strip()
        elif not line and data:
            yield kind, json.loads(data)
            kind, data = "message", ""


async def test_healthz_follows_the_broker_and_metrics_count_the_reconnect(
    tmp_path: Path,
    mosquitto: Mosquitto,
    llm: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="xiaoai_bridge")
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        assert any(
            f"http://127.0.0.1:{bridge.http.port}/" in r.getMessage()
            and str(bridge.http.port) in r.getMessage()
            for r in caplog.records
            if r.name == "xiaoai_bridge.http"
        )
        healthy = await bridge.wait_health(200)
        assert healthy["status"] == "ok"
        assert healthy["down"] == []
        assert healthy["adapters"]["mqtt"]["state"] == "connected"
        assert healthy["adapters"]["mqtt"]["since"].endswith("+00:00")
        assert await bridge.metric("xiaoai_bridge_adapter_connected", adapter="mqtt") == 1

        async with bridge.client.get(bridge.base + "/api/events") as stream:
            events = read_events(stream)
            assert (await anext(events))[0] == "state"
            await mosquitto.stop()
            down = await bridge.wait_health(503)
            # A live page hears about it without asking.
            async with asyncio.timeout(WAIT_S):
                kind, data = await anext(events)
            assert kind == "adapters"
            assert data["status"] == "unavailable"
            assert data["adapters"]["mqtt"]["state"] == "reconnecting"
        assert down["status"] == "unavailable"
        assert down["down"] == ["mqtt"]
        mqtt = down["adapters"]["mqtt"]
        assert mqtt["state"] == "reconnecting"
        assert mqtt["last_error"]
        assert mqtt["failures"] >= 1
        assert await bridge.metric("xiaoai_bridge_adapter_connected", adapter="mqtt") == 0

        await mosquitto.start()
        back = await bridge.wait_health(200)
        assert back["adapters"]["mqtt"]["reconnects"] == 1
        assert await bridge.metric("xiaoai_bridge_reconnects_total", adapter="mqtt") == 1


async def test_metrics_move_as_questions_are_answered_over_mqtt(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        await probe.wait_status("online")
        async with bridge.client.get(bridge.base + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
        answered = {"source": "mqtt", "outcome": "answered", "reason": ""}
        assert await bridge.metric("xiaoai_bridge_questions_total", **answered) == 0
        llm.answer = "好的。这是回答。"
        llm.first_token_delay = 0.05
        for n in range(2):
            await probe.ask({"text": f"问题{n}", "id": n})
            await probe.reply_json()
        llm.fail_next(Fault.SERVER_ERROR, retry_after=0)
        await probe.ask({"text": "会失败", "id": "f"})
        await probe.reply_json()
        # The reply is published while the dispatcher finishes; let it settle.
        async with asyncio.timeout(WAIT_S):
            await bridge.service.dispatcher.drain()
        assert await bridge.metric("xiaoai_bridge_answers_in_flight") == 0
        assert await bridge.metric("xiaoai_bridge_questions_total", **answered) == 2
        failed = {"source": "mqtt", "outcome": "failed", "reason": "server_error"}
        assert await bridge.metric("xiaoai_bridge_questions_total", **failed) == 1
        assert await bridge.metric("xiaoai_bridge_llm_first_chunk_seconds_count") == 2
        first_sum = await bridge.metric("xiaoai_bridge_llm_first_chunk_seconds_sum")
        total_sum = await bridge.metric("xiaoai_bridge_llm_total_seconds_sum")
        assert 0.1 <= first_sum <= total_sum
        assert await bridge.metric("xiaoai_bridge_llm_total_seconds_count") == 2


async def test_ask_over_http_goes_through_the_pipeline_and_streams_live(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        await bridge.wait_health(200)
        llm.answer = "北京今天晴。最高二十五度。"
        llm.token_delay = 0.01
        async with bridge.client.get(bridge.base + "/api/events") as stream:
            assert stream.status == 200
            assert stream.content_type == "text/event-stream"
            events = read_events(stream)
            kind, first = await anext(events)
            assert kind == "state"
            assert first["conversations"] == {}
            _, asked = await bridge.call(
                "POST", "/api/ask", json={"text": "北京天气", "device": "kitchen"}, expect=202
            )
            assert asked["device"] == "kitchen"
            seen: list[tuple[str, Any]] = []
            async with asyncio.timeout(WAIT_S):
                async for kind, data in events:
                    seen.append((kind, data))
                    if kind == "end":
                        break
        assert llm.last_request.messages[-1] == {"role": "user", "content": "北京天气"}
        kinds = [kind for kind, _ in seen]
        assert kinds[0] == "begin"
        assert kinds[-1] == "end"
        chunks = [data["text"] for kind, data in seen if kind == "chunk" and data["text"]]
        assert chunks == ["北京今天晴。", "最高二十五度。"]
        end = seen[-1][1]
        assert (end["id"], end["device"], end["source"]) == (asked["id"], "kitchen", "http")
        assert end["outcome"] == "answered"
        assert end["answer"] == "北京今天晴。最高二十五度。"
        assert 0 < end["first_chunk_s"] <= end["total_s"]
        async with asyncio.timeout(WAIT_S):
            while True:  # the page left: its subscription goes too
                if not bridge.http.log.subscribers:
                    break
                await asyncio.sleep(_POLL_S)
        _, state = await bridge.call("GET", "/api/state", expect=200)
        assert state["speakers"] == ["kitchen"]
        [logged] = state["conversations"]["kitchen"]
        assert logged == end
        answered = {"source": "http", "outcome": "answered", "reason": ""}
        assert await bridge.metric("xiaoai_bridge_questions_total", **answered) == 1
        assert await bridge.metric("xiaoai_bridge_said_to_first_chunk_seconds_count", source="http")


async def test_state_and_page_mask_every_secret(
    tmp_path: Path,
    mosquitto: Mosquitto,
    llm: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"mqtt://bridge:{MQTT_PASSWORD}@127.0.0.1:{mosquitto.port}"
    settings = make_settings(
        tmp_path,
        mosquitto,
        llm,
        http=HttpSettings(port=0, token=SecretStr(TOKEN)),
        mqtt=MqttSettings(url=url, client_id="bridge-under-test"),
    )
    secrets = (TOKEN, MQTT_PASSWORD, API_KEY)
    async with running(settings, token=TOKEN) as bridge:
        await bridge.wait_health(200)
        _, state = await bridge.call("GET", "/api/state", expect=200)
        config = state["config"]
        assert config["mqtt"]["url"] == f"mqtt://bridge:***@127.0.0.1:{mosquitto.port}"
        assert config["llm"]["api_key"] == "***"
        assert config["http"]["token"] == "***"
        assert config["llm"]["base_url"] == llm.base_url  # nothing secret, shown as is
        for path in ("/api/state", "/", "/static/app.js", "/metrics", "/healthz"):
            _, text = await bridge.call("GET", path, expect=200, params={"token": TOKEN})
            for secret in secrets:
                assert secret not in json.dumps(text, ensure_ascii=False), (path, secret)
        async with bridge.client.get(bridge.base + "/api/events") as stream:
            kind, data = await anext(read_events(stream))
        assert kind == "state"
        for secret in secrets:
            assert secret not in json.dumps(data, ensure_ascii=False)
    # The token travels in query strings: the access log must not repeat it.
    assert any(r.name == "aiohttp.access" for r in caplog.records)
    for record in caplog.records:
        for secret in secrets:
            assert secret not in record.getMessage()


async def test_token_is_required_except_for_healthz(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    settings = http_settings(tmp_path, mosquitto, llm, token=SecretStr(TOKEN))
    async with running(settings) as bridge:
        await bridge.wait_health(200)  # open: container health checks carry no token
        protected = [
            ("GET", "/"),
            ("GET", "/metrics"),
            ("GET", "/api/state"),
            ("GET", "/api/events"),
            ("POST", "/api/ask"),
            ("POST", "/api/answering"),
            ("POST", "/api/forget"),
        ]
        for method, path in protected:
            status, body = await bridge.call(method, path)
            assert status == 401, path
            assert "Authorization: Bearer" in body["error"]
            assert "?token=" in body["error"]
            wrongs: list[dict[str, Any]] = [
                {"headers": {"Authorization": "Bearer nope"}},
                {"params": {"token": TOKEN + "x"}},
                {"headers": {"Authorization": f"Basic {TOKEN}"}, "params": {"token": "no"}},
            ]
            for wrong in wrongs:
                status, body = await bridge.call(method, path, **wrong)
                assert (status, body) == (401, {"error": "wrong access token"}), (path, wrong)
        async with bridge.client.get(bridge.base + "/api/state") as response:
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        await bridge.call(
            "GET", "/api/state", expect=200, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        await bridge.call("GET", "/api/state", expect=200, params={"token": TOKEN})
        _, page = await bridge.call("GET", "/", expect=200, params={"token": TOKEN})
        assert "<title>xiaoai-bridge</title>" in page
        # The page's script and style carry no data; the browser fetches them without a token.
        await bridge.call("GET", "/static/app.js", expect=200)


async def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_running(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        await bridge.wait_health(200)
        cases: list[tuple[str, str, dict[str, Any], int, str]] = [
            ("GET", "/api/ask", {}, 405, "GET is not allowed on /api/ask; use POST"),
            ("POST", "/healthz", {}, 405, "use GET"),
            ("DELETE", "/api/state", {}, 405, "use GET"),
            ("GET", "/nope", {}, 404, "no such endpoint: /nope"),
            ("GET", "/static/../http.py", {}, 404, "no such endpoint"),
            ("GET", "/static/secrets.txt", {}, 404, "no such endpoint"),
            ("POST", "/api/ask", {"data": b"{not json"}, 400, "not valid JSON"),
            ("POST", "/api/ask", {"data": b""}, 400, "not valid JSON"),
            ("POST", "/api/ask", {"data": b"\xff\xfe"}, 400, "not valid JSON"),
            ("POST", "/api/ask", {"json": ["text"]}, 400, "must be a JSON object"),
            ("POST", "/api/ask", {"json": {}}, 400, 'missing field "text"'),
            ("POST", "/api/ask", {"json": {"text": 5}}, 400, '"text" must be'),
            ("POST", "/api/ask", {"json": {"text": "  "}}, 400, '"text" must be'),
            ("POST", "/api/ask", {"json": {"text": "x" * 2001}}, 400, '"text" is longer'),
            ("POST", "/api/ask", {"json": {"text": "hi", "device": "a b"}}, 400, '"device"'),
            ("POST", "/api/ask", {"json": {"text": "hi", "device": 3}}, 400, '"device"'),
            ("POST", "/api/ask", {"json": {"text": "hi", "voice": 1}}, 400, '"voice"'),
            ("POST", "/api/answering", {"json": {"enabled": "yes"}}, 400, '"enabled"'),
            ("POST", "/api/answering", {"json": {"on": True}}, 400, '"enabled"'),
            ("POST", "/api/forget", {"json": {}}, 400, '"device"'),
            ("POST", "/api/forget", {"json": {"device": "x" * 65}}, 400, '"device"'),
            ("POST", "/api/ask", {"data": b"x" * (MAX_BODY_BYTES + 1)}, 413, "too large"),
            ("POST", "/api/ask", {"data": b"[" * 200_000}, 413, "too large"),
        ]
        for method, path, kwargs, status, message in cases:
            if "data" in kwargs:  # a JSON client's mistakes: the type is right, the body is not
                kwargs["headers"] = {"Content-Type": "application/json"}
            got, body = await bridge.call(method, path, **kwargs)
            assert got == status, (method, path, kwargs, got, body)
            assert isinstance(body, dict), (method, path, body)
            assert message in body["error"], (method, path, body)
        _, deep = await bridge.call(
            "POST", "/api/ask", data=b"[" * 50_000, headers=JSON_TYPE, expect=400
        )
        assert "nested too deeply" in deep["error"]
        async with bridge.client.post(bridge.base + "/healthz") as response:
            assert response.headers["Allow"] == "GET,HEAD"
        # Still alive and answering.
        await bridge.wait_health(200)
        llm.answer = "还在。"
        await bridge.call("POST", "/api/ask", json={"text": "你还在吗"}, expect=202)
        async with asyncio.timeout(WAIT_S):
            await llm.wait_for_requests(1)


async def test_answering_switch_and_forget_over_http(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        await probe.wait_status("online")
        llm.answer = "记住了。"
        await probe.ask({"text": "我叫小明", "device": "den", "id": 1})
        await probe.reply_json()

        await bridge.call("POST", "/api/answering", json={"enabled": False}, expect=200)
        assert bridge.service.controls.answering is False
        _, health = await bridge.call("GET", "/healthz", expect=200)
        assert health["answering"] is False
        await probe.ask({"text": "不该回答", "device": "den", "id": 2})
        await wait_logged(bridge, "den", 2)
        ignored = bridge.http.log.recent("den")[-1]
        assert (ignored.outcome, ignored.reason) == ("ignored", "disabled")
        assert len(llm.requests) == 1

        _, switched = await bridge.call(
            "POST", "/api/answering", json={"enabled": True}, expect=200
        )
        assert switched == {"enabled": True}
        await probe.ask({"text": "我叫什么", "device": "den", "id": 3})
        await probe.reply_json()
        assert len(llm.last_request.messages) == 4  # system, remembered turn, question

        other = {"source": "homeassistant", "device": "den"}  # same name, another adapter
        _, forgot = await bridge.call("POST", "/api/forget", json=other, expect=200)
        assert forgot == {**other, "forgotten": 0}
        mine = {"source": "mqtt", "device": "den"}
        _, forgot = await bridge.call("POST", "/api/forget", json=mine, expect=200)
        assert forgot == {**mine, "forgotten": 2}
        await probe.ask({"text": "我叫什么", "device": "den", "id": 4})
        await probe.reply_json()
        assert len(llm.last_request.messages) == 2  # system, question: nothing remembered


async def test_a_port_in_use_is_a_config_error(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        taken = HttpSettings(port=bridge.http.port)
        with pytest.raises(ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{taken.port}"):
            async with open_http(bridge.service, taken):
                pass
        await bridge.wait_health(200)


async def test_open_event_streams_end_when_the_server_stops(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        await bridge.wait_health(200)
        async with bridge.client.get(bridge.base + "/api/events") as stream:
            events = read_events(stream)
            assert (await anext(events))[0] == "state"
            loop = asyncio.get_running_loop()
            started = loop.time()
            await bridge.http.stop()
            async with asyncio.timeout(WAIT_S):
                rest = [kind async for kind, _ in events]
            assert rest == []
            assert loop.time() - started < 1.5  # ended at once, not after a drain timeout
        assert bridge.http.log.subscribers == 0


async def test_a_foreign_web_page_cannot_change_anything(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        await bridge.wait_health(200)
        evil = "http://evil.example"
        # What a page on another site can send without a preflight: a "simple" request.
        simple = {"data": b'{"enabled": false}', "headers": {"Content-Type": "text/plain"}}
        json_body = {"json": {"enabled": False}}
        refused: list[tuple[dict[str, Any], dict[str, str], int, str]] = [
            (simple, {"Origin": evil}, 403, "cross-origin"),
            (simple, {"Origin": evil, "Sec-Fetch-Site": "cross-site"}, 403, "cross-origin"),
            (json_body, {"Origin": evil}, 403, "cross-origin"),
            (json_body, {"Origin": "null"}, 403, "cross-origin"),
            (json_body, {"Sec-Fetch-Site": "cross-site"}, 403, "cross-origin"),
            # Another port of this machine is the same site but another origin.
            (json_body, {"Sec-Fetch-Site": "same-site"}, 403, "cross-origin"),
            (json_body, {"Origin": "http://127.0.0.1:1"}, 403, "cross-origin"),
            # Not a browser, but not JSON either: a page could send exactly this.
            (simple, {}, 415, "Content-Type: application/json"),
            ({"data": b"enabled=false"}, {}, 415, "Content-Type: application/json"),
        ]
        for path in ("/api/answering", "/api/forget", "/api/ask"):
            for kwargs, headers, status, message in refused:
                sent = {**kwargs, "headers": {**kwargs.get("headers", {}), **headers}}
                got, body = await bridge.call("POST", path, **sent)
                assert got == status, (path, sent, got, body)
                assert message in body["error"], (path, sent, body)
        # The preflight a page needs before sending JSON gets no CORS permission.
        async with bridge.client.options(
            bridge.base + "/api/answering",
            headers={
                "Origin": evil,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        ) as response:
            assert response.status == 403
            assert "cross-origin" in (await response.json())["error"]
            assert not any(h.lower().startswith("access-control-") for h in response.headers)
        assert bridge.service.controls.answering is True
        assert llm.requests == []

        # The page itself, and clients that are not browsers, still can.
        same = {"Origin": bridge.base, "Sec-Fetch-Site": "same-origin"}
        await bridge.call(
            "POST", "/api/answering", json={"enabled": False}, headers=same, expect=200
        )
        await bridge.call(
            "POST",
            "/api/answering",
            json={"enabled": True},
            headers={"Origin": bridge.base},
            expect=200,
        )
        await bridge.call(
            "POST",
            "/api/forget",
            data=b'{"device": "den"}',
            headers={"Content-Type": "application/json; charset=utf-8"},
            expect=200,
        )


async def test_only_host_names_of_this_machine_are_answered(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    settings = http_settings(
        tmp_path,
        mosquitto,
        llm,
        allowed_hosts=["bridge.home.arpa"],
        public_url="http://nas.lan:8099",
    )
    async with running(settings) as bridge:
        await bridge.wait_health(200)
        port = bridge.http.port
        # A DNS-rebinding page: the browser resolved evil.example to 127.0.0.1.
        for path in ("/", "/api/state", "/api/events", "/static/app.js"):
            got, body = await bridge.call("GET", path, headers={"Host": f"evil.example:{port}"})
            assert got == 421, (path, got, body)
            assert "evil.example" in body["error"]
            assert "[http] allowed_hosts" in body["error"]
        got, body = await bridge.call(
            "POST",
            "/api/answering",
            json={"enabled": False},
            headers={"Host": "evil.example", "Origin": "http://evil.example"},
        )
        assert got == 421, body
        assert bridge.service.controls.answering is True
        # Machines checking health or scraping metrics reach it by any name (see the docs).
        for path in ("/healthz", "/metrics"):
            await bridge.call("GET", path, headers={"Host": "xiaoai-bridge:8099"}, expect=200)
        hostname = socket.gethostname()
        names = [
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"LOCALHOST.:{port}",
            f"[::1]:{port}",
            "192.168.1.5:8099",  # any address literal: rebinding needs a name
            "[fe80::1]",
            f"{hostname}:{port}",
            f"{hostname.split('.')[0]}.local:{port}",
            f"bridge.home.arpa:{port}",  # [http] allowed_hosts
            "nas.lan:8099",  # [http] public_url
        ]
        for name in names:
            await bridge.call("GET", "/api/state", headers={"Host": name}, expect=200)


async def test_allowed_hosts_star_answers_any_name(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm, allowed_hosts=["*"])) as bridge:
        await bridge.wait_health(200)
        await bridge.call("GET", "/api/state", headers={"Host": "proxy.example"}, expect=200)


@contextlib.asynccontextmanager
async def stalled_page(bridge: Running) -> AsyncIterator[socket.socket]:
    """A live page whose browser stopped reading: it asks for the feed, then never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up at once
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", bridge.http.port))
        request = f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{bridge.http.port}\r\n\r\n"
        await asyncio.get_running_loop().sock_sendall(sock, request.encode())
        yield sock
    finally:
        sock.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll `condition` until it holds (WAIT_S at most)."""
    async with asyncio.timeout(WAIT_S):
        while True:  # the server's counters have no event to wait on
            if condition():
                return
            await asyncio.sleep(_POLL_S)


async def test_live_pages_are_capped_and_a_stalled_one_never_holds_answers(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        await bridge.wait_health(200)
        llm.answer = "好。"
        async with contextlib.AsyncExitStack() as pages:
            await pages.enter_async_context(stalled_page(bridge))
            readers = []
            for _ in range(MAX_LIVE_PAGES - 1):
                stream = await pages.enter_async_context(
                    bridge.client.get(bridge.base + "/api/events")
                )
                assert stream.status == 200
                events = read_events(stream)
                assert (await anext(events))[0] == "state"
                readers.append(events)
            await wait_until(lambda: bridge.http.live_pages == MAX_LIVE_PAGES)
            # One page too many is told so in words, and to come back later.
            async with bridge.client.get(bridge.base + "/api/events") as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"]
                error = (await refused.json())["error"]
            assert f"too many live pages ({MAX_LIVE_PAGES})" in error
            assert "close" in error
            # The state and the API still answer; questions are answered while the pages follow.
            await bridge.call("GET", "/api/state", expect=200)
            asked = 50
            for n in range(asked):
                await bridge.call(
                    "POST", "/api/ask", json={"text": f"问题{n}", "device": f"d{n}"}, expect=202
                )
            async with asyncio.timeout(WAIT_S):
                await llm.wait_for_requests(asked)
                await bridge.service.dispatcher.drain()
            for events in readers:
                ends = 0
                async with asyncio.timeout(WAIT_S):
                    async for kind, _ in events:
                        ends += kind == "end"
                        if ends == asked:
                            break
        # Pages that left free their places.
        await wait_until(lambda: bridge.http.live_pages == 0)
        async with bridge.client.get(bridge.base + "/api/events") as again:
            assert again.status == 200


async def test_a_page_that_stops_reading_is_cut_off_and_the_rest_carry_on(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        await bridge.wait_health(200)
        async with stalled_page(bridge) as stalled:
            await wait_until(lambda: bridge.http.log.subscribers == 1)
            # Far more than the kernel's socket buffers and the page's queue hold together.
            padding = "长" * 10_000
            for n in range(1_000):
                bridge.http.log.publish("forgot", {"device": "d", "turns": n, "pad": padding})
                if n % 50 == 0:
                    await asyncio.sleep(0)  # let the page's connection write
            # The server ends the stalled connection rather than wait on it, unread.
            await wait_until(lambda: bridge.http.live_pages == 0)
            assert bridge.http.log.subscribers == 0
            assert any("fell" in r.getMessage() for r in caplog.records)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(WAIT_S):
                while True:
                    try:
                        if not await loop.sock_recv(stalled, 1 << 20):
                            break
                    except ConnectionResetError:
                        break
        llm.answer = "还在。"
        await bridge.call("POST", "/api/ask", json={"text": "你还在吗"}, expect=202)
        async with asyncio.timeout(WAIT_S):
            await llm.wait_for_requests(1)
        async with bridge.client.get(bridge.base + "/api/events") as again:
            assert again.status == 200


async def test_tool_calls_of_a_real_answer_reach_the_metrics(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        shelf = Shelf("house")

        async def turn_off(arguments: Mapping[str, object]) -> ToolOutput:
            return f"{arguments['name']} is off"

        shelf.add("turn_off", turn_off)
        bridge.service.tools.add(shelf)
        await probe.wait_status("online")
        assert await bridge.metric("xiaoai_bridge_tool_source_up", source="house") == 1
        assert await bridge.metric("xiaoai_bridge_tool_source_tools", source="house") == 1
        llm.script(
            ToolRound(
                (
                    ScriptedCall("call_1", "turn_off", '{"name": "客厅灯"}'),
                    ScriptedCall("call_2", "open_the_pod_bay_doors", "{}"),
                )
            ),
            "客厅灯关了。",
        )
        await probe.ask({"text": "把客厅灯关了", "id": "t1"})
        assert (await probe.reply_json())["text"] == "客厅灯关了。"
        async with asyncio.timeout(WAIT_S):
            await bridge.service.dispatcher.drain()
        calls = "xiaoai_bridge_tool_calls_total"
        assert await bridge.metric(calls, tool="turn_off", source="house", outcome="ok") == 1
        unknown = {"tool": UNKNOWN_TOOL, "source": "", "outcome": "unknown_tool"}
        assert await bridge.metric(calls, **unknown) == 1
        assert await bridge.metric("xiaoai_bridge_tool_call_seconds_count", tool="turn_off") == 1


async def test_a_tool_source_down_is_detail_in_healthz_not_a_503(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge:
        search = Shelf("mcp:search", down="cannot reach http://127.0.0.1:9/mcp: refused")
        bridge.service.tools.add(Shelf("house"))
        bridge.service.tools.add(search)
        body = await bridge.wait_health(200)
        assert body["status"] == "ok"
        assert body["tools_down"] == ["mcp:search"]
        # After the sources the config adds (the built-in tools), in the order added.
        assert list(body["tools"])[-2:] == ["house", "mcp:search"]
        assert body["tools"]["house"] == {"ok": True, "detail": "on the shelf", "tools": 0}
        assert body["tools"]["mcp:search"] == {"ok": False, "detail": search.down, "tools": 0}
        _, state = await bridge.call("GET", "/api/state", expect=200)
        assert state["tools_enabled"] is True
        assert (state["tools"], state["tools_down"]) == (body["tools"], ["mcp:search"])
        # The core connection still decides the status code.
        await mosquitto.stop()
        down = await bridge.wait_health(503)
        assert (down["down"], down["tools_down"]) == (["mqtt"], ["mcp:search"])


async def test_with_tool_calling_off_no_tool_source_is_reported(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI
) -> None:
    settings = make_settings(
        tmp_path, mosquitto, llm, http=HttpSettings(port=0), tools=ToolsSettings(enabled=False)
    )
    async with running(settings) as bridge:
        body = await bridge.wait_health(200)
        assert (body["tools"], body["tools_down"]) == ({}, [])
        _, state = await bridge.call("GET", "/api/state", expect=200)
        assert (state["tools_enabled"], state["tools"]) == (False, {})
        assert await bridge.metric("xiaoai_bridge_tool_source_up", source="builtin") == 0
