"""Fixtures shared by the Xiaomi client tests: the fake cloud, a session, a logged-out auth."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.xiaomi_cloud import FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi import new_session
from xiaoai_bridge.clients.xiaomi.auth import XiaomiAuth


@pytest.fixture
async def cloud() -> AsyncIterator[FakeXiaomiCloud]:
    """The fake Xiaomi cloud on a free loopback port."""
    async with FakeXiaomiCloud() as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session as the clients want it (no cookie jar)."""
    async with new_session() as http:
        yield http


@pytest.fixture
def auth(cloud: FakeXiaomiCloud, session: aiohttp.ClientSession, tmp_path: Path) -> XiaomiAuth:
    """The fake account's login, with its token cache in the test's folder."""
    return XiaomiAuth(
        session,
        account=cloud.account,
        password=cloud.password,
        token_path=tmp_path / "token.json",
        base_url=cloud.endpoints["account"],
    )
