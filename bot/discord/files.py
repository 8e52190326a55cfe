"""Discord attachments as `IncomingFile`s, downloaded lazily with a size limit.

`IncomingFile.read` is called from a worker thread (the core runs off the event loop), so
the download is a plain blocking HTTP GET: it needs no event loop and cannot deadlock one.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

import discord

from bot.commands import FileTooLarge, IncomingFile

CHUNK_BYTES = 64 * 1024
DOWNLOAD_TIMEOUT_S = 60.0
USER_AGENT = "DiscordBot (https://github.com/atelier, 0.1) Atelier"


class DownloadFailed(Exception):
    """The attachment could not be fetched (expired link, network trouble)."""


@dataclass(frozen=True)
class AttachmentRef:
    """What we need of an attachment to fetch it later; a discord.Attachment is not needed."""

    url: str
    filename: str
    size: int | None
    content_type: str | None


def attachment_ref(attachment: discord.Attachment) -> AttachmentRef:
    return AttachmentRef(
        url=attachment.url,
        filename=attachment.filename,
        size=attachment.size,
        content_type=attachment.content_type,
    )


def incoming_file(attachment: discord.Attachment | AttachmentRef) -> IncomingFile:
    """An IncomingFile whose `read(limit)` downloads the attachment, at most `limit` bytes."""
    ref = attachment if isinstance(attachment, AttachmentRef) else attachment_ref(attachment)
    return IncomingFile(
        filename=ref.filename,
        read=lambda limit: download(ref, limit),
        size=ref.size,
        content_type=ref.content_type,
    )


def download(ref: AttachmentRef, limit: int, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Fetch `ref.url`; raise FileTooLarge as soon as it is known to exceed `limit` bytes."""
    # Discord tells us the size up front: refuse without downloading a byte.
    if ref.size is not None and ref.size > limit:
        raise FileTooLarge(_too_large(ref.filename, limit))
    if urlsplit(ref.url).scheme not in ("http", "https"):
        raise DownloadFailed(f"{ref.filename}: not an http(s) attachment link.")
    request = urllib.request.Request(ref.url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise FileTooLarge(_too_large(ref.filename, limit))
            chunks: list[bytes] = []
            received = 0
            while chunk := response.read(CHUNK_BYTES):
                received += len(chunk)
                # The declared size may be absent or wrong: stop reading past the limit.
                if received > limit:
                    raise FileTooLarge(_too_large(ref.filename, limit))
                chunks.append(chunk)
            return b"".join(chunks)
    except HTTPError as exc:
        raise DownloadFailed(
            f"{ref.filename}: Discord answered {exc.code} for the download; "
            "post the image again (attachment links expire)."
        ) from None
    except URLError as exc:
        raise DownloadFailed(f"{ref.filename}: download failed ({exc.reason}); retry.") from None


def _too_large(filename: str, limit: int) -> str:
    return f"{filename} is larger than {limit / 1_000_000:.1f} MB; send a smaller file."
