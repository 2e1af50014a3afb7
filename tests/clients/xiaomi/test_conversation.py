"""Conversation log client and per-speaker cursor against the fake cloud."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import cloud_auth
from tests.fakes.xiaomi_cloud import CONVERSATION, FakeXiaomiCloud
from xiaoai_bridge.clients.xiaomi import new_session
from xiaoai_bridge.clients.xiaomi.conversation import (
    ConversationAnswer,
    ConversationClient,
    ConversationCursor,
    parse_conversation,
)
from xiaoai_bridge.clients.xiaomi.errors import XiaomiApiError, XiaomiServerError

START_S = 1_767_000_000.0


class Clock:
    """Shared fake wall clock for the cloud and the cursor."""

    def __init__(self) -> None:
        self.now = START_S

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cloud(clock: Clock) -> AsyncIterator[FakeXiaomiCloud]:
    async with FakeXiaomiCloud(clock=clock) as fake:
        yield fake


@pytest.fixture
async def client(cloud: FakeXiaomiCloud, tmp_path: Path) -> AsyncIterator[ConversationClient]:
    async with new_session() as session:
        auth = cloud_auth(cloud, session, tmp_path / "token.json")
        yield ConversationClient(session, auth, base_url=cloud.endpoints["conversation"])


def cursor_for(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock, **options: int | float
) -> ConversationCursor:
    speaker = cloud.speaker
    return ConversationCursor(
        client,
        speaker.device_id,
        speaker.hardware,
        clock=clock,
        start_ms=int(options.pop("start_ms", clock.now * 1000)),
        freshness_s=float(options.pop("freshness_s", 60.0)),
        limit=int(options.pop("limit", 2)),
        page_limit=int(options.pop("page_limit", 10)),
        max_pages=int(options.pop("max_pages", 3)),
    )


async def test_fetch_speaks_the_wire_format(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    cloud.say("今天天气怎么样", answer="今天晴")
    clock.now += 1
    cloud.say("播放周杰伦")

    page = await client.fetch(cloud.speaker.device_id, "LX06")

    assert [record.query for record in page.records] == ["播放周杰伦", "今天天气怎么样"]
    assert page.records[1].answers == (ConversationAnswer("TTS", "今天晴"),)
    assert page.records[0].time_ms == int(clock.now * 1000)
    (call,) = cloud.calls_to(CONVERSATION)
    assert call.query == {"source": "dialogu", "hardware": "LX06", "limit": "2"}
    assert call.cookies["deviceId"] == cloud.speaker.device_id
    assert {"userId", "serviceToken"} <= set(call.cookies)


def test_parse_conversation_data_is_a_json_string() -> None:
    data = {
        "bitSet": [0, 1, 1],
        "records": [
            {
                "time": 1677851434593,
                "query": "放首歌",
                "requestId": "abc",
                "answers": [
                    {"type": "TTS", "tts": {"text": "好的"}},
                    {"type": "AUDIO", "audio": {"audioInfoList": [{"title": "晴天"}]}},
                    {"type": "LLM", "llm": {"text": "我来回答"}},
                ],
            }
        ],
        "nextEndTime": 0,
    }
    page = parse_conversation(
        json.dumps({"code": 0, "message": "Success", "data": json.dumps(data)})
    )
    (record,) = page.records
    assert record.answers == (
        ConversationAnswer("TTS", "好的"),
        ConversationAnswer("AUDIO", "晴天"),
        ConversationAnswer("LLM", "我来回答"),
    )
    with pytest.raises(XiaomiApiError) as caught:
        parse_conversation(json.dumps({"code": 601, "message": "illegal argument exception"}))
    assert caught.value.api_code == 601


async def test_old_records_are_ignored_and_a_new_one_comes_once(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    cloud.say("昨天的问题", time_ms=int((clock.now - 86400) * 1000))
    cloud.say("刚才的问题", time_ms=int((clock.now - 2) * 1000))
    cursor = cursor_for(cloud, client, clock)

    assert await cursor.poll() == []
    clock.now += 1
    said = cloud.say("请问现在几点")
    first = await cursor.poll()
    clock.now += 1
    second = await cursor.poll()

    assert [record.query for record in first] == ["请问现在几点"]
    assert first[0].request_id == said["requestId"]
    assert second == []


async def test_three_records_between_polls_come_in_order(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    cursor = cursor_for(cloud, client, clock)
    assert await cursor.poll() == []
    for text in ("第一", "第二", "第三"):
        clock.now += 0.4
        cloud.say(text)

    records = await cursor.poll()

    assert [record.query for record in records] == ["第一", "第二", "第三"]
    # The newest page was full of new records, so it paged back with a larger limit.
    paging = cloud.calls_to(CONVERSATION)[-1]
    assert paging.query["limit"] == "10"
    assert paging.query["timestamp"] == str(records[1].time_ms)
    assert await cursor.poll() == []


async def test_pages_back_until_it_reaches_the_cursor(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    cloud.say("旧的", time_ms=int((clock.now - 1) * 1000))
    cursor = cursor_for(cloud, client, clock, page_limit=4)
    assert await cursor.poll() == []
    texts = [f"问题{i}" for i in range(8)]
    for text in texts:
        clock.now += 0.5
        cloud.say(text)

    records = await cursor.poll()

    assert [record.query for record in records] == texts
    limits = [call.query["limit"] for call in cloud.calls_to(CONVERSATION)[1:]]
    assert limits == ["2", "4", "4", "4"]


async def test_paging_stops_after_max_pages(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    cursor = cursor_for(cloud, client, clock, page_limit=3, max_pages=1)
    assert await cursor.poll() == []
    for i in range(6):
        clock.now += 0.5
        cloud.say(f"问题{i}")

    records = await cursor.poll()

    # 2 from the first page and 2 more from the one page back; the rest are skipped for good.
    assert [record.query for record in records] == ["问题2", "问题3", "问题4", "问题5"]
    clock.now += 0.5
    cloud.say("之后")
    assert [record.query for record in await cursor.poll()] == ["之后"]


async def test_records_outside_the_freshness_window_are_dropped(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    # A cursor that started long ago (say the cloud was down since): stale records are not
    # answered late, fresh ones are.
    cursor = cursor_for(cloud, client, clock, start_ms=int((clock.now - 600) * 1000))
    cloud.say("两分钟前的问题", time_ms=int((clock.now - 120) * 1000))
    cloud.say("刚刚的问题", time_ms=int((clock.now - 5) * 1000))

    assert [record.query for record in await cursor.poll()] == ["刚刚的问题"]
    assert await cursor.poll() == []


async def test_records_with_the_same_time_are_each_returned_once(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    cursor = cursor_for(cloud, client, clock)
    clock.now += 1
    cloud.say("甲")
    assert [record.query for record in await cursor.poll()] == ["甲"]
    cloud.say("乙")  # same millisecond as 甲

    assert [record.query for record in await cursor.poll()] == ["乙"]
    assert await cursor.poll() == []


async def test_cloud_errors_lose_and_repeat_nothing(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    cursor = cursor_for(cloud, client, clock)
    assert await cursor.poll() == []
    clock.now += 1
    cloud.say("请问一")
    cloud.fail(CONVERSATION, 503)
    with pytest.raises(XiaomiServerError):
        await cursor.poll()
    clock.now += 1
    cloud.say("请问二")

    assert [record.query for record in await cursor.poll()] == ["请问一", "请问二"]
    assert await cursor.poll() == []


async def test_expired_token_mid_poll_relogs_in(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    cursor = cursor_for(cloud, client, clock)
    assert await cursor.poll() == []
    cloud.expire_tokens()
    clock.now += 1
    cloud.say("请问天气")

    assert [record.query for record in await cursor.poll()] == ["请问天气"]
    assert [call.status for call in cloud.calls_to(CONVERSATION)] == [200, 401, 200]
    assert cloud.password_logins == 1


async def test_each_speaker_has_its_own_cursor(
    cloud: FakeXiaomiCloud, client: ConversationClient, clock: Clock
) -> None:
    other = cloud.add_speaker("卧室", "L05C")
    first = cursor_for(cloud, client, clock)
    second = ConversationCursor(client, other.device_id, other.hardware, clock=clock)
    clock.now += 1
    cloud.say("客厅的问题")
    cloud.say("卧室的问题", device_id=other.device_id)

    assert [record.query for record in await first.poll()] == ["客厅的问题"]
    assert [record.query for record in await second.poll()] == ["卧室的问题"]
    assert cloud.calls_to(CONVERSATION)[-1].query["hardware"] == "L05C"
