"""Outbox delivery: post what the runner and the core queued, edit what was posted before.

All state lives in the outbox rows, so a restarted bot carries on where it stopped. The
guarantee is at least once: a crash between a platform accepting a message and the row
being marked leaves the row pending, and it is sent again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from bot.commands import OutgoingFile
from bot.core.guard import Clock
from storage.blobs import BlobNotFound, BlobStore
from storage.outbox import Outbox, OutboxItem

log = logging.getLogger(__name__)


class RetryLater(Exception):
    """The platform asked us to wait (e.g. HTTP 429 with Retry-After)."""

    def __init__(self, seconds: float, reason: str = "rate limited") -> None:
        super().__init__(f"{reason}; retry in {seconds:g} s")
        self.seconds = max(0.0, float(seconds))


class PermanentFailure(Exception):
    """Sending can never work (channel gone, bot removed): the message is given up."""


@dataclass(frozen=True)
class Posted:
    """A new message, with the ids of the files its post uploaded where the platform keeps
    those apart from the message (Slack: they outlive an edit, so a deletion removes them)."""

    message_id: str
    file_ids: tuple[str, ...] = ()

    @classmethod
    def of(cls, result: str | Posted) -> Posted:
        return result if isinstance(result, Posted) else cls(result)


class MessageSender(Protocol):
    """One platform's way to post and edit. May raise RetryLater or PermanentFailure."""

    def post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str | Posted:
        """Post a new message; returns the platform's message id (Slack: its ts), or a
        Posted naming its files too."""
        ...

    def edit(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> None:
        """Replace the content of `item.platform_message_id` with the item's."""
        ...

    # Optional: `find_posted(item) -> str | None` finds a message that a post in doubt
    # (the bot died between posting and recording) already made, by the outbox key.
    # Senders whose platform dedupes posts itself (Discord's nonce) need not have it.


class OutboxDeliverer:
    """Delivers one platform's due outbox messages; `deliver_due` runs periodically."""

    def __init__(
        self,
        outbox: Outbox,
        blobs: BlobStore,
        sender: MessageSender,
        platform: str,
        *,
        batch_size: int = 20,
        clock: Clock = time.monotonic,
    ) -> None:
        self.outbox = outbox
        self.blobs = blobs
        self.sender = sender
        self.platform = platform
        self.batch_size = batch_size
        self.clock = clock
        self.paused_until = 0.0  # set by RetryLater: the platform wants a pause

    def deliver_due(self) -> int:
        """Send what is due now; returns how many messages were posted or edited."""
        if self.clock() < self.paused_until:
            return 0
        delivered = 0
        for item in self.outbox.due(self.platform, limit=self.batch_size):
            try:
                self._deliver(item)
            except RetryLater as wait:
                # The whole platform backs off, and later messages must not overtake this one.
                self.paused_until = self.clock() + wait.seconds
                log.info("%s asks to wait %.1f s (%s)", self.platform, wait.seconds, item.key)
                break
            except PermanentFailure as exc:
                log.warning("giving up on %s: %s", item.key, exc)
                self.outbox.mark_failed(item.id, _one_line(exc), permanent=True)
            except Exception as exc:  # network errors and the like: back off and retry
                log.warning("delivering %s failed: %s", item.key, exc, exc_info=True)
                self.outbox.mark_failed(item.id, _one_line(exc))
            else:
                delivered += 1
        return delivered

    def _deliver(self, item: OutboxItem) -> None:
        item, files = self._files(item)
        file_ids: tuple[str, ...] = ()
        if item.platform_message_id is not None:
            self.sender.edit(item, files)
            message_id = item.platform_message_id
        else:
            found = self._already_posted(item)
            if found is not None:
                # Posted before a crash; bring it up to date rather than post it twice.
                item = replace(item, platform_message_id=found)
                self.sender.edit(item, files)
                message_id = found
            else:
                self.outbox.begin_post(item.id)
                posted = Posted.of(self.sender.post(item, files))
                message_id, file_ids = posted.message_id, posted.file_ids
        self.outbox.mark_delivered(item.id, item.revision, message_id, file_ids=file_ids)

    def _already_posted(self, item: OutboxItem) -> str | None:
        if not item.post_in_doubt:
            return None
        find = getattr(self.sender, "find_posted", None)
        if find is None:
            log.warning("%s may have been posted before a restart; posting it again", item.key)
            return None
        return find(item)

    def _files(self, item: OutboxItem) -> tuple[OutboxItem, list[OutgoingFile]]:
        files: list[OutgoingFile] = []
        missing: list[str] = []
        for attachment in item.attachments:
            try:
                files.append(
                    OutgoingFile(attachment.filename, self.blobs.read_bytes(attachment.blob_sha256))
                )
            except BlobNotFound:
                missing.append(attachment.filename)
        if missing:
            # Say so rather than hold back the message (results carry seeds in their text).
            note = "\n(missing from storage: " + ", ".join(missing) + ")"
            item = replace(item, text=item.text + note)
        return item, files


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


class BackgroundService(Protocol):
    """Outbox delivery (and the bot's chores) running beside a chat client.

    APScheduler's BackgroundScheduler from `bot.scheduler.build_scheduler` fits as is.
    """

    def start(self) -> None: ...

    def shutdown(self) -> None: ...


DelivererFactory = Callable[[MessageSender], BackgroundService]
"""Given the platform's sender, build (not start) its background delivery."""
