"""Run the Discord bot (`atelier bot discord`) and print its invite link; never logs the token."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

import discord

from bot.commands import CommandHandler
from bot.delivery import BackgroundService, DelivererFactory
from bot.discord.client import AtelierDiscordClient
from bot.discord.sender import DiscordSender
from storage.settings import ConfigError, Settings

log = logging.getLogger(__name__)

# What the bot does in a channel: read and post messages and files (also in threads), show
# embeds, read older messages (reactions on review sheets), add reactions, open threads.
INVITE_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    embed_links=True,
    attach_files=True,
    read_message_history=True,
    add_reactions=True,
)
INVITE_SCOPES = ("bot", "applications.commands")
PORTAL = "https://discord.com/developers/applications"


def discord_token(settings: Settings) -> str:
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        raise ConfigError(
            f"ATELIER_DISCORD_TOKEN is not set; create a bot at {PORTAL}, "
            "put its token in .env as ATELIER_DISCORD_TOKEN=..., and run again."
        )
    return settings.discord_token.get_secret_value().strip()


def application_id_from_token(token: str) -> int:
    """A bot token's first part is its user id in base64, which is the application id."""
    head = token.split(".", 1)[0]
    try:
        return int(base64.b64decode(head + "=" * (-len(head) % 4), validate=True).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ConfigError(
            f"ATELIER_DISCORD_TOKEN does not look like a Discord bot token; copy it again from "
            f"{PORTAL} (Bot > Reset Token)."
        ) from None


def invite_url(application_id: int, guild_id: int | None = None) -> str:
    return discord.utils.oauth_url(
        application_id,
        permissions=INVITE_PERMISSIONS,
        scopes=INVITE_SCOPES,
        guild=discord.Object(id=guild_id) if guild_id else discord.utils.MISSING,
    )


def print_invite_url(settings: Settings, application_id: int | None = None) -> str:
    """Print (and return) the link that adds the bot to a server with what it needs."""
    app_id = application_id or application_id_from_token(discord_token(settings))
    url = invite_url(app_id, settings.discord_guild_id)
    print(f"Invite Atelier to your Discord server:\n  {url}")
    print(
        f"Also enable 'Message Content Intent' under Bot in {PORTAL}: "
        "Atelier reads images posted in a style's thread."
    )
    return url


def build_client(
    settings: Settings, handler: CommandHandler, *, sync_commands: bool = True
) -> AtelierDiscordClient:
    return AtelierDiscordClient(
        handler, guild_id=settings.discord_guild_id, sync_commands=sync_commands
    )


def run_discord(
    settings: Settings,
    handler: CommandHandler,
    deliverer_factory: DelivererFactory | None = None,
    *,
    sync_commands: bool = True,
) -> None:
    """Connect to Discord and serve until interrupted; the outbox delivers beside it."""
    token = discord_token(settings)
    client = build_client(settings, handler, sync_commands=sync_commands)
    deliverer = deliverer_factory(DiscordSender(client)) if deliverer_factory else None
    try:
        asyncio.run(_serve(client, token, deliverer))
    except discord.LoginFailure:
        raise ConfigError(
            f"Discord rejected ATELIER_DISCORD_TOKEN; copy the bot token again from {PORTAL} "
            "(Bot > Reset Token) into .env."
        ) from None
    except discord.PrivilegedIntentsRequired:
        raise ConfigError(
            f"Discord refused the Message Content intent; enable 'Message Content Intent' "
            f"under Bot in {PORTAL}, then start the bot again."
        ) from None
    except KeyboardInterrupt:
        log.info("stopped")


async def _serve(
    client: AtelierDiscordClient, token: str, deliverer: BackgroundService | None
) -> None:
    async with client:
        await client.login(token)  # REST works from here, so delivery may begin
        if deliverer is not None:
            deliverer.start()
        try:
            await client.connect()
        finally:
            if deliverer is not None:
                # Off the loop: a delivery in flight waits on this loop to finish.
                await asyncio.to_thread(deliverer.shutdown)
