"""Attachment downloads: declared size first, then a streamed read that stops at the limit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bot.commands import FileTooLarge
from bot.discord.files import AttachmentRef, DownloadFailed, download, incoming_file
from tests.fake_discord_api import APP_ID, FakeDiscordAPI


@pytest.fixture
def api() -> Iterator[FakeDiscordAPI]:
    fake = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    yield fake
    fake.close()


def test_reads_the_whole_file_within_the_limit(api: FakeDiscordAPI) -> None:
    data = bytes(range(256)) * 1000
    url = api.serve_file("ok.png", data, stream=True)

    async def scenario() -> bytes:
        await api.start()
        try:
            file = incoming_file(AttachmentRef(url, "ok.png", None, "image/png"))
            return await asyncio.to_thread(file.read, len(data))  # exactly at the limit
        finally:
            await api.stop()

    assert asyncio.run(scenario()) == data


def test_declared_size_over_the_limit_downloads_nothing(api: FakeDiscordAPI) -> None:
    url = api.serve_file("big.png", b"x" * 100)
    # No server is running: any download attempt would fail with DownloadFailed instead.
    with pytest.raises(FileTooLarge, match=r"big\.png is larger than 0\.0 MB"):
        download(AttachmentRef(url, "big.png", 5_000_000, "image/png"), 1_000)


def test_content_length_over_the_limit_is_refused_before_reading(api: FakeDiscordAPI) -> None:
    url = api.serve_file("liar.png", b"y" * 50_000)

    async def scenario() -> None:
        await api.start()
        try:
            ref = AttachmentRef(url, "liar.png", 10, "image/png")  # declares 10 bytes
            with pytest.raises(FileTooLarge):
                await asyncio.to_thread(download, ref, 1_000)
        finally:
            await api.stop()

    asyncio.run(scenario())


def test_unannounced_size_stops_streaming_past_the_limit(api: FakeDiscordAPI) -> None:
    data = b"z" * (48 * 1024 * 1024)
    url = api.serve_file("huge.bin", data, stream=True)

    async def scenario() -> int:
        await api.start()
        try:
            ref = AttachmentRef(url, "huge.bin", None, None)
            with pytest.raises(FileTooLarge, match=r"huge\.bin"):
                await asyncio.to_thread(download, ref, 200_000)
            await api.wait_for(lambda: "huge.bin" in api.streams_finished)
            return api.bytes_served["huge.bin"]
        finally:
            await api.stop()

    served = asyncio.run(scenario())
    # The reader hung up long before the end (socket buffers hold a few MB at most).
    assert served < len(data) // 2


def test_expired_link_is_a_clear_failure(api: FakeDiscordAPI) -> None:
    async def scenario() -> None:
        await api.start()
        try:
            ref = AttachmentRef(f"{api.base_url}/attachments/gone.png", "gone.png", 10, None)
            with pytest.raises(DownloadFailed, match=r"gone\.png: Discord answered 404"):
                await asyncio.to_thread(download, ref, 1_000)
        finally:
            await api.stop()

    asyncio.run(scenario())


def test_only_http_links_are_fetched() -> None:
    with pytest.raises(DownloadFailed, match="not an http"):
        download(AttachmentRef("file:///etc/passwd", "passwd", 10, None), 1_000)
