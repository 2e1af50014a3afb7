"""Xiaomi account login against the fake cloud: tokens, cache, failures, redaction."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.xiaomi_cloud import ACCOUNT, STS, FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi.auth import (
    SID_MINA,
    SID_MIOT,
    XiaomiAuth,
    parse_login_json,
    parse_pasted_login,
)
from xiaoai_bridge.clients.xiaomi.errors import (
    CaptchaRequiredError,
    InvalidCredentialsError,
    LoginRequiredError,
    TokenExpiredError,
    VerificationRequiredError,
    XiaomiAuthError,
    XiaomiError,
    XiaomiNetworkError,
    XiaomiServerError,
)
from xiaoai_bridge.errors import BridgeError


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "xiaomi-token.json"


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def chmod(path: Path, mode: int) -> None:
    path.chmod(mode)


def write(path: Path, text: str) -> None:
    path.write_text(text)


def make_auth(
    cloud: FakeXiaomiCloud,
    session: aiohttp.ClientSession,
    token_path: Path,
    *,
    password: str | None = None,
    use_password: bool = True,
    base_url: str | None = None,
    timeout_s: float = 5.0,
) -> XiaomiAuth:
    return XiaomiAuth(
        session,
        account=cloud.account,
        password=(password or cloud.password) if use_password else None,
        token_path=token_path,
        base_url=base_url or cloud.endpoints["account"],
        timeout_s=timeout_s,
    )


async def test_one_password_login_serves_both_sids(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    auth = make_auth(cloud, session, token_path)

    mina = await auth.credentials(SID_MINA)
    miot = await auth.credentials(SID_MIOT)

    assert cloud.password_logins == 1
    assert cloud.service_tokens[mina.service_token] == (SID_MINA, mina.ssecurity)
    assert cloud.service_tokens[miot.service_token] == (SID_MIOT, miot.ssecurity)
    assert mina.user_id == miot.user_id == str(cloud.user_id)
    # The second sid was fetched with the passToken from the first login, not the password.
    first, second = cloud.calls_to(ACCOUNT, "/pass/serviceLogin")
    assert "passToken" not in first.cookies
    assert second.cookies["passToken"] in cloud.pass_tokens
    assert second.cookies["deviceId"] == first.cookies["deviceId"] == auth.device_id
    assert [call.status for call in cloud.calls_to(STS)] == [200, 200]
    # The hash is the upper-case MD5, and the password itself never goes on the wire.
    (auth2,) = cloud.calls_to(ACCOUNT, "/pass/serviceLoginAuth2")
    assert auth2.form["hash"].isupper()
    assert cloud.password not in json.dumps([call.form for call in cloud.calls])


async def test_token_cache_is_reused_after_a_restart(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    first = make_auth(cloud, session, token_path)
    mina = await first.credentials(SID_MINA)
    await first.credentials(SID_MIOT)
    assert file_mode(token_path) == 0o600
    calls_before = len(cloud.calls)

    restarted = make_auth(cloud, session, token_path)
    again = await restarted.credentials(SID_MINA)
    await restarted.credentials(SID_MIOT)

    assert again.service_token == mina.service_token
    assert restarted.device_id == first.device_id
    assert len(cloud.calls) == calls_before  # no login call at all
    assert cloud.password_logins == 1


async def test_cache_file_is_owner_only_even_with_a_permissive_umask(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    old = os.umask(0)
    try:
        await make_auth(cloud, session, token_path).credentials(SID_MINA)
    finally:
        os.umask(old)
    assert file_mode(token_path) == 0o600
    assert os.listdir(token_path.parent) == [token_path.name]


async def test_a_copied_in_cache_is_tightened_and_read(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    await make_auth(cloud, session, token_path).credentials(SID_MINA)
    chmod(token_path, 0o644)
    calls_before = len(cloud.calls)

    await make_auth(cloud, session, token_path).credentials(SID_MINA)

    assert file_mode(token_path) == 0o600
    assert len(cloud.calls) == calls_before


async def test_relogin_uses_the_pass_token_then_the_password(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    now = [0.0]
    auth = XiaomiAuth(
        session,
        account=cloud.account,
        password=cloud.password,
        token_path=token_path,
        base_url=cloud.endpoints["account"],
        clock=lambda: now[0],
    )
    stale = await auth.credentials(SID_MINA)
    cloud.expire_tokens()

    fresh = await auth.relogin(SID_MINA, stale)
    assert fresh.service_token != stale.service_token
    assert cloud.password_logins == 1  # the passToken did it

    # A concurrent waiter holding the same stale token gets the new one without a login.
    assert (await auth.relogin(SID_MINA, stale)).service_token == fresh.service_token

    # Rejected again at once: no login storm, a clear error instead.
    with pytest.raises(TokenExpiredError):
        await auth.relogin(SID_MINA, fresh)

    now[0] += 60
    cloud.expire_tokens()
    cloud.expire_pass_tokens()
    newest = await auth.relogin(SID_MINA, fresh)
    assert cloud.service_tokens[newest.service_token][0] == SID_MINA
    assert cloud.password_logins == 2


@pytest.mark.parametrize(
    "case",
    [
        ("invalid", InvalidCredentialsError, "invalid_credentials", 22, "70016"),
        ("captcha", CaptchaRequiredError, "captcha_required", 23, "87001"),
        ("verification", VerificationRequiredError, "verification_required", 24, "/identity/"),
    ],
)
async def test_login_failures_have_codes_and_actionable_messages(
    cloud: FakeXiaomiCloud,
    session: aiohttp.ClientSession,
    token_path: Path,
    case: tuple[str, type[XiaomiAuthError], str, int, str],
) -> None:
    failure, error, code, exit_code, hint = case
    cloud.login_failure = failure
    auth = make_auth(cloud, session, token_path)

    with pytest.raises(error) as caught:
        await auth.credentials(SID_MINA)

    assert isinstance(caught.value, BridgeError)
    assert caught.value.code == code
    assert caught.value.exit_code == exit_code
    assert hint in str(caught.value)
    assert "passToken" in str(caught.value)  # every one names the paste-a-passToken way out
    assert not cloud.calls_to(STS)


async def test_verification_error_carries_the_url_to_open(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    cloud.login_failure = "verification"
    with pytest.raises(VerificationRequiredError) as caught:
        await make_auth(cloud, session, token_path).credentials(SID_MINA)
    url = caught.value.notification_url
    assert url.startswith(cloud.url + "/account/identity/authStart?sid=micoapi&context=")
    assert url in str(caught.value)


async def test_wrong_password_is_70016(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    auth = make_auth(cloud, session, token_path, password="wrong")
    with pytest.raises(InvalidCredentialsError):
        await auth.credentials(SID_MINA)


async def test_device_id_survives_a_failed_login(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    cloud.login_failure = "invalid"
    first = make_auth(cloud, session, token_path)
    with pytest.raises(InvalidCredentialsError):
        await first.credentials(SID_MINA)
    cloud.login_failure = None

    second = make_auth(cloud, session, token_path)
    await second.credentials(SID_MINA)

    assert second.device_id == first.device_id
    assert {call.cookies["deviceId"] for call in cloud.calls_to(ACCOUNT)} == {first.device_id}


async def test_no_password_and_no_cache_asks_to_log_in(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    auth = make_auth(cloud, session, token_path, use_password=False)
    with pytest.raises(LoginRequiredError, match="xiaoai-bridge login"):
        await auth.credentials(SID_MINA)
    assert cloud.password_logins == 0


async def test_pasted_pass_token_logs_in_without_a_password(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    cloud.pass_tokens.add("V1:pasted/token+from=browser")
    user_id, pass_token = parse_pasted_login(
        f'uLocale=zh_CN; userId={cloud.user_id}; passToken="V1:pasted/token+from=browser"'
    )
    auth = make_auth(cloud, session, token_path, use_password=False)

    await auth.login_with_pass_token(user_id, pass_token)

    assert auth.has_credentials(SID_MINA)
    assert auth.has_credentials(SID_MIOT)
    assert cloud.password_logins == 0
    restarted = make_auth(cloud, session, token_path, use_password=False)
    assert (await restarted.credentials(SID_MIOT)).user_id == str(cloud.user_id)


async def test_pass_token_from_the_config_is_used_when_the_cache_has_none(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    cloud.pass_tokens.add("V1:configured")
    auth = XiaomiAuth(
        session,
        account=cloud.account,
        pass_token="V1:configured",
        user_id=str(cloud.user_id),
        token_path=token_path,
        base_url=cloud.endpoints["account"],
    )

    creds = await auth.credentials(SID_MINA)

    assert cloud.service_tokens[creds.service_token][0] == SID_MINA
    assert cloud.password_logins == 0


async def test_a_rejected_pasted_pass_token_is_reported(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    auth = make_auth(cloud, session, token_path, use_password=False)
    with pytest.raises(LoginRequiredError, match="did not accept"):
        await auth.login_with_pass_token(str(cloud.user_id), "V1:unknown")
    with pytest.raises(LoginRequiredError, match="passToken"):
        parse_pasted_login("userId=1")


async def test_network_failure_is_translated(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    auth = make_auth(cloud, session, token_path, base_url=f"http://127.0.0.1:{closed_port}")
    with pytest.raises(XiaomiNetworkError) as caught:
        await auth.credentials(SID_MINA)
    assert caught.value.code == "network"
    assert "127.0.0.1" not in str(caught.value)  # URLs (and their secrets) stay out


async def test_server_error_and_timeout_then_recovery(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path
) -> None:
    auth = make_auth(cloud, session, token_path, timeout_s=0.05)
    cloud.fail(ACCOUNT, 503)
    with pytest.raises(XiaomiServerError) as caught:
        await auth.credentials(SID_MINA)
    assert caught.value.status == 503

    cloud.stall(ACCOUNT)
    with pytest.raises(XiaomiNetworkError, match="timed out"):
        await asyncio.wait_for(auth.credentials(SID_MINA), 2)

    assert (await auth.credentials(SID_MINA)).sid == SID_MINA


def test_login_json_prefix_is_stripped() -> None:
    assert parse_login_json('&&&START&&&{"code":70016}') == {"code": 70016}
    with pytest.raises(XiaomiError):
        parse_login_json("<html>captive portal</html>")


async def test_secrets_never_reach_the_log(
    cloud: FakeXiaomiCloud,
    session: aiohttp.ClientSession,
    token_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = make_auth(cloud, session, token_path)
    errors: list[str] = []
    mina = await auth.credentials(SID_MINA)
    miot = await auth.credentials(SID_MIOT)
    cloud.expire_tokens()
    cloud.expire_pass_tokens()
    await auth.relogin(SID_MINA, mina)
    for failure in ("invalid", "captcha", "verification"):
        cloud.login_failure = failure
        cloud.expire_pass_tokens()
        try:
            await auth.relogin(SID_MIOT, miot)
        except XiaomiError as err:
            errors.append(str(err))
        auth = make_auth(cloud, session, token_path)  # a fresh relogin cooldown
    write(token_path, "{not json")
    make_auth(cloud, session, token_path).has_credentials(SID_MINA)

    secrets = {cloud.password, str(cloud.user_id), *cloud.pass_tokens}
    secrets |= {call.form.get("hash", "") for call in cloud.calls} - {""}
    for token, (_, ssecurity) in cloud.service_tokens.items():
        secrets |= {token, ssecurity}
    secrets |= {mina.service_token, mina.ssecurity, miot.service_token, miot.ssecurity}
    assert len(errors) == 3
    logged = caplog.text + "\n".join(errors) + repr(mina) + repr(miot)
    assert caplog.records  # the flow did log
    for secret in secrets:
        assert secret not in logged


def write_cache(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o600)


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000 + b"]" * 100_000, b'{"deviceId": "\xff"}', b"[1, 2]", b"{", b""],
)
async def test_an_unreadable_token_cache_means_logging_in_again(
    cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, token_path: Path, content: bytes
) -> None:
    write_cache(token_path, content)

    creds = await make_auth(cloud, session, token_path).credentials(SID_MINA)

    assert creds.service_token
    assert cloud.password_logins == 1
