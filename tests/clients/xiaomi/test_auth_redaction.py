"""Every password, token and id a real login learns is masked in the log at every level."""

from __future__ import annotations

import logging

import pytest

from tests.fakes.xiaomi_cloud import FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi.auth import SID_MINA, SID_MIOT, XiaomiAuth, password_hash


def fail(text: str) -> None:
    raise ValueError(text)


async def test_tokens_of_a_real_login_are_masked_wherever_they_are_logged(
    cloud: FakeXiaomiCloud, auth: XiaomiAuth, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    mina = await auth.credentials(SID_MINA)
    miot = await auth.credentials(SID_MIOT)
    secrets = {cloud.password, password_hash(cloud.password), *cloud.pass_tokens}
    secrets |= {mina.service_token, mina.ssecurity, miot.service_token, miot.ssecurity}
    assert len(secrets) == 7
    # What a library or a careless traceback could log: cookies, URLs, exception texts.
    library = logging.getLogger("aiohttp.client")
    for secret in secrets:
        library.debug("Cookie: serviceToken=%s; userId=%s", secret, auth.user_id)
        library.debug("GET https://api2.mina.mi.com/?token=" + secret)
        try:
            fail(f"bad answer for {secret}")
        except ValueError:
            library.exception("request failed")
    logged = caplog.text + "".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "Cookie: serviceToken=***" in logged
    for secret in {*secrets, str(cloud.user_id)}:
        assert secret not in logged
