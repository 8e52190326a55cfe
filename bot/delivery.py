"""Outbox delivery: post new messages and edit posted ones through a platform sender."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from bot.commands import OutgoingFile
from storage.outbox import OutboxItem


class RetryLater(Exception):
    """The platform asked us to wait (e.g. HTTP 429 Retry-After)."""

    def __init__(self, seconds: float, reason: str = "rate limited") -> None:
        super().__init__(f"{reason}; retry in {seconds:.1f}s")
        self.seconds = seconds


class PermanentFailure(Exception):
    """Retrying cannot help (channel gone, bot removed): the message is marked failed."""


class MessageSender(Protocol):
    """One platform's way of showing an outbox message."""

    def post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str:
        """Post a new message and return the platform's id for it."""
        ...

    def edit(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> None:
        """Replace the content of `item.platform_message_id`."""
        ...
