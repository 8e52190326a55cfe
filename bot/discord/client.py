"""The Discord client: slash commands, images in style threads, and raw reactions -> the core.

Every platform event is translated to a neutral Command or Reaction and handled by the core
in a worker thread (`asyncio.to_thread`), so a slow database never stalls the gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import discord
from discord import app_commands

from bot.commands import Actor, Command, CommandHandler, Reaction, Reply
from bot.discord.commands import build_commands
from bot.discord.replies import (
    answer_interaction,
    answer_message,
    answer_press,
    answer_reaction,
    form_modal,
)
from bot.discord.translate import (
    actor_of,
    interaction_command,
    message_command,
    press_event,
    reaction_event,
    team_of,
)

log = logging.getLogger(__name__)

Event = TypeVar("Event", Command, Reaction)

# Answers to these are for the invoker alone; the rest are shown to the channel.
PRIVATE_COMMANDS = frozenset({"jobs", "cancel", "style list", "style info", "audit"})
INTERNAL_ERROR = (
    "Something went wrong inside Atelier; the error is in the bot's log. "
    "Try again, and tell whoever runs the bot if it keeps happening."
)
# discord.py waits out shorter 429s itself; longer ones raise RateLimited (30 is its minimum).
MAX_RATELIMIT_WAIT_S = 30.0


def atelier_intents() -> discord.Intents:
    """Guilds (cache, roles), guild messages + content (thread images), guild reactions."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.message_content = True  # privileged: attachments are "content" too
    intents.guild_reactions = True
    return intents


class AtelierDiscordClient(discord.Client):
    def __init__(
        self,
        handler: CommandHandler,
        *,
        guild_id: int | None = None,
        sync_commands: bool = True,
        **options: object,
    ) -> None:
        options.setdefault("intents", atelier_intents())
        options.setdefault("max_ratelimit_timeout", MAX_RATELIMIT_WAIT_S)
        super().__init__(**options)  # type: ignore[arg-type]
        self.handler = handler
        self.guild_id = guild_id
        self.sync_commands = sync_commands
        self.tree = app_commands.CommandTree(self)
        for command in build_commands(self.run_command, self.suggest):
            self.tree.add_command(command)

    async def setup_hook(self) -> None:
        if self.sync_commands:
            synced = await self.sync_slash_commands()
            where = f"guild {self.guild_id}" if self.guild_id else "all guilds (global)"
            log.info("synced %d slash commands to %s", len(synced), where)

    async def sync_slash_commands(self) -> list[app_commands.AppCommand]:
        """To one guild while developing (instant), else globally (may take up to an hour)."""
        if self.guild_id is None:
            return await self.tree.sync()
        guild = discord.Object(id=self.guild_id)
        self.tree.copy_global_to(guild=guild)
        return await self.tree.sync(guild=guild)

    # Slash commands -------------------------------------------------------------------

    async def run_command(
        self,
        interaction: discord.Interaction,
        name: str,
        options: dict[str, object],
        attachments: list[discord.Attachment],
    ) -> None:
        """Defer first (Discord wants an answer within 3 s), then run the core and answer."""
        private = name in PRIVATE_COMMANDS
        await interaction.response.defer(thinking=True, ephemeral=private)
        try:
            command = interaction_command(interaction, name, options, attachments)
            replies = await asyncio.to_thread(self.handler.handle, command)
        except ValueError as exc:  # the command cannot be expressed (e.g. used in a DM)
            replies = [Reply(str(exc), private=True)]
        except Exception:
            log.exception("command %s (interaction %s) failed", name, interaction.id)
            replies = [Reply(INTERNAL_ERROR, private=True)]
        await answer_interaction(interaction, replies, deferred_private=private)

    # Buttons under results and the forms they open ------------------------------------

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Components (type 3) and modal submits (type 5) with Atelier's ids. Routed by the
        custom id alone, so buttons on messages from before a restart work the same."""
        press = press_event(interaction)
        if press is None:
            return
        if press.button.split(":")[1] == "edit" and not press.values:
            # A modal must be the first answer: no defer; the core only reads here.
            replies = await self._handle(
                self.handler.handle_press, press, f"press {press.event_id}"
            )
            form = next((r.form for r in replies if r.form is not None), None)
            if form is not None:
                await interaction.response.send_modal(form_modal(form))
                return
            await interaction.response.defer()
            await answer_press(interaction, replies)
            return
        await interaction.response.defer()  # acknowledged at once, nothing shown
        replies = await self._handle(self.handler.handle_press, press, f"press {press.event_id}")
        await answer_press(interaction, replies)

    async def suggest(self, interaction: discord.Interaction, option: str, typed: str) -> list[str]:
        if interaction.guild_id is None:
            return []
        team = team_of(interaction.guild_id, interaction.guild)
        return await asyncio.to_thread(self.handler.suggest, team, option, typed)

    # Images posted in a style's thread --------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        guild_id = message.guild.id if message.guild else getattr(message.channel, "guild_id", None)
        if guild_id is None or message.author.bot or not message.attachments:
            return
        channel = await self._resolve_channel(message.channel)
        if not isinstance(channel, discord.Thread):
            return
        author = message.author if isinstance(message.author, discord.Member) else None
        user = await self.actor_for(guild_id, message.author.id, author)
        command = message_command(message, channel, user)
        if command is None:
            return
        replies = await self._handle(self.handler.handle, command, f"message {message.id}")
        await answer_message(message, replies)

    async def _resolve_channel(self, channel: object) -> object:
        """A message in an uncached channel arrives on a PartialMessageable: ask what it is."""
        if not isinstance(channel, discord.PartialMessageable):
            return channel
        try:
            return await self.fetch_channel(channel.id)
        except discord.HTTPException:
            log.warning("could not look up channel %s; ignoring its message", channel.id)
            return channel

    # Reactions (raw: they arrive for messages older than the cache too) ----------------

    async def on_raw_reaction_add(self, raw: discord.RawReactionActionEvent) -> None:
        await self._reaction(raw)

    async def on_raw_reaction_remove(self, raw: discord.RawReactionActionEvent) -> None:
        await self._reaction(raw)

    async def _reaction(self, raw: discord.RawReactionActionEvent) -> None:
        if raw.guild_id is None or (self.user is not None and raw.user_id == self.user.id):
            return
        if raw.member is not None and raw.member.bot:
            return
        actor = await self.actor_for(raw.guild_id, raw.user_id, raw.member)
        reaction = reaction_event(raw, actor, self.get_guild(raw.guild_id))
        if reaction is None:
            return
        replies = await self._handle(self.handler.handle_reaction, reaction, reaction.event_id)
        if replies:
            channel = self.get_partial_messageable(raw.channel_id, guild_id=raw.guild_id)
            await answer_reaction(
                channel, lambda: self.create_dm(discord.Object(raw.user_id)), replies
            )

    async def actor_for(self, guild_id: int, user_id: int, member: discord.Member | None) -> Actor:
        """Who did it, with roles. Reaction removals (and events from guilds not yet
        cached) carry no member, so it is looked up."""
        if member is not None:
            return actor_of(member)
        guild = self.get_guild(guild_id)
        try:
            if guild is not None:
                return actor_of(guild.get_member(user_id) or await guild.fetch_member(user_id))
            data = await self.http.get_member(guild_id, user_id)
        except discord.HTTPException:
            # Left the server, or no access: judged with no roles, so a lead action is refused.
            return Actor(user_id=str(user_id))
        user = data["user"]
        name = data.get("nick") or user.get("global_name") or user["username"]
        return Actor(user_id=str(user_id), display_name=name, roles=frozenset(data["roles"]))

    async def _handle(
        self, handle: Callable[[Event], list[Reply]], event: Event, what: str
    ) -> list[Reply]:
        """Run the core off the event loop; a crash becomes a private apology, not silence."""
        try:
            return await asyncio.to_thread(handle, event)
        except Exception:
            log.exception("%s failed", what)
            return [Reply(INTERNAL_ERROR, private=True)]
