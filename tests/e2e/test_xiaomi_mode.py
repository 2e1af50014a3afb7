"""Xiaomi cloud mode end to end: the conversation log is polled, XiaoAi silenced, the LLM spoken."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from tests.conftest import llm_settings
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.xiaomi_cloud import CONVERSATION, HOSTILE_BODIES, FakeXiaomiCloud
from xiaoai_bridge.app import open_service, run_service, serve
from xiaoai_bridge.clients.xiaomi import InvalidCredentialsError
from xiaoai_bridge.config import (
    XIAOMI_TOKEN_FILE,
    HttpSettings,
    Settings,
    XiaomiEndpoints,
    XiaomiSettings,
)
from xiaoai_bridge.sources.xiaomi import XiaomiSource


@pytest.fixture
async def cloud() -> AsyncIterator[FakeXiaomiCloud]:
    async with FakeXiaomiCloud() as fake:
        yield fake


def xiaomi_settings(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI, **values: object
) -> Settings:
    xiaomi: dict[str, object] = {
        "account": cloud.account,
        "password": SecretStr(cloud.password),
        "poll_interval_s": 0.2,
        "chars_per_second": 200.0,
        "endpoints": XiaomiEndpoints(**cloud.endpoints),
    }
    xiaomi.update(values)
    return Settings(
        data_dir=tmp_path / "data",
        http=HttpSettings(port=0),
        llm=llm_settings(llm),
        xiaomi=XiaomiSettings.model_validate(xiaomi),
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, cloud: FakeXiaomiCloud) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(settings, stop=stop))
    before = len(cloud.calls_to("conversation"))
    async with asyncio.timeout(10):  # polling has begun once the log was read twice
        while len(cloud.calls_to("conversation")) < before + 2:
            await asyncio.sleep(0.05)
            if task.done():
                task.result()
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


async def wait_until(condition: Callable[[], bool], within_s: float = 10) -> None:
    # The fake cloud has no event to wait on: poll it, as the bridge itself does.
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_question_is_answered_and_xiaoai_silenced_first(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cloud.say("以前说过的话")  # before the start: never answered
    llm.answer = "北京今天晴。最高二十五度。"
    async with running(xiaomi_settings(tmp_path, cloud, llm), cloud):
        cloud.say("打开客厅的灯")  # XiaoAi's business
        cloud.say("请问北京天气怎么样")
        await wait_until(lambda: "".join(cloud.tts_texts()) == "北京今天晴。最高二十五度。")
    assert [r.last_user_message for r in llm.requests] == ["请问北京天气怎么样"]
    pauses = [c for c in cloud.ubus_calls if c.method == "player_play_operation"]
    speech = [c for c in cloud.ubus_calls if c.method == "text_to_speech"]
    assert pauses
    assert pauses[0].time < speech[0].time
    assert cloud.password_logins == 1
    token_file = tmp_path / "data" / XIAOMI_TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    log = caplog.text
    assert cloud.password not in log
    assert str(cloud.user_id) not in log


async def test_token_cache_is_reused_and_expiry_is_survived(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    settings = xiaomi_settings(tmp_path, cloud, llm)
    llm.answer = "好的。"
    async with running(settings, cloud):
        cloud.say("请问第一个问题")
        await wait_until(lambda: len(cloud.tts_texts()) == 1)
    async with running(settings, cloud):  # restart: the cached tokens are used
        cloud.expire_tokens()  # ... until they expire mid-session
        cloud.say("请问第二个问题")
        await wait_until(lambda: len(cloud.tts_texts()) == 2)
    assert cloud.password_logins == 1  # the passToken renewed the service tokens
    assert [r.last_user_message for r in llm.requests] == ["请问第一个问题", "请问第二个问题"]


async def test_hostile_cloud_answers_neither_stop_the_service_nor_lose_the_next_question(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    llm.answer = "还在。"
    async with running(xiaomi_settings(tmp_path, cloud, llm), cloud):
        # Each unreadable answer backs the poller off (0.5 s, 1 s, ...), so only a few here;
        # tests/clients/xiaomi/test_hostile_answers.py tries every kind against every parser.
        for name in (
            "records of the wrong types",
            "invalid UTF-8",
            "hostile JSON in a string field",
        ):
            cloud.serve_raw(CONVERSATION, HOSTILE_BODIES[name])
        cloud.serve_raw(CONVERSATION, b'{"code":0,"data":"{', cut_short=True)
        await wait_until(lambda: cloud.faults_pending == 0)
        cloud.say("请问你还在吗")
        await wait_until(lambda: cloud.tts_texts() == ["还在。"], within_s=15)
    assert [r.last_user_message for r in llm.requests] == ["请问你还在吗"]


async def test_continuous_conversation_wakes_the_speaker(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    llm.answer = "回答。"
    async with running(xiaomi_settings(tmp_path, cloud, llm), cloud):
        cloud.say("开始持续对话")
        await wait_until(lambda: len(cloud.tts_texts()) == 1)
        cloud.say("没有关键词也回答")
        await wait_until(lambda: len(cloud.tts_texts()) == 2)
        await wait_until(lambda: len(cloud.action_calls) >= 2)  # woken after each answer
    assert [r.last_user_message for r in llm.requests] == ["没有关键词也回答"]


async def test_a_continuous_conversation_started_by_voice_reaches_the_xiaomi_poller(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    # The answer reaches the Xiaomi source by its typed route, not by a source-name match.
    llm.answer = "回答。"
    stop = asyncio.Event()
    async with open_service(xiaomi_settings(tmp_path, cloud, llm)) as service:
        serving = asyncio.create_task(serve(service, stop))
        [source] = service.sources
        assert isinstance(source, XiaomiSource)

        def continuous() -> bool:
            speakers = source.health()["speakers"]
            return bool(speakers[cloud.speaker.name]["continuous"])

        await wait_until(lambda: len(cloud.calls_to("conversation")) >= 2)
        assert not continuous()
        cloud.say("开始持续对话")
        await wait_until(continuous)
        stop.set()
        await serving


async def test_wrong_password_stops_the_service_with_its_code(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    cloud.login_failure = "invalid"
    with pytest.raises(InvalidCredentialsError):
        await asyncio.wait_for(run_service(xiaomi_settings(tmp_path, cloud, llm)), 10)


async def run_cli(tmp_path: Path, config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xiaoai_bridge.cli",
        *args,
        "--config",
        str(config),
        env={
            "HOME": str(tmp_path),
            "PATH": "/usr/bin:/bin",
            "XDG_DATA_HOME": str(tmp_path / "xdg"),
        },
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_config(tmp_path: Path, cloud: FakeXiaomiCloud, *, password: str) -> Path:
    endpoints = "\n".join(f'{key} = "{url}"' for key, url in cloud.endpoints.items())
    config = tmp_path / "mi.toml"
    config.write_text(
        f'[xiaomi]\naccount = "{cloud.account}"\npassword = "{password}"\n'
        f"[xiaomi.endpoints]\n{endpoints}\n"
    )
    config.chmod(0o600)  # it holds a password
    return config


async def test_login_and_devices_commands(tmp_path: Path, cloud: FakeXiaomiCloud) -> None:
    config = cli_config(tmp_path, cloud, password=cloud.password)
    code, out, _ = await run_cli(tmp_path, config, "login")
    assert code == 0, out
    assert "logged in" in out
    cache = tmp_path / "xdg" / "xiaoai-bridge" / XIAOMI_TOKEN_FILE
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    code, out, _ = await run_cli(tmp_path, config, "devices")
    assert code == 0
    speaker = cloud.speaker
    row = next(line for line in out.splitlines() if speaker.device_id in line)
    assert speaker.hardware in row
    assert speaker.miot_did in row
    assert row.endswith("yes")
    assert cloud.password_logins == 1  # `devices` used the cached login
    code, out, _ = await run_cli(tmp_path, config, "check")
    xiaomi_line = next(line for line in out.splitlines() if "xiaomi:" in line)
    assert xiaomi_line.startswith("ok   xiaomi: logged in; speakers: ")
    assert speaker.hardware in xiaomi_line


@pytest.mark.parametrize(
    ("failure", "code", "words"),
    [("invalid", 22, "password"), ("captcha", 23, "captcha"), ("verification", 24, "verif")],
)
async def test_login_failures_have_their_own_code_and_advice(
    tmp_path: Path, cloud: FakeXiaomiCloud, failure: str, code: int, words: str
) -> None:
    cloud.login_failure = failure
    password = "wrong password" if failure == "invalid" else cloud.password
    config = cli_config(tmp_path, cloud, password=password)
    returned, _, err = await run_cli(tmp_path, config, "login")
    assert returned == code
    assert err.startswith("error: ")
    assert words in err.lower()
    assert "Traceback" not in err
    assert password not in err


async def test_healthz_follows_each_speakers_polling(
    tmp_path: Path, cloud: FakeXiaomiCloud, llm: FakeOpenAI
) -> None:
    entry = f"xiaomi {cloud.speaker.name}"
    stop = asyncio.Event()
    async with open_service(xiaomi_settings(tmp_path, cloud, llm)) as service:
        serving = asyncio.create_task(serve(service, stop))
        assert service.http is not None
        healthz = f"{service.http.url}healthz"
        async with aiohttp.ClientSession() as http:

            async def status() -> tuple[int, dict[str, Any]]:
                async with http.get(healthz) as response:
                    return response.status, await response.json()

            await wait_until(lambda: len(cloud.calls_to("conversation")) >= 2)
            code, body = await status()
            assert code == 200
            assert body["adapters"][entry]["state"] == "connected"
            cloud.fail("conversation", 503, times=1000)  # the cloud breaks mid-run
            async with asyncio.timeout(10):
                while (await status())[0] != 503:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            code, body = await status()
            assert body["adapters"][entry]["state"] == "reconnecting"
        stop.set()
        await asyncio.wait_for(serving, 15)
