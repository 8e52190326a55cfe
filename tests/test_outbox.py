"""The outbox: at-least-once chat messages keyed so a repeat delivery edits."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from storage.db import Database
from storage.models import OutboxMessage, OutboxStatus, utcnow
from storage.outbox import Attachment, Outbox
from storage.queue import RetryPolicy


def _outbox(db: Database) -> Outbox:
    return Outbox(db, retry=RetryPolicy(base_seconds=5, factor=2), max_attempts=3)


def test_new_message_is_due_and_posted_once(db: Database) -> None:
    outbox = _outbox(db)
    item = outbox.put(
        "job:1:result",
        platform="slack",
        channel="C1",
        thread="171.2",
        text="Seed 42",
        attachments=[Attachment("a" * 64, "result.png")],
    )
    due = outbox.due("slack")
    assert [d.key for d in due] == ["job:1:result"] and not due[0].is_edit
    assert due[0].attachments == [Attachment("a" * 64, "result.png")]
    assert outbox.due("discord") == []
    outbox.mark_delivered(item.id, item.revision, "msg-1")
    assert outbox.due("slack") == []
    assert outbox.get("job:1:result").status == OutboxStatus.DELIVERED


def test_same_key_after_delivery_becomes_an_edit(db: Database) -> None:
    outbox = _outbox(db)
    first = outbox.put("job:1:progress", platform="discord", channel="c", text="10/100")
    outbox.mark_delivered(first.id, first.revision, "m-77")
    second = outbox.put("job:1:progress", platform="discord", channel="c", text="20/100")
    assert second.id == first.id and second.revision == first.revision + 1
    (due,) = outbox.due("discord")
    assert due.is_edit and due.platform_message_id == "m-77" and due.text == "20/100"


def test_update_written_during_delivery_stays_pending(db: Database) -> None:
    outbox = _outbox(db)
    first = outbox.put("k", platform="slack", channel="c", text="step 1")
    (delivering,) = outbox.due("slack")
    outbox.put("k", platform="slack", channel="c", text="step 2")  # runner moved on meanwhile
    outbox.mark_delivered(delivering.id, delivering.revision, "ts-1")
    (again,) = outbox.due("slack")
    assert again.text == "step 2" and again.platform_message_id == "ts-1"
    assert first.id == again.id


def test_failed_delivery_backs_off_then_gives_up(db: Database) -> None:
    outbox = _outbox(db)
    item = outbox.put("k", platform="slack", channel="c", text="hi")
    after_first = outbox.mark_failed(item.id, "429 rate limited")
    assert after_first.status == OutboxStatus.PENDING and after_first.attempts == 1
    assert outbox.due("slack") == []  # waiting out its backoff
    with db.session(write=True) as s:
        s.execute(update(OutboxMessage).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    assert [d.id for d in outbox.due("slack")] == [item.id]
    outbox.mark_failed(item.id, "500")
    final = outbox.mark_failed(item.id, "500")
    assert final.status == OutboxStatus.FAILED and final.error == "500"


def test_permanent_failure(db: Database) -> None:
    outbox = _outbox(db)
    item = outbox.put("k", platform="slack", channel="gone", text="hi")
    assert outbox.mark_failed(item.id, "channel_not_found", permanent=True).status == (
        OutboxStatus.FAILED
    )


def test_put_joins_the_callers_transaction(db: Database) -> None:
    outbox = _outbox(db)
    try:
        with db.session(write=True) as s:
            outbox.put("k", platform="slack", channel="c", text="hi", session=s)
            raise RuntimeError("the surrounding work failed")
    except RuntimeError:
        pass
    assert outbox.get("k") is None  # rolled back with it: nothing half-done


def test_find_posted_routes_a_reaction_to_its_message(db: Database) -> None:
    outbox = _outbox(db)
    item = outbox.put("review:dataset:3", platform="slack", channel="C1", text="sheet")
    assert outbox.find_posted("slack", "171.5") is None
    outbox.mark_delivered(item.id, item.revision, "171.5")
    found = outbox.find_posted("slack", "171.5")
    assert found is not None and found.key == "review:dataset:3"
    assert outbox.find_posted("discord", "171.5") is None
