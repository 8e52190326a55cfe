"""Download files people share in Slack (`url_private`), with the bot token and a size cap."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from email.message import Message as HTTPMessage
from functools import partial
from typing import IO, Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.commands import FileUnavailable, IncomingFile
from bot.downloads import ascii_url, origin, origins, read_capped

# Where Slack serves shared files. A file URL anywhere else is not followed.
SLACK_FILE_ORIGINS = ("https://files.slack.com",)


class _TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send the bot token only to the origin it was meant for.

    urllib copies every request header into the redirected request, so a file URL that
    redirects to another host (a CDN, or a link someone planted) would receive the token.
    """

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and origin(newurl) != origin(req.full_url):
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_TokenStaysHome)


class SlackFileError(FileUnavailable):
    """A shared file could not be fetched; the reason says what to do about it."""


class SlackFiles:
    """Turns a Slack file object into an IncomingFile that downloads only when read."""

    def __init__(
        self,
        client: WebClient,
        *,
        timeout: float = 30.0,
        file_origins: Iterable[str] = SLACK_FILE_ORIGINS,
    ) -> None:
        self._client = client
        self._timeout = timeout
        # The API's own origin too: it gets the token already, and where the API is moved
        # (a proxy, a test's fake Slack) its files are served from there.
        self._origins = origins((*file_origins, client.base_url))

    def incoming(self, file: Mapping[str, Any]) -> IncomingFile:
        name = str(file.get("name") or file.get("title") or file.get("id") or "file")
        size = str(file.get("size", ""))
        return IncomingFile(
            filename=name,
            read=partial(self._read, dict(file), name),
            size=int(size) if size.isdigit() else None,
            content_type=file.get("mimetype") or None,
        )

    def _read(self, file: dict[str, Any], name: str, limit: int) -> bytes:
        url = file.get("url_private") or file.get("url_private_download")
        if not url:
            # Slack Connect shares arrive with file_access=check_file_info and no URL.
            url = self._lookup_url(file, name)
        url = str(url)
        if origin(url) not in self._origins:
            raise SlackFileError(
                name,
                "its link does not lead to Slack's file server, so it was not downloaded; "
                "share the image in Slack again.",
            )
        return self.download(url, name, limit)

    def _lookup_url(self, file: Mapping[str, Any], name: str) -> str:
        try:
            info = self._client.files_info(file=str(file.get("id") or ""))["file"]
        except SlackApiError as exc:
            raise SlackFileError(
                name,
                f"Slack would not show it to the bot ({exc.response.get('error')}); "
                "give the app the files:read scope, or post the image again.",
            ) from None
        url = info.get("url_private") or info.get("url_private_download")
        if not url:
            raise SlackFileError(name, "Slack gave no download address for it; post it again.")
        return str(url)

    def download(self, url: str, name: str, limit: int) -> bytes:
        """GET `url` with the bot token, stopping (FileTooLarge) once past `limit` bytes."""
        token = self._client.token or ""
        request = urllib.request.Request(
            ascii_url(url), headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with _OPENER.open(request, timeout=self._timeout) as response:
                if response.headers.get_content_type() == "text/html":
                    # Slack answers a request it does not accept with its sign-in page.
                    raise SlackFileError(
                        name,
                        "Slack sent its sign-in page instead of the file; give the app the "
                        "files:read scope and reinstall it.",
                    )
                return read_capped(response, name, limit)
        except urllib.error.HTTPError as exc:
            raise SlackFileError(
                name, f"Slack refused to send it (HTTP {exc.code}); post the image again."
            ) from None
        except urllib.error.URLError as exc:
            raise SlackFileError(
                name, f"could not reach Slack to fetch it ({exc.reason}); try again shortly."
            ) from None
