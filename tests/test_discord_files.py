"""Attachment downloads: declared size first, then a streamed read that stops at the limit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bot.commands import FileTooLarge
from bot.discord.files import AttachmentRef, DownloadFailed, download, incoming_file
from tests.fake_discord_api import APP_ID, FakeDiscordAPI, patch_route_base


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscordAPI]:
    fake = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    patch_route_base(monkeypatch, fake)  # the bot talks to the fake: its files are Discord's
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


REFUSED = (
    "not an https link to Discord's file servers, so it was not downloaded; "
    "attach the image to a message again."
)


@pytest.mark.parametrize(
    "link",
    [
        pytest.param("http://localhost:{port}/attachments/a.png", id="another-host"),
        pytest.param("https://cdn.discordapp.com.evil.example/a.png", id="look-alike-host"),
        pytest.param("http://cdn.discordapp.com/attachments/1/2/a.png", id="plain-http"),
        pytest.param("http://media.discordapp.net/attachments/1/2/a.png", id="plain-http-proxy"),
        pytest.param("ftp://cdn.discordapp.com/a.png", id="ftp"),
    ],
)
def test_links_off_discords_file_servers_are_not_fetched(api: FakeDiscordAPI, link: str) -> None:
    api.serve_file("a.png", b"png")

    async def scenario() -> None:
        await api.start()
        try:
            ref = AttachmentRef(link.format(port=api.port), "a.png", 3, "image/png")
            with pytest.raises(DownloadFailed) as refused:
                await asyncio.to_thread(download, ref, 1_000)
            assert str(refused.value) == f"a.png: {REFUSED}"
        finally:
            await api.stop()

    asyncio.run(scenario())
    assert api.find("GET", "/attachments/a.png") == []


def test_a_bot_on_discord_itself_fetches_only_from_its_file_servers() -> None:
    fake = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)  # Route.BASE not moved

    async def scenario() -> None:
        await fake.start()
        try:
            ref = AttachmentRef(fake.serve_file("a.png", b"png"), "a.png", 3, "image/png")
            with pytest.raises(DownloadFailed, match="not an https link to Discord's file"):
                await asyncio.to_thread(download, ref, 1_000)
        finally:
            await fake.stop()

    try:
        asyncio.run(scenario())
        assert fake.find("GET", "/attachments/a.png") == []
    finally:
        fake.close()


def test_a_file_name_outside_ascii_is_percent_encoded(api: FakeDiscordAPI) -> None:
    url = api.serve_file("café-ü.png", b"png bytes")  # as Discord may send it: raw

    async def scenario() -> bytes:
        await api.start()
        try:
            file = incoming_file(AttachmentRef(url, "café-ü.png", None, "image/png"))
            return await asyncio.to_thread(file.read, 1_000)
        finally:
            await api.stop()

    assert asyncio.run(scenario()) == b"png bytes"
