"""Show outbox messages in Slack: chat.postMessage, files_upload_v2 and chat.update."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.commands import OutgoingFile
from bot.delivery import PermanentFailure, Posted, RetryLater
from bot.slack.text import button_blocks, message_text
from storage.outbox import OutboxItem

log = logging.getLogger(__name__)

# A posted file whose message ts Slack had not revealed yet: "file:F0123".
FILE_ID_PREFIX = "file:"

_PERMANENT: Mapping[str, str] = {
    "channel_not_found": "Slack channel {channel} does not exist or the bot cannot see it; "
    "invite the bot there or use another channel.",
    "not_in_channel": "The Atelier bot is not in Slack channel {channel}; invite it with "
    "/invite @Atelier.",
    "is_archived": "Slack channel {channel} is archived; unarchive it or use another channel.",
    "message_not_found": "The Slack message to update in {channel} is gone (deleted?).",
    "cant_update_message": "Slack will not let the bot edit its message in {channel}.",
    "msg_too_long": "The message for Slack channel {channel} is too long to post.",
}
_RATE_LIMITED = {"ratelimited", "rate_limited"}


class SlackSender:
    """MessageSender for Slack.

    Text-only messages go out with chat.postMessage (its `ts` is the message id). Messages
    with images go out with files_upload_v2, the text (seed, parameters) as the initial
    comment; Slack does not return that message's ts, so it is read back from files.info
    (`shares`), polling a little because Slack shares files asynchronously. Edits use
    chat.update on the same ts; new images in an edit (progress samples) are uploaded
    unshared and attached with chat.update's file_ids, so progress stays one message.

    A post's uploaded file ids go back to the outbox with its ts: an edit does not remove
    a message's files, so the edit that marks a result deleted also deletes them
    (files.delete; the bot may delete the files it uploaded).
    """

    def __init__(
        self,
        client: WebClient,
        *,
        share_wait_seconds: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
        sleep: Callable[[float], None] = time.sleep,
        remember_messages: int = 2_000,
    ) -> None:
        self._client = client
        self._share_wait = tuple(share_wait_seconds)
        self._sleep = sleep
        self._remember = remember_messages
        # Message ts -> hashes of files already shown with it, to not re-upload on each edit.
        self._shown: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()

    # -- MessageSender --------------------------------------------------------------------

    def post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str | Posted:
        text = message_text(item.text, item.extra)
        blocks = button_blocks(text, item.extra)
        with _slack_errors(item.channel):
            if not files:
                response = self._client.chat_postMessage(
                    channel=item.channel, text=text, thread_ts=item.thread, blocks=blocks or None
                )
                return str(response["ts"])
            response = self._client.files_upload_v2(
                channel=item.channel,
                thread_ts=item.thread,
                initial_comment=text,
                file_uploads=_uploads(files),
            )
            file_ids = [str(f["id"]) for f in response.get("files") or []]
            ts = _ts_in_files(response.get("files") or [], item.channel)
            ts = ts or self._find_share(file_ids[0], item.channel, self._share_wait)
            if ts is None:
                # Posted, but the ts is unknown yet: never re-post; edits resolve it later.
                log.warning("Slack has not reported where file %s landed yet.", file_ids[0])
                return Posted(FILE_ID_PREFIX + file_ids[0], tuple(file_ids))
            self._remember_shown(ts, files)
            if blocks:
                # A file upload's comment takes no blocks: the buttons go on by an update.
                self._client.chat_update(channel=item.channel, ts=ts, text=text, blocks=blocks)
            return Posted(ts, tuple(file_ids))

    def edit(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> None:
        if item.platform_message_id is None:
            raise ValueError(f"Outbox message {item.key} has no Slack message to edit.")
        with _slack_errors(item.channel):
            ts = self._message_ts(item.platform_message_id, item.channel)
            new_files = self._not_shown(ts, files)
            file_ids: list[str] | None = None
            if new_files:
                uploaded = self._client.files_upload_v2(file_uploads=_uploads(new_files))
                file_ids = [str(f["id"]) for f in uploaded.get("files") or []]
            text = message_text(item.text, item.extra)
            self._client.chat_update(
                channel=item.channel,
                ts=ts,
                text=text,
                file_ids=file_ids,
                blocks=button_blocks(text, item.extra),
            )
            if new_files:
                self._remember_shown(ts, files)
            if item.extra.get("deleted"):
                self._delete_files(item.platform_file_ids)

    # -- internals -------------------------------------------------------------------------

    def _delete_files(self, file_ids: Sequence[str]) -> None:
        for file_id in file_ids:
            try:
                self._client.files_delete(file=file_id)
            except SlackApiError as exc:
                # Already gone (an earlier try of this edit, or a person removed it).
                if exc.response.get("error") != "file_not_found":
                    raise

    def _message_ts(self, message_id: str, channel: str) -> str:
        if not message_id.startswith(FILE_ID_PREFIX):
            return message_id
        ts = self._find_share(message_id[len(FILE_ID_PREFIX) :], channel, ())
        if ts is None:
            raise RetryLater(5.0, "Slack has not shown the uploaded file in the channel yet")
        return ts

    def _find_share(self, file_id: str, channel: str, waits: Sequence[float]) -> str | None:
        for wait in (0.0, *waits):
            if wait:
                self._sleep(wait)
            info = self._client.files_info(file=file_id)
            ts = _ts_in_files([info.get("file") or {}], channel)
            if ts:
                return ts
        return None

    def _not_shown(self, ts: str, files: Sequence[OutgoingFile]) -> list[OutgoingFile]:
        with self._lock:
            shown = self._shown.get(ts, frozenset())
        return [f for f in files if _digest(f) not in shown]

    def _remember_shown(self, ts: str, files: Sequence[OutgoingFile]) -> None:
        with self._lock:
            self._shown[ts] = self._shown.get(ts, frozenset()) | {_digest(f) for f in files}
            self._shown.move_to_end(ts)
            while len(self._shown) > self._remember:
                self._shown.popitem(last=False)


@contextmanager
def _slack_errors(channel: str) -> Iterator[None]:
    """Translate Slack API errors into the outbox's RetryLater / PermanentFailure."""
    try:
        yield
    except SlackApiError as exc:
        response = exc.response
        error = str(response.get("error") or "")
        if response.status_code == 429 or error in _RATE_LIMITED:
            raise RetryLater(_retry_after(response.headers), "Slack rate limit") from None
        if error in _PERMANENT:
            raise PermanentFailure(_PERMANENT[error].format(channel=channel)) from None
        raise


def _retry_after(headers: Mapping[str, Any]) -> float:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            raw = value[0] if isinstance(value, list | tuple) else value
            try:
                return max(float(raw), 0.0)
            except (TypeError, ValueError):
                break
    return 1.0


def _uploads(files: Sequence[OutgoingFile]) -> list[dict[str, Any]]:
    return [{"file": f.data, "filename": f.filename, "title": f.filename} for f in files]


def _digest(f: OutgoingFile) -> str:
    return hashlib.sha256(f.data).hexdigest()


def _ts_in_files(files: Sequence[Mapping[str, Any]], channel: str) -> str | None:
    """The ts of the message a file was shared in, from a file object's `shares`."""
    for f in files:
        shares = f.get("shares") or {}
        for visibility in ("public", "private"):
            entries = (shares.get(visibility) or {}).get(channel) or []
            if entries and entries[0].get("ts"):
                return str(entries[0]["ts"])
    return None
