"""Slack payloads -> neutral Commands and Reactions (pure functions, no network)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bot.commands import (
    Actor,
    Command,
    IncomingFile,
    ParsedText,
    Reaction,
    TeamRef,
    TextParser,
)

PLATFORM = "slack"

# The slash commands the app registers (and declares in manifest.yaml).
SLASH_COMMANDS: tuple[str, ...] = ("/style", "/imagine", "/jobs", "/cancel")

# Slack names emoji by shortcode; the core speaks unicode.
EMOJI: Mapping[str, str] = {
    "white_check_mark": "✅",
    "heavy_check_mark": "✅",
    "x": "❌",
    "repeat": "🔁",
}

# Plain messages and file shares; edits, deletions, joins and bot posts are not uploads.
_UPLOAD_SUBTYPES = {None, "file_share"}


def team_of(body: Mapping[str, Any]) -> TeamRef:
    return TeamRef(
        platform=PLATFORM,
        external_id=str(body.get("team_id") or ""),
        name=str(body.get("team_domain") or ""),
    )


def emoji_of(reaction_name: str) -> str | None:
    """`white_check_mark` -> ✅; skin tones (`+1::skin-tone-2`) are dropped first."""
    return EMOJI.get(reaction_name.split("::", 1)[0])


def parse_slash(body: Mapping[str, Any], parser: TextParser) -> ParsedText:
    """("/style", "create ink inkstyle") -> ParsedText("style create", {...}); may raise."""
    return parser(str(body["command"]), str(body.get("text") or ""))


def slash_command(
    body: Mapping[str, Any], parsed: ParsedText, roles: frozenset[str] = frozenset()
) -> Command:
    """A slash command form. The trigger_id is unique per invocation: it is the event id."""
    return Command(
        event_id=str(body["trigger_id"]),
        team=team_of(body),
        channel=str(body["channel_id"]),
        user=Actor(
            user_id=str(body["user_id"]),
            display_name=str(body.get("user_name") or ""),
            roles=roles,
        ),
        name=parsed.name,
        args=dict(parsed.args),
    )


def is_thread_upload(event: Mapping[str, Any]) -> bool:
    """A person's message with files, posted as a reply in a thread."""
    thread_ts = event.get("thread_ts")
    return (
        event.get("type") == "message"
        and event.get("subtype") in _UPLOAD_SUBTYPES
        and not event.get("bot_id")
        and bool(event.get("user"))
        and bool(event.get("files"))
        and bool(thread_ts)
        and thread_ts != event.get("ts")
    )


def thread_upload(
    body: Mapping[str, Any],
    files: Sequence[IncomingFile],
    roles: frozenset[str] = frozenset(),
) -> Command:
    """Images posted in a thread: "style add" for the style that thread belongs to."""
    event = body["event"]
    return Command(
        event_id=str(body["event_id"]),
        team=team_of(body),
        channel=str(event["channel"]),
        user=Actor(user_id=str(event["user"]), roles=roles),
        name="style add",
        args={},
        thread=str(event["thread_ts"]),
        attachments=tuple(files),
    )


def is_known_reaction(event: Mapping[str, Any]) -> bool:
    item = event.get("item") or {}
    return (
        event.get("type") in ("reaction_added", "reaction_removed")
        and item.get("type") == "message"
        and bool(event.get("user"))
        and emoji_of(str(event.get("reaction") or "")) is not None
    )


def reaction(body: Mapping[str, Any], roles: frozenset[str] = frozenset()) -> Reaction:
    event = body["event"]
    emoji = emoji_of(str(event["reaction"]))
    if emoji is None:
        raise ValueError(f"Slack reaction :{event['reaction']}: has no meaning in Atelier.")
    return Reaction(
        event_id=str(body["event_id"]),
        team=team_of(body),
        channel=str(event["item"]["channel"]),
        message_id=str(event["item"]["ts"]),
        emoji=emoji,
        user=Actor(user_id=str(event["user"]), roles=roles),
        added=event["type"] == "reaction_added",
    )


def delivery_id(body: Mapping[str, Any]) -> str | None:
    """The id Slack keeps across redeliveries: event_id for events, trigger_id for commands."""
    if body.get("type") == "event_callback" and body.get("event_id"):
        return f"event:{body['event_id']}"
    if body.get("command") and body.get("trigger_id"):
        return f"command:{body['trigger_id']}"
    return None
