"""The status page in a real headless Chromium: live conversations, masked secrets, controls."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright, expect
from pydantic import SecretStr

from tests.conftest import API_KEY, Probe, make_settings
from tests.e2e.test_http import MQTT_PASSWORD, TOKEN, Running, http_settings, running
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI, Fault, ScriptedCall, ToolRound
from tests.pipeline.test_tool_loop import Shelf
from xiaoai_bridge.config import HttpSettings, MqttSettings
from xiaoai_bridge.models import SpeakerId
from xiaoai_bridge.pipeline.pipeline import APOLOGIES
from xiaoai_bridge.pipeline.tool_ports import ToolOutput

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    # A name for the attacker's site that resolves to loopback, as DNS rebinding makes it.
    "--host-resolver-rules=MAP evil.example 127.0.0.1",
]
SCREENSHOT = Path(os.environ.get("STATUS_PAGE_SCREENSHOT", "/tmp/status-page.png"))  # noqa: S108
UI_WAIT_MS = 10_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """The system Chromium, headless, driven by Playwright (no browser download)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def bridge(
    tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> AsyncIterator[Running]:
    """The service with a page token and a broker password in its config."""
    settings = make_settings(
        tmp_path,
        mosquitto,
        llm,
        http=HttpSettings(port=0, token=SecretStr(TOKEN)),
        mqtt=MqttSettings(
            url=f"mqtt://bridge:{MQTT_PASSWORD}@127.0.0.1:{mosquitto.port}",
            client_id="bridge-under-test",
        ),
    )
    async with running(settings, token=TOKEN) as started:
        await probe.wait_status("online")
        yield started


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", self._page_error)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "assert"):
            self.errors.append(f"console.{message.type}: {message.text}")

    def _page_error(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error}")


async def open_page(browser: Browser, bridge: Running, **context: object) -> tuple[Page, Console]:
    """The status page, loaded and following the live feed."""
    page = await browser.new_page(viewport={"width": 1360, "height": 900}, **context)  # type: ignore[arg-type]
    console = Console(page)
    await page.goto(f"{bridge.base}/?token={TOKEN}")
    await expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=UI_WAIT_MS)
    return page, console


async def test_status_page_shows_live_answers_masks_secrets_and_its_controls_work(
    browser: Browser, bridge: Running, probe: Probe, llm: FakeOpenAI, mosquitto: Mosquitto
) -> None:
    page, console = await open_page(browser, bridge)
    await expect(page.locator("#health")).to_have_text("healthy")
    mqtt = page.locator('#adapters li[data-adapter="mqtt"]')
    await expect(mqtt.locator(".state")).to_have_text("connected")
    # Tool sources have a panel of their own, each ok or down.
    await expect(page.locator('#tool-sources li[data-source="builtin"] .state')).to_have_text("ok")
    await expect(page.locator("#empty")).to_be_visible()

    # A question over MQTT appears, and its answer streams in sentence by sentence.
    llm.answer = "今天北京晴，最高气温二十五度。" + "适合出门散步，记得带水。" * 3
    llm.token_delay = 0.08
    await probe.ask({"text": "小爱同学机器人今天北京天气怎么样", "device": "kitchen", "id": "m1"})
    kitchen = page.locator('.speaker[data-device="kitchen"]')
    turn = kitchen.locator(".turn").first
    await expect(turn.locator(".question")).to_have_text(
        "小爱同学机器人今天北京天气怎么样", timeout=UI_WAIT_MS
    )
    # Caught mid-answer: the first sentence is shown while the turn is still streaming.
    await page.wait_for_function(
        """([first, whole]) => {
            const turn = document.querySelector('.speaker[data-device="kitchen"] .turn');
            const answer = turn && turn.querySelector('.answer').textContent;
            return turn.classList.contains('streaming') && answer.startsWith(first)
                && answer.length < whole.length;
        }""",
        arg=["今天北京晴，最高气温二十五度。", llm.answer],
        timeout=UI_WAIT_MS,
    )
    await expect(turn).to_have_class(re.compile(r"\banswered\b"), timeout=UI_WAIT_MS)
    await expect(turn.locator(".answer")).to_have_text(llm.answer)
    await expect(turn.locator(".meta .chip")).to_have_text("answered")
    await expect(turn.locator(".timing").first).to_contain_text("first sentence")
    await expect(page.locator("#chart rect.bar-total")).to_have_count(1)
    await expect(page.locator("#empty")).to_be_hidden()

    # A failure shows what went wrong, in words.
    llm.fail_next(Fault.SERVER_ERROR, retry_after=0)
    await probe.ask({"text": "再说一遍", "device": "kitchen", "id": "m2"})
    failed = kitchen.locator(".turn").first
    await expect(failed).to_have_class(re.compile(r"\bfailed\b"), timeout=UI_WAIT_MS)
    await expect(failed.locator(".answer")).to_have_text(APOLOGIES["server_error"])
    await expect(failed.locator(".reason")).to_have_text("the LLM server failed")
    await expect(page.locator("#stat-failed")).to_have_text("1")

    # The ask box puts a question through the same pipeline as a given speaker.
    llm.answer = "今天是星期三。"
    llm.token_delay = 0.0
    await page.locator("#ask-device").fill("bedroom")
    await page.locator("#ask-text").fill("今天星期几")
    await page.get_by_role("button", name="Ask").click()
    bedroom = page.locator('.speaker[data-device="bedroom"]')
    await expect(bedroom.locator(".answer")).to_have_text("今天是星期三。", timeout=UI_WAIT_MS)
    await expect(bedroom.locator(".q-meta")).to_contain_text("http")
    assert llm.last_request.messages[-1] == {"role": "user", "content": "今天星期几"}
    await expect(page.locator("#ask-text")).to_have_value("")
    # The most recently active speaker comes first.
    await expect(page.locator(".speaker").first).to_have_attribute("data-device", "bedroom")

    # Secrets are masked everywhere on the page, the config included.
    await page.locator(".config summary", has_text="[mqtt]").click()
    await expect(page.locator(".config")).to_contain_text(
        f"mqtt://bridge:***@127.0.0.1:{mosquitto.port}"
    )
    html = await page.content()
    text = await page.locator("body").inner_text()
    for secret in (TOKEN, MQTT_PASSWORD, API_KEY):
        assert secret not in html
        assert secret not in text

    # The answering switch and the forget button reach the pipeline.
    switch = page.locator("label.switch")
    await switch.click()
    await expect(page.locator("#toast")).to_contain_text("switched off")
    assert bridge.service.controls.answering is False
    await switch.click()
    await expect(page.locator("#toast")).to_contain_text("switched on")
    assert bridge.service.controls.answering is True
    await kitchen.get_by_role("button", name="Forget").click()
    await expect(page.locator("#toast")).to_contain_text("kitchen: forgot 1 turn")
    assert await bridge.service.pipeline.memory.history(SpeakerId("mqtt", "kitchen")) == []

    await page.locator("#toast").evaluate("node => node.classList.remove('show')")
    await expect(page.locator("#toast")).to_have_css("opacity", "0")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert console.errors == []
    await page.close()


async def test_status_page_in_dark_mode_shows_conversations_from_before_it_opened(
    browser: Browser, bridge: Running, probe: Probe, llm: FakeOpenAI
) -> None:
    llm.answer = "好的，我在。"
    await probe.ask({"text": "你好", "device": "study", "id": "d1"})
    await probe.reply_json()
    page, console = await open_page(browser, bridge, color_scheme="dark")
    # Conversations from before the page opened come with the first state.
    study = page.locator('.speaker[data-device="study"]')
    await expect(study.locator(".answer")).to_have_text("好的，我在。")
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(15, 17, 21)"
    await page.screenshot(path=str(SCREENSHOT.with_name(SCREENSHOT.stem + "-dark.png")))
    assert console.errors == []
    await page.close()


@contextlib.asynccontextmanager
async def foreign_site() -> AsyncIterator[str]:
    """Another web site the user happens to visit (on loopback); yields its base URL."""

    async def home(request: web.Request) -> web.Response:
        return web.Response(text="<p>cute cats</p>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", home)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://evil.example:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_page_of_another_site_cannot_drive_or_read_the_status_page(
    browser: Browser, tmp_path: Path, mosquitto: Mosquitto, llm: FakeOpenAI, probe: Probe
) -> None:
    # The default: loopback and no token, where only the browser's origin rules protect it.
    async with running(http_settings(tmp_path, mosquitto, llm)) as bridge, foreign_site() as evil:
        await probe.wait_status("online")
        llm.answer = "记住了。"
        await probe.ask({"text": "我叫小明", "device": "den", "id": 1})
        await probe.reply_json()
        page = await browser.new_page()
        await page.goto(evil)
        attempts = await page.evaluate(
            """async (base) => {
                const outcomes = [];
                const tries = [
                    // A "simple" request: sent without asking, its answer unreadable.
                    ["api/answering", {mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                       body: '{"enabled": false}'}],
                    ["api/forget", {mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                    body: '{"device": "den"}'}],
                    ["api/ask", {mode: "no-cors", body: '{"text": "spam"}'}],
                    // JSON needs a preflight, which is refused.
                    ["api/answering", {headers: {"Content-Type": "application/json"},
                                       body: '{"enabled": false}'}],
                ];
                for (const [path, init] of tries) {
                    try {
                        const response = await fetch(base + path, {method: "POST", ...init});
                        outcomes.push(response.type);
                    } catch (error) {
                        outcomes.push("refused");
                    }
                }
                return outcomes;
            }""",
            bridge.base + "/",
        )
        assert attempts == ["opaque", "opaque", "opaque", "refused"]
        assert bridge.service.controls.answering is True
        assert len(await bridge.service.pipeline.memory.history(SpeakerId("mqtt", "den"))) == 2
        assert len(llm.requests) == 1

        # DNS rebinding: the attacker's name now points at this machine, same port.
        rebound = f"http://evil.example:{bridge.http.port}/"
        response = await page.goto(rebound)
        assert response is not None
        assert response.status == 421
        status = await page.evaluate("fetch('/api/state').then((r) => r.status)")
        assert status == 421
        await page.close()


async def test_tool_calls_and_tool_sources_are_shown_as_text_never_as_markup(
    browser: Browser, bridge: Running, probe: Probe, llm: FakeOpenAI
) -> None:
    house = Shelf("house")
    hostile = "<img src=x onerror=\"window.pwned='{}'\">"

    async def turn_off(arguments: Mapping[str, object]) -> ToolOutput:
        return f"<script>window.pwned='result'</script>{arguments['name']} is off"

    house.add("turn_off", turn_off)
    search = Shelf("mcp:search", down=f"{hostile.format('detail')} connection refused")
    bridge.service.tools.add(house)
    bridge.service.tools.add(search)
    page, console = await open_page(browser, bridge)
    panel = page.locator("#tool-sources")
    await expect(panel.locator('li[data-source="house"] .state')).to_have_text("ok")
    await expect(panel.locator('li[data-source="house"] .detail')).to_have_text(
        "1 tool · on the shelf"
    )
    down = panel.locator('li[data-source="mcp:search"]')
    await expect(down.locator(".state")).to_have_text("down")
    await expect(down.locator(".detail")).to_have_text(f"0 tools · {search.down}")

    arguments = json.dumps({"name": hostile.format("arguments")}, ensure_ascii=False)
    llm.script(
        ToolRound(
            (
                ScriptedCall("call_1", "turn_off", arguments),
                ScriptedCall("call_2", hostile.format("name"), "{}"),
            )
        ),
        "客厅灯关了。",
    )
    await probe.ask({"text": "把客厅灯关了", "device": "hall", "id": "t1"})
    turn = page.locator('.speaker[data-device="hall"] .turn').first
    await expect(turn).to_have_class(re.compile(r"\banswered\b"), timeout=UI_WAIT_MS)
    calls = turn.locator(".tool-call")
    await expect(calls).to_have_count(2)
    first = calls.nth(0)
    await expect(first).to_have_class(re.compile(r"\bok\b"))
    await expect(first.locator(".tool-name")).to_have_text("turn_off")
    await expect(first.locator(".tool-args")).to_have_text(arguments)
    await expect(first.locator(".tool-result")).to_have_text(
        f"<script>window.pwned='result'</script>{hostile.format('arguments')} is off"
    )
    await expect(first.locator(".timing")).to_have_text(re.compile(r"^\d+ ms$"))
    second = calls.nth(1)
    await expect(second.locator(".tool-name")).to_have_text(hostile.format("name"))
    await expect(second.locator(".chip")).to_have_text("no such tool")

    # The source comes back: a page already open hears of it.
    search.down = ""
    await expect(down.locator(".state")).to_have_text("ok", timeout=UI_WAIT_MS)
    await expect(down.locator(".detail")).to_have_text("0 tools · on the shelf")
    # Nothing the model or a server said became markup, let alone ran.
    assert await page.locator("#speakers img, #tool-sources img, #speakers script").count() == 0
    assert await page.evaluate("window.pwned") is None
    await page.screenshot(path=str(SCREENSHOT.with_name(SCREENSHOT.stem + "-tools.png")))
    assert console.errors == []
    await page.close()
