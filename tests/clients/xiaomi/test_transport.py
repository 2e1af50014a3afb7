"""The shared request path against the fake cloud: cookies per attempt, re-login, errors."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.fakes.xiaomi_cloud import MINA, FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi.auth import SID_MINA, ServiceCredentials, XiaomiAuth
from xiaoai_bridge.clients.xiaomi.errors import (
    TokenExpiredError,
    XiaomiApiError,
    XiaomiNetworkError,
    XiaomiServerError,
)
from xiaoai_bridge.clients.xiaomi.transport import Outgoing, ServiceTransport


@pytest.fixture
def transport(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, auth: XiaomiAuth
) -> ServiceTransport:
    return ServiceTransport(
        session,
        auth,
        service="MiNA",
        sid=SID_MINA,
        base_url=cloud.endpoints["mina"] + "/",
        timeout_s=0.3,
        user_agent="test-agent/1.0",
    )


def _build(creds: ServiceCredentials) -> Outgoing:
    return Outgoing(
        cookies={"userId": creds.user_id, "serviceToken": creds.service_token},
        params={"master": "0"},
    )


async def test_sends_cookies_and_params_and_parses_the_body(
    cloud: FakeXiaomiCloud, transport: ServiceTransport
) -> None:
    body = await transport.request("GET", "/admin/v2/device_list", _build, json.loads)

    assert body["code"] == 0
    assert [item["deviceID"] for item in body["data"]] == [cloud.speaker.device_id]
    (call,) = cloud.calls_to(MINA)
    assert call.path == "/admin/v2/device_list"
    assert call.query == {"master": "0"}
    assert set(call.cookies) == {"userId", "serviceToken"}


async def test_a_rejected_token_is_replaced_and_the_cookies_rebuilt(
    cloud: FakeXiaomiCloud, transport: ServiceTransport
) -> None:
    await transport.request("GET", "/admin/v2/device_list", _build, json.loads)
    cloud.expire_tokens()

    await transport.request("GET", "/admin/v2/device_list", _build, json.loads)

    calls = cloud.calls_to(MINA)
    assert [call.status for call in calls] == [200, 401, 200]
    assert calls[1].cookies["serviceToken"] == calls[0].cookies["serviceToken"]
    assert calls[2].cookies["serviceToken"] != calls[1].cookies["serviceToken"]


async def test_a_parser_saying_token_expired_also_relogs_in_once(
    cloud: FakeXiaomiCloud, transport: ServiceTransport
) -> None:
    def refuse(text: str) -> object:
        raise TokenExpiredError("the body says auth err")

    with pytest.raises(TokenExpiredError):
        await transport.request("GET", "/admin/v2/device_list", _build, refuse)

    assert len(cloud.calls_to(MINA)) == 2  # the first try and one after the re-login


async def test_http_and_network_failures_become_the_clients_errors(
    cloud: FakeXiaomiCloud, transport: ServiceTransport
) -> None:
    cloud.fail(MINA, 503)
    with pytest.raises(XiaomiServerError) as server:
        await transport.request("GET", "/admin/v2/device_list", _build, json.loads)
    assert server.value.message == "MiNA answered HTTP 503"

    cloud.fail(MINA, 404)
    with pytest.raises(XiaomiApiError) as refused:
        await transport.request("GET", "/admin/v2/device_list", _build, json.loads)
    assert refused.value.api_code == 404

    cloud.stall(MINA)
    with pytest.raises(XiaomiNetworkError) as stalled:
        await transport.request("GET", "/admin/v2/device_list", _build, json.loads)
    # Names the service, never the URL (login URLs carry one-time secrets).
    assert stalled.value.message == "MiNA: request timed out"
    assert "127.0.0.1" not in str(stalled.value)
