"""Slack payloads -> neutral Commands and Reactions (pure functions, no network)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bot.commands import (
    Actor,
    Command,
    IncomingFile,
    ParsedText,
    Press,
    Reaction,
    TeamRef,
    TextParser,
    command_of_form,
)
from storage.result_buttons import PREFIX

BUTTON_PREFIX = f"{PREFIX}:"

PLATFORM = "slack"

# The slash commands the app registers (and declares in manifest.yaml).
SLASH_COMMANDS: tuple[str, ...] = ("/style", "/imagine", "/jobs", "/cancel", "/audit")
# A message with files in a thread whose text is one of these commands runs it with the
# files (Slack slash commands carry no files): `/imagine a cat strength=0.4`.
FILE_COMMANDS: tuple[tuple[str, str], ...] = (("/imagine", ""), ("/style", "import"))

# Slack names emoji by shortcode; the core speaks unicode.
EMOJI: Mapping[str, str] = {
    "white_check_mark": "✅",
    "heavy_check_mark": "✅",
    "x": "❌",
    "repeat": "🔁",
    # Keycap digits pick a row of a training result's checkpoints.png.
    **{
        name: f"{n}\ufe0f\u20e3"
        for n, name in enumerate(
            ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine"), 1
        )
    },
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
    parser: TextParser | None = None,
) -> Command:
    """Images posted in a thread: "style add" for the style that thread belongs to, or the
    command the message's text names (FILE_COMMANDS) with the files attached."""
    event = body["event"]
    parsed = file_command(str(event.get("text") or ""), parser) if parser else None
    return Command(
        event_id=str(body["event_id"]),
        team=team_of(body),
        channel=str(event["channel"]),
        user=Actor(user_id=str(event["user"]), roles=roles),
        name=parsed.name if parsed else "style add",
        args=dict(parsed.args) if parsed else {},
        thread=str(event["thread_ts"]),
        attachments=tuple(files),
    )


def file_command(text: str, parser: TextParser) -> ParsedText | None:
    """`/imagine ...` or `/style import ...` as a message's text (the slash may be left out)."""
    words = text.strip().split(maxsplit=1)
    if not words:
        return None
    slash = "/" + words[0].lstrip("/").lower()
    rest = words[1] if len(words) > 1 else ""
    for command, sub in FILE_COMMANDS:
        if slash == command and (not sub or rest.split(" ", 1)[0].lower() == sub):
            return parser(slash, rest)
    return None


def block_press(body: Mapping[str, Any], roles: frozenset[str] = frozenset()) -> Press:
    """A button pressed under a result (block_actions). The trigger_id is unique per press:
    it is the event id, so a repeated delivery makes nothing twice."""
    action = body["actions"][0]
    message = body.get("message") or {}
    return Press(
        event_id=str(body["trigger_id"]),
        team=_team_of_interaction(body),
        channel=str((body.get("channel") or {}).get("id") or ""),
        thread=message.get("thread_ts"),
        user=_user_of_interaction(body, roles),
        button=str(action["action_id"]),
    )


def form_request(body: Mapping[str, Any]) -> str | None:
    """The command a bare slash command names (`/imagine`, `/style train`): the core may
    answer it with a form (a modal with pick lists) rather than the usage."""
    words = str(body.get("text") or "").split()
    if len(words) > 1:
        return None
    return " ".join([str(body["command"]).lstrip("/"), *words]).lower()


def is_command_form(body: Mapping[str, Any]) -> bool:
    return command_of_form(str(body["view"]["callback_id"])) is not None


def view_command(body: Mapping[str, Any], roles: frozenset[str] = frozenset()) -> Command:
    """A submitted command form (view_submission): the same Command the typed command
    makes, its filled-in fields as args (empty ones left out, as if not typed)."""
    view = body["view"]
    where = _where(view)
    name = command_of_form(str(view["callback_id"]))
    assert name is not None
    return Command(
        event_id=_view_event_id(view),
        team=_team_of_interaction(body),
        channel=str(where.get("channel") or ""),
        thread=where.get("thread"),
        user=_user_of_interaction(body, roles),
        name=name,
        args={k: v for k, v in _view_values(view).items() if v.strip()},
    )


def view_press(body: Mapping[str, Any], roles: frozenset[str] = frozenset()) -> Press:
    """A submitted modal (view_submission): its callback_id is the button it came from;
    `private_metadata` carries where the button was (a view has no channel)."""
    view = body["view"]
    where = _where(view)
    return Press(
        event_id=_view_event_id(view),
        team=_team_of_interaction(body),
        channel=str(where.get("channel") or ""),
        thread=where.get("thread"),
        user=_user_of_interaction(body, roles),
        button=str(view["callback_id"]),
        values=_view_values(view),
    )


def _where(view: Mapping[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(view.get("private_metadata") or "{}")


def _view_event_id(view: Mapping[str, Any]) -> str:
    # The view's id and hash: one submission of one modal, however often Slack sends it.
    return f"view:{view['id']}:{view.get('hash', '')}"


def _view_values(view: Mapping[str, Any]) -> dict[str, str]:
    """Each input's value by its action id: typed text, or a static select's pick."""
    values: dict[str, str] = {}
    for block in (view.get("state") or {}).get("values", {}).values():
        for action_id, state in block.items():
            picked = state.get("selected_option") or {}
            values[str(action_id)] = str(state.get("value") or picked.get("value") or "")
    return values


def _team_of_interaction(body: Mapping[str, Any]) -> TeamRef:
    team = body.get("team") or {}
    return TeamRef(
        platform=PLATFORM, external_id=str(team.get("id") or ""), name=str(team.get("domain") or "")
    )


def _user_of_interaction(body: Mapping[str, Any], roles: frozenset[str]) -> Actor:
    user = body.get("user") or {}
    name = str(user.get("username") or user.get("name") or "")
    return Actor(user_id=str(user.get("id") or ""), display_name=name, roles=roles)


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
