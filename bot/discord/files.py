"""Discord attachments as `IncomingFile`s, downloaded lazily with a size limit.

`IncomingFile.read` is called from a worker thread (the core runs off the event loop), so
the download is a plain blocking HTTP GET: it needs no event loop and cannot deadlock one.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlsplit

import discord
import discord.http

from bot.commands import FileTooLarge, IncomingFile

CHUNK_BYTES = 64 * 1024
DOWNLOAD_TIMEOUT_S = 60.0
USER_AGENT = "DiscordBot (https://github.com/atelier, 0.1) Atelier"
# Discord serves attachments from its CDN and its media proxy. A link anywhere else is not
# followed; neither is plain http.
DISCORD_FILE_ORIGINS = ("https://cdn.discordapp.com", "https://media.discordapp.net")
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    url = _ascii_url(ref.url)
    if _origin(url) not in _allowed_origins():
        raise DownloadFailed(
            f"{ref.filename}: not an https link to Discord's file servers, so it was not "
            "downloaded; attach the image to a message again."
        )
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
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


def _allowed_origins() -> set[tuple[str, str | None, int | None] | None]:
    # Also the API's origin, read per call: it is Discord's own, and where the bot is
    # pointed at another one (a proxy, a test's fake Discord) attachments come from there.
    return {_origin(o) for o in (*DISCORD_FILE_ORIGINS, discord.http.Route.BASE)} - {None}


def _origin(url: str) -> tuple[str, str | None, int | None] | None:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number
        return None
    return parts.scheme.lower(), parts.hostname, port


def _ascii_url(url: str) -> str:
    """Non-ASCII characters (a file named café.png) and spaces percent-encoded as UTF-8,
    which urllib would otherwise refuse."""
    return re.sub(r"[^\x21-\x7e]+", lambda m: quote(m.group(), safe=""), url)


def _too_large(filename: str, limit: int) -> str:
    return f"{filename} is larger than {limit / 1_000_000:.1f} MB; send a smaller file."
