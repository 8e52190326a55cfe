"""Outbox messages -> Discord channel messages (posted, then edited in place).

The deliverer calls `post`/`edit` from a worker thread; each call schedules the REST work
on the client's event loop and waits for it. discord.py sleeps through short 429s itself;
a longer one (over the client's `max_ratelimit_timeout`) becomes RetryLater so the outbox
retries at the time Discord named instead of holding a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import discord

from bot.commands import OutgoingFile
from bot.delivery import PermanentFailure, RetryLater
from bot.discord.render import content_with_parameters, result_embed, result_view, to_files
from storage.outbox import OutboxItem

T = TypeVar("T")

log = logging.getLogger(__name__)

NOT_CONNECTED_RETRY_S = 5.0
MAX_THREAD_NAME = 100
THREAD_ARCHIVE_MINUTES = 10080  # a week without messages
DEFAULT_RETRY_S = 5.0


class DiscordSender:
    """MessageSender for Discord: posts and edits through the running client's REST session."""

    def __init__(self, client: discord.Client, *, timeout: float = 120.0) -> None:
        self.client = client
        self.timeout = timeout

    def post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str:
        return self._run(self._post(item, files))

    def edit(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> None:
        if item.platform_message_id is None:
            raise ValueError(f"Outbox message {item.key} has not been posted yet; post it first.")
        self._run(self._edit(item, files))

    async def _post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str:
        channel = self.client.get_partial_messageable(_target(item))
        embed = result_embed(item.extra, files)
        message = await channel.send(
            content_with_parameters(item.text, item.extra) or None,
            embed=embed,  # type: ignore[arg-type]  # None means no embed
            files=to_files(files),
            view=result_view(item.extra) or discord.utils.MISSING,
            # Discord returns the earlier message for a repeated nonce (a re-post after the
            # bot died before recording it) instead of posting twice.
            nonce=outbox_nonce(item.key),
        )
        if item.extra.get("start_thread") and item.thread is None:
            await self._start_thread(message, str(item.extra.get("thread_name") or "Atelier"))
        return str(message.id)

    async def _start_thread(self, message: discord.Message, name: str) -> None:
        """Open a thread on the message (e.g. a style's announcement, for its references).

        A thread started from a message has the message's id, which is how the core finds
        the style for images posted there. The message is already out: a failure here is
        logged, never raised, or the outbox would post the message a second time.
        """
        try:
            # The REST call directly: a message posted by channel id has no guild attached,
            # which Message.create_thread insists on.
            await self.client.http.start_thread_with_message(
                message.channel.id,
                message.id,
                name=name[:MAX_THREAD_NAME],
                auto_archive_duration=THREAD_ARCHIVE_MINUTES,
            )
        except (discord.HTTPException, discord.RateLimited) as exc:
            log.warning(
                "posted message %s but could not open its thread (%s); give the bot "
                "Create Public Threads",
                message.id,
                exc,
            )

    async def _edit(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> None:
        assert item.platform_message_id is not None
        channel = self.client.get_partial_messageable(_target(item))
        message = channel.get_partial_message(int(item.platform_message_id))
        # The row holds the message's whole content: files replace the old attachments.
        await message.edit(
            content=content_with_parameters(item.text, item.extra),
            embed=result_embed(item.extra, files),
            attachments=to_files(files),
            view=result_view(item.extra),  # None removes buttons (a deleted result)
        )

    def _run(self, work: Awaitable[T]) -> T:
        loop = self._loop()
        if loop is None:
            _close(work)
            raise RetryLater(NOT_CONNECTED_RETRY_S, "Discord is not connected yet")
        if _running_loop() is loop:
            _close(work)
            raise RuntimeError("DiscordSender must be called from a worker thread, not the loop.")
        future = asyncio.run_coroutine_threadsafe(_guarded(work), loop)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            future.cancel()
            raise RetryLater(DEFAULT_RETRY_S, "Discord did not answer in time") from None

    def _loop(self) -> asyncio.AbstractEventLoop | None:
        """The client's loop once it has logged in (REST works from then on)."""
        if self.client.user is None or self.client.is_closed():
            return None
        loop = self.client.loop
        return None if loop.is_closed() or not loop.is_running() else loop


def _target(item: OutboxItem) -> int:
    """A thread is a channel of its own on Discord."""
    return int(item.thread or item.channel)


async def _guarded(work: Awaitable[T]) -> T:
    """Await `work`, turning Discord's answers into the outbox's retry vocabulary."""
    try:
        return await work
    except discord.RateLimited as exc:
        raise RetryLater(exc.retry_after, "Discord rate limit") from None
    except discord.Forbidden as exc:
        raise PermanentFailure(
            f"Discord refused ({exc.code}: {exc.text}); give the bot Send Messages, "
            "Attach Files and Embed Links in this channel."
        ) from None
    except discord.NotFound as exc:
        raise PermanentFailure(
            f"Discord has no such channel or message ({exc.code}: {exc.text})."
        ) from None
    except discord.HTTPException as exc:
        if exc.status == 429:  # retries ran out, or a Cloudflare-level limit
            raise RetryLater(_retry_after(exc), "Discord rate limit") from None
        if 400 <= exc.status < 500:
            raise PermanentFailure(
                f"Discord rejected the message ({exc.status}: {exc.text})."
            ) from None
        raise


def _retry_after(exc: discord.HTTPException) -> float:
    header = exc.response.headers.get("Retry-After") if exc.response is not None else None
    try:
        return max(float(header), 0.0) if header is not None else DEFAULT_RETRY_S
    except ValueError:
        return DEFAULT_RETRY_S


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _close(work: Awaitable[object]) -> None:
    """Silence 'coroutine was never awaited' for work we decided not to run."""
    if asyncio.iscoroutine(work):
        work.close()


def outbox_nonce(key: str) -> str:
    """A stable nonce for an outbox key (Discord allows 25 characters)."""
    return hashlib.sha256(key.encode()).hexdigest()[:25]
