"""DiscordSender: outbox rows -> channel messages through discord.py's REST client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

from bot.commands import OutgoingFile
from bot.delivery import PermanentFailure, RetryLater
from bot.discord.client import AtelierDiscordClient
from bot.discord.render import content_with_parameters, split_text
from bot.discord.sender import DiscordSender, outbox_nonce
from storage.models import OutboxStatus
from storage.outbox import OutboxItem
from tests.fake_discord_api import (
    APP_ID,
    CHANNEL_ID,
    THREAD_ID,
    FakeDiscordAPI,
    RecordingHandler,
    connected,
    patch_route_base,
)

T = TypeVar("T")
MESSAGES = rf"/channels/{THREAD_ID}/messages"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
RESULT_EXTRA = {
    "seed": 1234,
    "prompt": "a fox in the snow, inkwsh",
    "parameters": {"steps": 25, "cfg": 7.0, "size": "512x512", "sampler": "euler_a"},
}
RATE_LIMITED = {"message": "You are being rate limited.", "global": False}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscordAPI]:
    fake = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    patch_route_base(monkeypatch, fake)
    yield fake
    fake.close()


def outbox_item(**changes: Any) -> OutboxItem:
    values: dict[str, Any] = {
        "id": 1,
        "key": "job:7:result",
        "team_id": 1,
        "platform": "discord",
        "channel": str(CHANNEL_ID),
        "thread": str(THREAD_ID),
        "text": "Here is your fox.",
        "attachments": [],
        "extra": {},
        "revision": 1,
        "platform_message_id": None,
        "attempts": 0,
        "status": OutboxStatus.PENDING,
        "error": None,
        "created_at": datetime.now(UTC),
    }
    values.update(changes)
    return OutboxItem(**values)


def with_sender(api: FakeDiscordAPI, work: Callable[[DiscordSender], Awaitable[T]]) -> T:
    async def scenario() -> T:
        async with connected(api, RecordingHandler()) as client:
            return await work(DiscordSender(client))

    return asyncio.run(scenario())


def post(sender: DiscordSender, item: OutboxItem, files: Sequence[OutgoingFile] = ()) -> Any:
    # The deliverer calls the sender from a worker thread, as here.
    return asyncio.to_thread(sender.post, item, files)


def test_result_is_posted_with_its_image_and_an_embed_of_seed_and_parameters(
    api: FakeDiscordAPI,
) -> None:
    files = [OutgoingFile("fox_1234.png", PNG)]
    message_id = with_sender(api, lambda s: post(s, outbox_item(extra=RESULT_EXTRA), files))

    (call,) = api.find("POST", MESSAGES)  # a thread is its own channel on Discord
    assert api.messages[message_id]["channel_id"] == str(THREAD_ID)
    assert list(call.files.values()) == [("fox_1234.png", PNG)]
    content = call.json["content"]
    assert content.startswith("Here is your fox.")
    assert "Seed: 1234" in content and "steps: 25" in content and "size: 512x512" in content
    (embed,) = call.json["embeds"]
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Seed"] == "1234"
    assert (fields["steps"], fields["cfg"], fields["sampler"]) == ("25", "7.0", "euler_a")
    assert embed["description"] == "a fox in the snow, inkwsh"
    assert embed["image"]["url"] == "attachment://fox_1234.png"
    # A re-post after a crash carries the same enforced nonce, so Discord dedupes it.
    assert call.json["enforce_nonce"] is True
    assert call.json["nonce"] == outbox_nonce(outbox_item(extra=RESULT_EXTRA).key)


def test_progress_edits_the_same_message_in_place(api: FakeDiscordAPI) -> None:
    async def work(sender: DiscordSender) -> str:
        first = outbox_item(key="job:9:progress", text="Training inkwash: step 10/100")
        message_id = await post(sender, first)
        second = outbox_item(
            key="job:9:progress",
            text="Training inkwash: step 50/100, loss 0.091",
            revision=2,
            platform_message_id=message_id,
        )
        await asyncio.to_thread(sender.edit, second, [OutgoingFile("sample_50.png", PNG)])
        third = outbox_item(
            key="job:9:progress",
            text="Training inkwash: done",
            revision=3,
            platform_message_id=message_id,
        )
        await asyncio.to_thread(sender.edit, third, [])
        return message_id

    message_id = with_sender(api, work)
    assert len(api.find("POST", MESSAGES)) == 1
    edits = api.find("PATCH", rf"{MESSAGES}/{message_id}")
    assert [e.json["content"] for e in edits] == [
        "Training inkwash: step 50/100, loss 0.091",
        "Training inkwash: done",
    ]
    assert list(edits[0].files.values()) == [("sample_50.png", PNG)]
    # The row is the message's whole content: an edit without files drops the old ones.
    assert edits[1].files == {} and edits[1].json["attachments"] == []


def test_long_rate_limit_becomes_retry_later(api: FakeDiscordAPI) -> None:
    api.fail_next(
        "POST",
        MESSAGES,
        429,
        {**RATE_LIMITED, "retry_after": 64.5},
        headers={"Retry-After": "65", "Via": "1.1 google", "X-RateLimit-Scope": "user"},
    )

    async def work(sender: DiscordSender) -> None:
        with pytest.raises(RetryLater) as caught:
            await post(sender, outbox_item())
        assert caught.value.seconds == 64.5

    with_sender(api, work)
    assert len(api.find("POST", MESSAGES)) == 1  # not retried in place
    assert api.messages == {}


def test_short_rate_limit_is_waited_out_by_discord_py(api: FakeDiscordAPI) -> None:
    api.fail_next(
        "POST",
        MESSAGES,
        429,
        {**RATE_LIMITED, "retry_after": 0.01},
        headers={"Retry-After": "1", "Via": "1.1 google"},
    )
    message_id = with_sender(api, lambda s: post(s, outbox_item()))
    assert len(api.find("POST", MESSAGES)) == 2
    assert list(api.messages) == [message_id]


def test_edge_rate_limit_without_discord_body_uses_retry_after_header(
    api: FakeDiscordAPI,
) -> None:
    # A 429 from Cloudflare in front of Discord: no Via header, discord.py does not wait.
    api.fail_next("POST", MESSAGES, 429, "error code: 1015", headers={"Retry-After": "30"})

    async def work(sender: DiscordSender) -> None:
        with pytest.raises(RetryLater) as caught:
            await post(sender, outbox_item())
        assert caught.value.seconds == 30.0

    with_sender(api, work)


@pytest.mark.parametrize(
    ("status", "code", "message", "expected"),
    [
        (403, 50013, "Missing Permissions", "give the bot Send Messages"),
        (404, 10003, "Unknown Channel", "no such channel"),
    ],
)
def test_forbidden_or_missing_channel_is_permanent(
    api: FakeDiscordAPI, status: int, code: int, message: str, expected: str
) -> None:
    api.fail_next("POST", MESSAGES, status, {"message": message, "code": code})

    async def work(sender: DiscordSender) -> None:
        with pytest.raises(PermanentFailure, match=expected):
            await post(sender, outbox_item())

    with_sender(api, work)


def test_not_logged_in_yet_means_retry_later() -> None:
    sender = DiscordSender(AtelierDiscordClient(RecordingHandler()))
    with pytest.raises(RetryLater, match="not connected"):
        sender.post(outbox_item(), [])


def test_calling_from_the_event_loop_thread_is_refused(api: FakeDiscordAPI) -> None:
    async def work(sender: DiscordSender) -> None:
        with pytest.raises(RuntimeError, match="worker thread"):
            sender.post(outbox_item(), [])  # would deadlock waiting on its own loop

    with_sender(api, work)
    assert api.find("POST", MESSAGES) == []


def test_parameters_go_in_the_text_once() -> None:
    already = "Seed: 1234 · steps: 25"
    assert content_with_parameters(already, {"seed": 1234, "parameters": {"steps": 25}}) == (
        already
    )
    assert content_with_parameters("Progress", {}) == "Progress"
    batch = content_with_parameters("", {"seed": [1, 2], "parameters": {"size": "64x64"}})
    assert batch == "Seed: 1, 2 · size: 64x64"


def test_long_text_is_split_within_discords_limit() -> None:
    text = "\n".join(f"line {i} " + "x" * 90 for i in range(60))
    pieces = split_text(text)
    assert all(0 < len(p) <= 2000 for p in pieces)
    assert "\n".join(pieces) == text
    assert split_text("y" * 4500) == ["y" * 2000, "y" * 2000, "y" * 500]


STYLE_THREAD_EXTRA = {
    "kind": "style_thread",
    "style_id": 3,
    "start_thread": True,
    "thread_name": "inkwash references",
}


def test_style_announcement_opens_a_thread_with_the_messages_id(api: FakeDiscordAPI) -> None:
    item = outbox_item(key="style:3:thread", thread=None, extra=STYLE_THREAD_EXTRA)
    message_id = with_sender(api, lambda s: post(s, item))

    (posted,) = api.find("POST", rf"/channels/{CHANNEL_ID}/messages")
    assert "embeds" not in posted.json or posted.json["embeds"] == []  # no parameters here
    (opened,) = api.find("POST", rf"/channels/{CHANNEL_ID}/messages/{message_id}/threads")
    assert opened.json["name"] == "inkwash references"
    # Images posted there arrive with thread == the announcement's id, which the core knows.
    assert api.channels[int(message_id)]["id"] == message_id


def test_thread_failure_keeps_the_posted_message(
    api: FakeDiscordAPI, caplog: pytest.LogCaptureFixture
) -> None:
    api.fail_next(
        "POST",
        rf"/channels/{CHANNEL_ID}/messages/\d+/threads",
        403,
        {"message": "Missing Permissions", "code": 50013},
    )
    item = outbox_item(key="style:3:thread", thread=None, extra=STYLE_THREAD_EXTRA)
    message_id = with_sender(api, lambda s: post(s, item))  # no exception: no second post
    assert message_id in api.messages
    assert "Create Public Threads" in caplog.text
