"""What every platform's file download keeps to: fetch only from the platform's own file
servers, encode the URL urllib can send, and stop reading past the size limit.

The Slack and Discord adapters each fetch with their own headers (Slack's bot token,
Discord's user agent); the rules they share live here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit

from bot.commands import FileTooLarge

Origin = tuple[str, str | None, int | None]  # scheme, host, port

CHUNK_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> Origin | None:
    """Scheme, host and port (the default port filled in), compared to decide where a link
    leads; None for a URL that names no usable port."""
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number
        return None
    return parts.scheme.lower(), parts.hostname, port


def origins(urls: Iterable[str]) -> set[Origin]:
    """The origins of `urls`, leaving out any that has none."""
    return {o for o in map(origin, urls) if o is not None}


def ascii_url(url: str) -> str:
    """Non-ASCII characters (a file named café.png) and spaces percent-encoded as UTF-8:
    urllib refuses them, and the platforms' own links may leave them raw."""
    return re.sub(r"[^\x21-\x7e]+", lambda m: quote(m.group(), safe=""), url)


def too_large(filename: str, limit: int) -> FileTooLarge:
    return FileTooLarge(
        f"{filename} is larger than {limit / 1_000_000:.1f} MB; send a smaller file."
    )


def read_capped(response: Any, filename: str, limit: int) -> bytes:
    """The body of an HTTP response, raising FileTooLarge as soon as it is known to exceed
    `limit` bytes: by its Content-Length, else (absent or wrong) by what has arrived."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(filename, limit)
    chunks: list[bytes] = []
    received = 0
    while chunk := response.read(CHUNK_BYTES):
        received += len(chunk)
        if received > limit:
            raise too_large(filename, limit)
        chunks.append(chunk)
    return b"".join(chunks)
