"""Messages the bot must post or edit in a chat, written by anyone, delivered at least once.

A row's `key` names one chat message for its whole life ("job:42:progress"). Writing the
same key again updates the row and bumps its revision; once the message has a platform
id, delivering a newer revision edits that message instead of posting a second one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import OutboxMessage, OutboxStatus, utcnow
from storage.queue import RetryPolicy


@dataclass(frozen=True)
class Attachment:
    """A file to send with a message: a blob in the store and the name to show."""

    blob_sha256: str
    filename: str

    def as_json(self) -> dict[str, str]:
        return {"blob_sha256": self.blob_sha256, "filename": self.filename}


@dataclass(frozen=True)
class OutboxItem:
    id: int
    key: str
    team_id: int | None
    platform: str
    channel: str
    thread: str | None
    text: str
    attachments: list[Attachment]
    extra: dict[str, Any]
    revision: int
    platform_message_id: str | None
    attempts: int
    status: OutboxStatus
    error: str | None
    created_at: datetime
    post_started: bool = False
    platform_file_ids: tuple[str, ...] = ()  # files the post uploaded (Slack)

    @property
    def is_edit(self) -> bool:
        return self.platform_message_id is not None

    @property
    def post_in_doubt(self) -> bool:
        """A post began but its message id was never recorded (the bot died in between)."""
        return self.post_started and self.platform_message_id is None

    @classmethod
    def of(cls, row: OutboxMessage) -> OutboxItem:
        return cls(
            id=row.id,
            key=row.key,
            team_id=row.team_id,
            platform=row.platform,
            channel=row.channel,
            thread=row.thread,
            text=row.text,
            attachments=[Attachment(**a) for a in row.attachments or []],
            extra=dict(row.extra or {}),
            revision=row.revision,
            platform_message_id=row.platform_message_id,
            attempts=row.attempts,
            status=OutboxStatus(row.status),
            error=row.error,
            created_at=row.created_at,
            post_started=row.post_started_at is not None,
            platform_file_ids=tuple(row.platform_file_ids or ()),
        )


class Outbox:
    def __init__(
        self,
        db: Database,
        *,
        retry: RetryPolicy | None = None,
        max_attempts: int = 8,
    ) -> None:
        self.db = db
        self.retry = retry or RetryPolicy(base_seconds=1.0, factor=2.0, max_seconds=300.0)
        self.max_attempts = max_attempts

    def put(
        self,
        key: str,
        *,
        platform: str,
        channel: str,
        text: str,
        thread: str | None = None,
        team_id: int | None = None,
        attachments: Sequence[Attachment] = (),
        extra: dict[str, Any] | None = None,
        session: Session | None = None,
    ) -> OutboxItem:
        """Create the message named `key`, or replace its content (a later edit)."""
        values: dict[str, Any] = {
            "platform": platform,
            "channel": channel,
            "thread": thread,
            "team_id": team_id,
            "text": text,
            "attachments": [a.as_json() for a in attachments],
            "extra": extra or {},
        }
        try:
            with self.db.joined(session) as s:
                return self._upsert(s, key, values)
        except IntegrityError:
            # Another writer created the key between our read and insert (PostgreSQL).
            if session is not None:
                raise
            with self.db.session(write=True) as s:
                return self._upsert(s, key, values)

    @staticmethod
    def _upsert(s: Session, key: str, values: dict[str, Any]) -> OutboxItem:
        row = s.scalar(select(OutboxMessage).where(OutboxMessage.key == key))
        now = utcnow()
        if row is None:
            row = OutboxMessage(key=key, next_attempt_at=now, updated_at=now, **values)
            s.add(row)
        else:
            for name, value in values.items():
                setattr(row, name, value)
            row.revision += 1
            row.status = OutboxStatus.PENDING
            row.attempts = 0
            row.error = None
            row.next_attempt_at = now
            row.updated_at = now
        s.flush()
        return OutboxItem.of(row)

    def due(self, platform: str, *, limit: int = 20) -> list[OutboxItem]:
        """Pending messages whose time has come, oldest first."""
        with self.db.session() as s:
            rows = s.scalars(
                select(OutboxMessage)
                .where(
                    OutboxMessage.platform == platform,
                    OutboxMessage.status == OutboxStatus.PENDING,
                    OutboxMessage.next_attempt_at <= utcnow(),
                )
                .order_by(OutboxMessage.id)
                .limit(limit)
            )
            return [OutboxItem.of(row) for row in rows]

    def begin_post(self, item_id: int) -> None:
        """Record that a first post is about to go out (see `OutboxItem.post_in_doubt`)."""
        with self.db.session(write=True) as s:
            row = self._row(s, item_id)
            row.post_started_at = row.post_started_at or utcnow()

    def mark_delivered(
        self,
        item_id: int,
        revision: int,
        platform_message_id: str,
        *,
        file_ids: Sequence[str] = (),
    ) -> None:
        """Record a delivery (and the files a first post uploaded). A revision written
        meanwhile stays pending, to edit next."""
        with self.db.session(write=True) as s:
            row = self._row(s, item_id)
            row.platform_message_id = row.platform_message_id or platform_message_id
            if file_ids:
                row.platform_file_ids = list(dict.fromkeys([*row.platform_file_ids, *file_ids]))
            row.delivered_revision = max(row.delivered_revision, revision)
            if row.revision <= revision:
                row.status = OutboxStatus.DELIVERED
                row.delivered_at = utcnow()

    def mark_failed(self, item_id: int, error: str, *, permanent: bool = False) -> OutboxItem:
        """A delivery failed: try again after a backoff, or give up."""
        with self.db.session(write=True) as s:
            row = self._row(s, item_id)
            row.attempts += 1
            row.error = error
            if permanent or row.attempts >= self.max_attempts:
                row.status = OutboxStatus.FAILED
            else:
                row.next_attempt_at = utcnow() + timedelta(seconds=self.retry.delay(row.attempts))
            return OutboxItem.of(row)

    def get(self, key: str) -> OutboxItem | None:
        with self.db.session() as s:
            row = s.scalar(select(OutboxMessage).where(OutboxMessage.key == key))
            return None if row is None else OutboxItem.of(row)

    def find_posted(self, platform: str, platform_message_id: str) -> OutboxItem | None:
        """The message we posted as `platform_message_id` (e.g. to route a reaction on it)."""
        with self.db.session() as s:
            row = s.scalar(
                select(OutboxMessage).where(
                    OutboxMessage.platform == platform,
                    OutboxMessage.platform_message_id == platform_message_id,
                )
            )
            return None if row is None else OutboxItem.of(row)

    @staticmethod
    def _row(s: Session, item_id: int) -> OutboxMessage:
        row = s.get(OutboxMessage, item_id)
        if row is None:
            raise LookupError(f"There is no outbox message {item_id}.")
        return row
