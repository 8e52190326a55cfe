"""Starting the Discord bot: token handling, the invite link, delivery beside the client."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import discord
import pytest

from bot.delivery import MessageSender
from bot.discord.client import AtelierDiscordClient
from bot.discord.run import (
    INVITE_PERMISSIONS,
    application_id_from_token,
    print_invite_url,
    run_discord,
)
from bot.discord.sender import DiscordSender
from storage.settings import ConfigError, Settings, load_settings
from tests.fake_discord_api import (
    APP_ID,
    FAKE_TOKEN,
    GUILD_ID,
    FakeDiscordAPI,
    RecordingHandler,
    patch_route_base,
)


def settings(tmp_path: Path, **changes: Any) -> Settings:
    return load_settings(data_dir=tmp_path, **changes)


@pytest.fixture
def api_in_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscordAPI]:
    """The fake server on its own loop, since run_discord owns the main thread's loop."""
    api = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    patch_route_base(monkeypatch, api)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(api.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait()
    yield api
    asyncio.run_coroutine_threadsafe(api.stop(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def test_invite_url_asks_for_the_scopes_and_permissions_the_bot_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = print_invite_url(settings(tmp_path, discord_token=FAKE_TOKEN))
    query = parse_qs(urlsplit(url).query)
    assert query["client_id"] == [str(APP_ID)]  # read from the token
    assert query["scope"] == ["bot applications.commands"]
    permissions = discord.Permissions(int(query["permissions"][0]))
    assert permissions == INVITE_PERMISSIONS
    for needed in (
        "view_channel",
        "send_messages",
        "send_messages_in_threads",
        "attach_files",
        "embed_links",
        "read_message_history",
        "add_reactions",
    ):
        assert getattr(permissions, needed), needed
    assert not permissions.administrator and not permissions.manage_messages
    printed = capsys.readouterr().out
    assert url in printed and "Message Content Intent" in printed
    assert FAKE_TOKEN not in printed and FAKE_TOKEN.split(".")[2] not in printed


def test_invite_url_preselects_the_development_guild(tmp_path: Path) -> None:
    url = print_invite_url(
        settings(tmp_path, discord_token=FAKE_TOKEN, discord_guild_id=GUILD_ID),
        application_id=42,
    )
    query = parse_qs(urlsplit(url).query)
    assert query["client_id"] == ["42"]
    assert query["guild_id"] == [str(GUILD_ID)]


def test_token_problems_are_one_clear_line_without_the_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ATELIER_DISCORD_TOKEN is not set"):
        print_invite_url(settings(tmp_path))
    bad = "not-a-token.secretpart.moresecret"
    with pytest.raises(ConfigError, match="does not look like a Discord bot token") as caught:
        application_id_from_token(bad)
    assert "secretpart" not in str(caught.value)
    assert application_id_from_token(FAKE_TOKEN) == APP_ID


def test_rejected_token_is_a_config_error_and_never_logged(
    tmp_path: Path, api_in_thread: FakeDiscordAPI, caplog: pytest.LogCaptureFixture
) -> None:
    api_in_thread.fail_next("GET", "/users/@me", 401, {"message": "401: Unauthorized", "code": 0})
    started: list[str] = []

    class Deliverer:
        def start(self) -> None:
            started.append("start")

        def shutdown(self) -> None:
            started.append("stop")

    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError, match="rejected"):
        run_discord(
            settings(tmp_path, discord_token=FAKE_TOKEN),
            RecordingHandler(),
            lambda _sender: Deliverer(),
        )
    assert started == []  # nothing is delivered without a session
    (login,) = api_in_thread.find("GET", "/users/@me")
    assert login.headers["Authorization"] == f"Bot {FAKE_TOKEN}"  # it did try the token
    assert FAKE_TOKEN not in caplog.text


def test_delivery_runs_between_login_and_shutdown(
    tmp_path: Path, api_in_thread: FakeDiscordAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    senders: list[MessageSender] = []

    async def gateway_session_ends(self: AtelierDiscordClient, *, reconnect: bool = True) -> None:
        # Stands in for the websocket session (not faked here): it ends at once.
        events.append("connected")

    monkeypatch.setattr(AtelierDiscordClient, "connect", gateway_session_ends)

    class Deliverer:
        def __init__(self, sender: MessageSender) -> None:
            senders.append(sender)

        def start(self) -> None:
            # REST is usable from here: login (and the slash command sync) already happened.
            events.append(f"start after {len(api_in_thread.find('GET', '/users/@me'))} login")

        def shutdown(self) -> None:
            events.append("stop")

    run_discord(
        settings(tmp_path, discord_token=FAKE_TOKEN, discord_guild_id=GUILD_ID),
        RecordingHandler(),
        Deliverer,
    )
    assert events == ["start after 1 login", "connected", "stop"]
    assert isinstance(senders[0], DiscordSender)
    assert len(api_in_thread.find("PUT", rf"/applications/{APP_ID}/guilds/{GUILD_ID}/commands"))
