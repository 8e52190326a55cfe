"""Outbox delivery: posts, edits on the same message, retries, restarts, and the scheduler."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from bot.delivery import OutboxDeliverer, PermanentFailure, RetryLater
from bot.scheduler import Intervals, build_scheduler
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import OutboxMessage, OutboxStatus, utcnow
from storage.outbox import Attachment, Outbox
from storage.queue import JobQueue, RetryPolicy

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import FakeClock, RecordingSender  # noqa: E402

pytest_plugins = ("bot_fixtures",)


class Crash(BaseException):
    """The process dying (nothing below it catches a BaseException)."""


class CrashingOutbox(Outbox):
    """Dies right after the platform accepted a message, before it is marked delivered."""

    def mark_delivered(
        self, item_id: int, revision: int, platform_message_id: str, **_: Any
    ) -> None:
        raise Crash


def _outbox(db: Database) -> Outbox:
    return Outbox(db, retry=RetryPolicy(base_seconds=5, factor=2), max_attempts=3)


def _deliverer(
    db: Database,
    blobs: BlobStore,
    sender: RecordingSender,
    clock: FakeClock | None = None,
    outbox: Outbox | None = None,
) -> OutboxDeliverer:
    return OutboxDeliverer(
        outbox or _outbox(db), blobs, sender, "slack", clock=clock or FakeClock()
    )


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", 10_000_000)


def _make_due(db: Database) -> None:
    with db.session(write=True) as s:
        s.execute(update(OutboxMessage).values(next_attempt_at=utcnow() - timedelta(seconds=1)))


def test_post_then_edit_lands_on_the_same_message(db: Database, blobs: BlobStore) -> None:
    outbox, sender = _outbox(db), RecordingSender()
    deliverer = _deliverer(db, blobs, sender, outbox=outbox)
    png = blobs.put_bytes(b"\x89PNG fake")
    outbox.put(
        "job:1:progress",
        platform="slack",
        channel="C1",
        text="step 10/100",
        attachments=[Attachment(png.sha256, "sample.png")],
    )
    outbox.put("other", platform="discord", channel="D", text="not for slack")
    assert deliverer.deliver_due() == 1
    ((message_id, posted, files),) = sender.posts
    assert posted.text == "step 10/100" and [(f.filename, f.data) for f in files] == [
        ("sample.png", b"\x89PNG fake")
    ]
    assert deliverer.deliver_due() == 0  # nothing new
    outbox.put("job:1:progress", platform="slack", channel="C1", text="step 50/100")
    assert deliverer.deliver_due() == 1
    ((edited_id, edited, _),) = sender.edits
    assert edited_id == message_id and edited.text == "step 50/100"
    assert len(sender.posts) == 1
    row = outbox.get("job:1:progress")
    assert row is not None and row.status == OutboxStatus.DELIVERED
    assert row.platform_message_id == message_id


def test_a_crash_between_send_and_mark_delivers_again(db: Database, blobs: BlobStore) -> None:
    sender = RecordingSender()
    _outbox(db).put("job:2:result", platform="slack", channel="C1", text="Seed 42")
    crashing = _deliverer(db, blobs, sender, outbox=CrashingOutbox(db))
    with pytest.raises(Crash):
        crashing.deliver_due()
    assert len(sender.posts) == 1
    # A new process with the same database: the message is still pending, so it goes again.
    restarted = _deliverer(db, blobs, sender)
    assert restarted.deliver_due() == 1
    assert [item.key for _, item, _ in sender.posts] == ["job:2:result", "job:2:result"]
    assert restarted.deliver_due() == 0  # and only until it is marked


def test_retry_later_pauses_the_platform_in_order(db: Database, blobs: BlobStore) -> None:
    outbox, sender, clock = _outbox(db), RecordingSender(), FakeClock()
    deliverer = _deliverer(db, blobs, sender, clock=clock, outbox=outbox)
    outbox.put("a", platform="slack", channel="C1", text="first")
    outbox.put("b", platform="slack", channel="C1", text="second")
    sender.fail_with = [RetryLater(30)]
    assert deliverer.deliver_due() == 0
    assert sender.posts == []  # "b" did not overtake "a"
    clock.advance(29)
    assert deliverer.deliver_due() == 0 and sender.posts == []
    assert outbox.get("a").attempts == 0  # type: ignore[union-attr]  # a pause is no failure
    clock.advance(2)
    assert deliverer.deliver_due() == 2
    assert [item.text for _, item, _ in sender.posts] == ["first", "second"]


def test_errors_back_off_and_permanent_failures_stop(db: Database, blobs: BlobStore) -> None:
    outbox, sender = _outbox(db), RecordingSender()
    deliverer = _deliverer(db, blobs, sender, outbox=outbox)
    outbox.put("flaky", platform="slack", channel="C1", text="hi")
    outbox.put("gone", platform="slack", channel="C404", text="hi")
    sender.fail_with = [ConnectionError("reset by peer"), PermanentFailure("channel_not_found")]
    assert deliverer.deliver_due() == 0
    flaky, gone = outbox.get("flaky"), outbox.get("gone")
    assert flaky.status == OutboxStatus.PENDING and flaky.attempts == 1  # type: ignore[union-attr]
    assert "ConnectionError: reset by peer" in (flaky.error or "")  # type: ignore[union-attr]
    assert gone.status == OutboxStatus.FAILED  # type: ignore[union-attr]
    assert deliverer.deliver_due() == 0  # waiting out its backoff
    _make_due(db)
    assert deliverer.deliver_due() == 1
    assert [item.key for _, item, _ in sender.posts] == ["flaky"]


def test_a_missing_file_is_noted_rather_than_holding_the_message(
    db: Database, blobs: BlobStore
) -> None:
    outbox, sender = _outbox(db), RecordingSender()
    outbox.put(
        "job:3:result",
        platform="slack",
        channel="C1",
        text="Seed 1",
        attachments=[Attachment("ab" * 32, "lost.png")],
    )
    assert _deliverer(db, blobs, sender, outbox=outbox).deliver_due() == 1
    ((_, item, files),) = sender.posts
    assert files == [] and "missing from storage: lost.png" in item.text


def test_scheduler_runs_delivery_and_chores(db: Database, blobs: BlobStore) -> None:
    outbox, sender = _outbox(db), RecordingSender()
    deliverer = _deliverer(db, blobs, sender, outbox=outbox)
    scheduler = build_scheduler(
        deliverers=[deliverer], queue=JobQueue(db), blobs=blobs, intervals=Intervals(deliver_s=2)
    )
    jobs = {job.id: job for job in scheduler.get_jobs()}
    assert set(jobs) == {
        "deliver:slack",
        "recover_expired",
        "remove_stale_temp",
        "prune_processed_events",
    }
    assert jobs["deliver:slack"].trigger.interval == timedelta(seconds=2)
    outbox.put("k", platform="slack", channel="C1", text="hello")
    jobs["deliver:slack"].func()
    assert [item.key for _, item, _ in sender.posts] == ["k"]
    for name in ("recover_expired", "remove_stale_temp", "prune_processed_events"):
        jobs[name].func()  # each chore runs (and would only log a failure)


class FindingSender(RecordingSender):
    """A platform that can look up what a key was posted as (like a message search)."""

    def find_posted(self, item: object) -> str | None:
        key = getattr(item, "key", None)
        return next((mid for mid, posted, _ in self.posts if posted.key == key), None)


def test_a_post_in_doubt_is_found_not_posted_twice(db: Database, blobs: BlobStore) -> None:
    sender = FindingSender()
    _outbox(db).put("job:3:result", platform="slack", channel="C1", text="Seed 7")
    with pytest.raises(Crash):
        _deliverer(db, blobs, sender, outbox=CrashingOutbox(db)).deliver_due()
    assert _outbox(db).get("job:3:result").post_in_doubt
    restarted = _deliverer(db, blobs, sender)
    assert restarted.deliver_due() == 1
    assert len(sender.posts) == 1  # found and brought up to date instead
    assert [mid for mid, _, _ in sender.edits] == [sender.id_of("job:3:result")]
    item = _outbox(db).get("job:3:result")
    assert item.status == OutboxStatus.DELIVERED and item.platform_message_id == "m1"


def test_a_post_that_never_started_is_not_in_doubt(db: Database, blobs: BlobStore) -> None:
    sender = FindingSender()
    sender.fail_with.append(ConnectionError("network down"))
    _outbox(db).put("job:4:result", platform="slack", channel="C1", text="Seed 8")
    _deliverer(db, blobs, sender).deliver_due()
    _make_due(db)
    _deliverer(db, blobs, sender).deliver_due()
    assert len(sender.posts) == 1 and sender.edits == []
