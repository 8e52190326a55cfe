"""Discord attachments as `IncomingFile`s, downloaded lazily with a size limit.

`IncomingFile.read` is called from a worker thread (the core runs off the event loop), so
the download is a plain blocking HTTP GET: it needs no event loop and cannot deadlock one.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from urllib.error import HTTPError, URLError

import discord
import discord.http

from bot.commands import FileUnavailable, IncomingFile
from bot.downloads import Origin, ascii_url, origin, origins, read_capped, too_large

DOWNLOAD_TIMEOUT_S = 60.0
USER_AGENT = "DiscordBot (https://github.com/atelier, 0.1) Atelier"
# Discord serves attachments from its CDN and its media proxy. A link anywhere else is not
# followed; neither is plain http.
DISCORD_FILE_ORIGINS = ("https://cdn.discordapp.com", "https://media.discordapp.net")


class DownloadFailed(FileUnavailable):
    """The attachment could not be fetched (a link off Discord's file servers, an expired
    link, network trouble); the reason says what to do about it."""


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
        raise too_large(ref.filename, limit)
    url = ascii_url(ref.url)
    if origin(url) not in _allowed_origins():
        raise DownloadFailed(
            ref.filename,
            "not an https link to Discord's file servers, so it was not downloaded; "
            "attach the image to a message again.",
        )
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return read_capped(response, ref.filename, limit)
    except HTTPError as exc:
        raise DownloadFailed(
            ref.filename,
            f"Discord answered {exc.code} for the download; "
            "post the image again (attachment links expire).",
        ) from None
    except URLError as exc:
        raise DownloadFailed(ref.filename, f"download failed ({exc.reason}); retry.") from None


def _allowed_origins() -> set[Origin]:
    # Also the API's origin, read per call: it is Discord's own, and where the bot is
    # pointed at another one (a proxy, a test's fake Discord) attachments come from there.
    return origins((*DISCORD_FILE_ORIGINS, discord.http.Route.BASE))
