"""SlackSender against the fake Web API: posts, uploads, in-place edits, rate limits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from fake_slack_api import FakeSlackApi
from slack_sdk import WebClient

from bot.commands import OutgoingFile
from bot.delivery import PermanentFailure, Posted, RetryLater
from bot.slack.sender import FILE_ID_PREFIX, SlackSender
from storage.models import OutboxStatus
from storage.outbox import OutboxItem

RESULT_TEXT = (
    "a fox, inkstyle\nNegative prompt: blurry\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 1234567, Size: 512x512, Model: tiny-sd"
)
IMAGE = b"\x89PNG\r\n\x1a\n" + b"fox" * 500
SAMPLE = b"\x89PNG\r\n\x1a\n" + b"sample" * 200


@pytest.fixture
def fake() -> Iterator[FakeSlackApi]:
    with FakeSlackApi().running() as api:
        yield api


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def sender(fake: FakeSlackApi, waits: list[float]) -> SlackSender:
    client = WebClient(token=fake.bot_token, base_url=fake.api_url)
    return SlackSender(client, share_wait_seconds=(0.25, 0.5, 1.0), sleep=waits.append)


def item(
    text: str = "hello",
    *,
    channel: str = "C0ART0001",
    thread: str | None = None,
    message_id: str | None = None,
    revision: int = 1,
    extra: dict[str, Any] | None = None,
) -> OutboxItem:
    return OutboxItem(
        id=1,
        key="job:7:result",
        team_id=1,
        platform="slack",
        channel=channel,
        thread=thread,
        text=text,
        attachments=[],
        extra=extra or {},
        revision=revision,
        platform_message_id=message_id,
        attempts=0,
        status=OutboxStatus.PENDING,
        error=None,
        created_at=datetime.now(UTC),
    )


def test_text_post_uses_chat_post_message_and_returns_its_ts(
    fake: FakeSlackApi, sender: SlackSender
) -> None:
    ts = sender.post(item("Queued: job 7", thread="1700000000.000100"), [])

    [call] = fake.calls_to("chat.postMessage")
    assert call.params["channel"] == "C0ART0001"
    assert call.params["text"] == "Queued: job 7"
    assert call.params["thread_ts"] == "1700000000.000100"
    assert fake.messages[ts].text == "Queued: job 7"


def test_result_with_image_goes_through_files_upload_v2_with_seed_in_text(
    fake: FakeSlackApi, sender: SlackSender, waits: list[float]
) -> None:
    files = [OutgoingFile("fox-1234567.png", IMAGE)]
    posted = Posted.of(sender.post(item(RESULT_TEXT, thread="1700000000.000100"), files))
    ts = posted.message_id

    assert fake.call_names() == [
        "files.getUploadURLExternal",
        "upload",
        "files.completeUploadExternal",
        "files.info",
    ]
    get_url = fake.calls_to("files.getUploadURLExternal")[0]
    assert (get_url.params["filename"], int(get_url.params["length"])) == (
        "fox-1234567.png",
        len(IMAGE),
    )
    assert fake.calls_to("upload")[0].body == IMAGE
    complete = fake.calls_to("files.completeUploadExternal")[0]
    assert complete.params["channel_id"] == "C0ART0001"
    assert complete.params["thread_ts"] == "1700000000.000100"
    assert "Seed: 1234567" in complete.params["initial_comment"]
    assert "Steps: 20" in complete.params["initial_comment"]
    # The returned id is the message's ts (read back from files.info), so edits and
    # reactions on the result find it.
    message = fake.messages[ts]
    assert message.text == RESULT_TEXT
    assert [fake.files[f].data for f in message.file_ids] == [IMAGE]
    assert posted.file_ids == tuple(message.file_ids)  # kept, to delete with the result
    assert waits == []


def test_slow_share_is_polled_until_slack_reports_the_message(
    fake: FakeSlackApi, sender: SlackSender, waits: list[float]
) -> None:
    fake.share_delay_lookups = 2
    ts = Posted.of(sender.post(item(RESULT_TEXT), [OutgoingFile("a.png", IMAGE)])).message_id
    assert fake.messages[ts].text == RESULT_TEXT
    assert waits == [0.25, 0.5]
    assert len(fake.calls_to("files.info")) == 3


def test_unknown_ts_never_reposts_and_edits_resolve_it_later(
    fake: FakeSlackApi, sender: SlackSender, waits: list[float]
) -> None:
    fake.share_delay_lookups = 100
    posted = Posted.of(sender.post(item(RESULT_TEXT), [OutgoingFile("a.png", IMAGE)]))
    message_id = posted.message_id
    assert message_id.startswith(FILE_ID_PREFIX)
    assert waits == [0.25, 0.5, 1.0]
    assert len(fake.messages) == 1

    with pytest.raises(RetryLater):
        sender.edit(item("edited", message_id=message_id), [OutgoingFile("a.png", IMAGE)])
    fake.share_delay_lookups = 0
    sender.edit(item("edited", message_id=message_id), [OutgoingFile("a.png", IMAGE)])
    [message] = fake.messages.values()
    assert (message.text, message.edits) == ("edited", 1)


def test_the_edit_marking_a_result_deleted_deletes_its_uploads(
    fake: FakeSlackApi, sender: SlackSender
) -> None:
    posted = Posted.of(sender.post(item(RESULT_TEXT), [OutgoingFile("a.png", IMAGE)]))
    (file_id,) = posted.file_ids
    progress = item("step 50/100", message_id=posted.message_id)
    sender.edit(progress, [])  # an ordinary edit keeps the image
    assert file_id in fake.files and fake.calls_to("files.delete") == []
    deleted = replace(
        item("🗑 deleted", message_id=posted.message_id, extra={"deleted": True}),
        platform_file_ids=posted.file_ids,
    )
    sender.edit(deleted, [])
    assert file_id not in fake.files and fake.messages[posted.message_id].file_ids == []
    sender.edit(deleted, [])  # a retried edit: the file is already gone, no error
    assert len(fake.calls_to("files.delete")) == 2


def test_progress_edits_update_the_same_message(fake: FakeSlackApi, sender: SlackSender) -> None:
    ts = sender.post(item("Training ink: step 0/100"), [])
    sender.edit(item("Training ink: step 50/100, loss 0.21", message_id=ts, revision=2), [])
    sender.edit(item("Training ink: step 100/100, done", message_id=ts, revision=3), [])

    updates = fake.calls_to("chat.update")
    assert [u.params["ts"] for u in updates] == [ts, ts]
    assert len(fake.messages) == 1
    assert fake.messages[ts].text == "Training ink: step 100/100, done"
    assert fake.messages[ts].edits == 2


def test_edit_with_a_new_sample_attaches_it_once(fake: FakeSlackApi, sender: SlackSender) -> None:
    ts = sender.post(item("step 0/100"), [])
    samples = [OutgoingFile("sample-50.png", SAMPLE)]
    sender.edit(item("step 50/100", message_id=ts), samples)
    sender.edit(item("step 60/100", message_id=ts), samples)  # same sample: no re-upload

    [complete] = fake.calls_to("files.completeUploadExternal")
    assert "channel_id" not in complete.params  # uploaded unshared, attached by chat.update
    first_update, second_update = fake.calls_to("chat.update")
    assert first_update.params["file_ids"].split(",") == fake.messages[ts].file_ids
    assert [fake.files[f].data for f in fake.messages[ts].file_ids] == [SAMPLE]
    assert "file_ids" not in second_update.params
    assert fake.messages[ts].text == "step 60/100"


def test_rate_limit_maps_to_retry_later_with_retry_after(
    fake: FakeSlackApi, sender: SlackSender
) -> None:
    fake.fail("chat.postMessage", "ratelimited", status=429, retry_after=7)
    with pytest.raises(RetryLater) as caught:
        sender.post(item("hi"), [])
    assert caught.value.seconds == 7.0
    assert sender.post(item("hi"), [])  # the next try goes through


def test_rate_limit_during_upload_is_retry_later(fake: FakeSlackApi, sender: SlackSender) -> None:
    fake.fail("files.getUploadURLExternal", "ratelimited", status=429, retry_after=30)
    with pytest.raises(RetryLater) as caught:
        sender.post(item(RESULT_TEXT), [OutgoingFile("a.png", IMAGE)])
    assert caught.value.seconds == 30.0
    assert fake.messages == {}


def test_rate_limit_on_edit_is_retry_later(fake: FakeSlackApi, sender: SlackSender) -> None:
    ts = sender.post(item("a"), [])
    fake.fail("chat.update", "ratelimited", status=429, retry_after=3)
    with pytest.raises(RetryLater) as caught:
        sender.edit(item("b", message_id=ts), [])
    assert caught.value.seconds == 3.0
    assert fake.messages[ts].text == "a"


@pytest.mark.parametrize("error", ["channel_not_found", "not_in_channel", "is_archived"])
def test_channel_problems_are_permanent(
    fake: FakeSlackApi, sender: SlackSender, error: str
) -> None:
    fake.fail("chat.postMessage", error)
    with pytest.raises(PermanentFailure, match="C0ART0001"):
        sender.post(item("hi"), [])


def test_editing_a_deleted_message_is_permanent(sender: SlackSender) -> None:
    with pytest.raises(PermanentFailure, match="gone"):
        sender.edit(item("b", message_id="1600000000.000001"), [])


def test_other_slack_errors_propagate_for_the_deliverers_backoff(
    fake: FakeSlackApi, sender: SlackSender
) -> None:
    from slack_sdk.errors import SlackApiError

    fake.fail("chat.postMessage", "internal_error", status=500)
    with pytest.raises(SlackApiError):
        sender.post(item("hi"), [])


def test_seed_and_parameters_from_extra_join_the_text_when_missing(
    fake: FakeSlackApi, sender: SlackSender
) -> None:
    extra = {"seed": [11, 12], "parameters": {"steps": 20, "cfg": 7.5, "size": "512x512"}}
    posted = sender.post(item("Here is your fox", extra=extra), [OutgoingFile("fox.png", IMAGE)])
    ts = Posted.of(posted).message_id
    assert fake.messages[ts].text == (
        "Here is your fox\nSeed: 11, 12 · steps: 20 · cfg: 7.5 · size: 512x512"
    )
    # A writer that already put the seed in its text is not repeated.
    ts = sender.post(item(RESULT_TEXT, extra={"seed": 1234567}), [])
    assert fake.messages[ts].text == RESULT_TEXT


def test_markdown_becomes_slack_mrkdwn_and_angle_brackets_stay_literal(
    fake: FakeSlackApi, sender: SlackSender
) -> None:
    ts = sender.post(
        item("**ink** ready: a fox <lora:ink:0.8> & [guide](https://example.com/x)"), []
    )
    assert fake.messages[ts].text == (
        "*ink* ready: a fox &lt;lora:ink:0.8&gt; &amp; <https://example.com/x|guide>"
    )
