"""Discord objects -> neutral Commands and Reactions. No I/O here: callers resolve first."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import discord

from bot.commands import Actor, Command, IncomingFile, Press, Reaction, TeamRef
from bot.discord.files import incoming_file
from storage.result_buttons import PREFIX

PLATFORM = "discord"
BUTTON_PREFIX = f"{PREFIX}:"
VARIATION_SELECTOR = "\ufe0f"

FileMaker = Callable[[discord.Attachment], IncomingFile]


def team_of(guild_id: int, guild: discord.Guild | None = None) -> TeamRef:
    """A team is a guild; its name is known only when the guild is cached."""
    name = guild.name if guild is not None and guild.name else ""
    return TeamRef(platform=PLATFORM, external_id=str(guild_id), name=name)


def member_roles(member: discord.Member) -> frozenset[str]:
    """The member's role ids, plus the names of those the guild cache knows.

    Leads are configured by name or id; ids come with every member payload while names
    need the guild's role list, so both are offered. @everyone is not a role anyone holds.
    """
    ids = {str(role_id) for role_id in member._roles}  # ids even when the guild is not cached
    if getattr(member, "guild", None) is None:  # a message from a guild not (yet) cached
        return frozenset(ids)
    cached = [role for role in member.roles if not role.is_default()]
    return frozenset(ids | {role.name for role in cached} | {str(role.id) for role in cached})


def actor_of(user: discord.Member | discord.User) -> Actor:
    roles = member_roles(user) if isinstance(user, discord.Member) else frozenset()
    return Actor(user_id=str(user.id), display_name=user.display_name, roles=roles)


def locate(channel: object, fallback_id: int) -> tuple[str, str | None]:
    """(channel, thread) ids: inside a thread the channel is its parent."""
    if isinstance(channel, discord.Thread):
        return str(channel.parent_id), str(channel.id)
    channel_id = getattr(channel, "id", None)
    return str(channel_id if channel_id is not None else fallback_id), None


def option_text(value: object) -> str | None:
    """Typed slash-command options -> the strings the core parses (None: not given)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def interaction_command(
    interaction: discord.Interaction,
    name: str,
    options: Mapping[str, object],
    attachments: Sequence[discord.Attachment] = (),
    *,
    make_file: FileMaker = incoming_file,
) -> Command:
    """A slash command as the core sees it; the interaction id is the event id."""
    if interaction.guild_id is None:
        raise ValueError("Atelier's commands work in a server, not in direct messages.")
    channel, thread = locate(interaction.channel, interaction.channel_id or 0)
    args = {key: text for key, value in options.items() if (text := option_text(value)) is not None}
    return Command(
        event_id=str(interaction.id),
        team=team_of(interaction.guild_id, interaction.guild),
        channel=channel,
        user=actor_of(interaction.user),
        name=name,
        args=args,
        thread=thread,
        attachments=tuple(make_file(a) for a in attachments),
    )


def message_command(
    message: discord.Message,
    channel: object,
    user: Actor,
    *,
    make_file: FileMaker = incoming_file,
) -> Command | None:
    """Files posted in a thread become "style add" for that thread; anything else is chat.

    `channel` is the message's channel resolved by the caller (a Thread when it is one),
    `user` its author with roles. The core decides whether the thread belongs to a style
    and whether each file is an image, so it can explain a refused file.
    """
    if message.author.bot or not message.attachments or not isinstance(channel, discord.Thread):
        return None
    guild_id = channel.guild.id if channel.guild is not None else None
    if guild_id is None:
        return None
    return Command(
        event_id=str(message.id),
        team=team_of(guild_id, message.guild),
        channel=str(channel.parent_id),
        user=user,
        name="style add",
        args={},
        thread=str(channel.id),
        attachments=tuple(make_file(a) for a in message.attachments),
    )


def emoji_text(emoji: discord.PartialEmoji) -> str:
    """Unicode emoji as the bare character (✅, not ✅+VS16); custom ones as <:name:id>."""
    if emoji.is_unicode_emoji():
        return (emoji.name or "").replace(VARIATION_SELECTOR, "")
    return str(emoji)


def reaction_event(
    raw: discord.RawReactionActionEvent, user: Actor, guild: discord.Guild | None = None
) -> Reaction | None:
    """A reaction in a server; Discord gives it no event id, so one is built from its parts."""
    if raw.guild_id is None:
        return None
    added = raw.event_type == "REACTION_ADD"
    emoji = emoji_text(raw.emoji)
    return Reaction(
        event_id=f"reaction:{raw.message_id}:{raw.user_id}:{emoji}:{'add' if added else 'remove'}",
        team=team_of(raw.guild_id, guild),
        channel=str(raw.channel_id),
        message_id=str(raw.message_id),
        emoji=emoji,
        user=user,
        added=added,
    )


def press_event(interaction: discord.Interaction) -> Press | None:
    """A button pressed (component, type 3) or a modal submitted (type 5) as a Press; None
    for interactions that are not Atelier's buttons or forms."""
    if interaction.guild_id is None or not isinstance(interaction.data, Mapping):
        return None
    custom_id = str(interaction.data.get("custom_id") or "")
    if not custom_id.startswith(BUTTON_PREFIX):
        return None
    values: dict[str, str] = {}
    if interaction.type == discord.InteractionType.modal_submit:
        for row in interaction.data.get("components") or []:
            for item in row.get("components") or []:
                values[str(item["custom_id"])] = str(item.get("value") or "")
    elif interaction.type != discord.InteractionType.component:
        return None
    channel, thread = locate(interaction.channel, interaction.channel_id or 0)
    return Press(
        event_id=str(interaction.id),
        team=team_of(interaction.guild_id, interaction.guild),
        channel=channel,
        thread=thread,
        user=actor_of(interaction.user),
        button=custom_id,
        values=values,
    )
