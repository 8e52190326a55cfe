"""Platform-neutral commands and replies: the contract between chat adapters and the core.

Adapters (Discord, Slack, console) turn a platform payload into a `Command` or a
`Reaction`, hand it to a `CommandHandler`, and show the `Reply`s it returns. Anything
said later (progress, results, review sheets) goes through the outbox instead, so the
core never talks to a platform directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from storage.result_buttons import PREFIX


class FileTooLarge(Exception):
    """Raised by `IncomingFile.read` when the file is bigger than the limit asked for."""


class FileUnavailable(Exception):
    """Raised by `IncomingFile.read` when the platform will not or cannot hand the file over
    (a link off its file servers, a missing permission, an expired link, no network).

    `reason` is what the person reads after the file's name: why, and what to do about it.
    It leaves the name out so that the core shows the name in its own safe form (a file
    name is anyone's text: newlines, bidi overrides).
    """

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: {reason}")
        self.filename = filename
        self.reason = reason


@dataclass(frozen=True)
class TeamRef:
    """A Discord guild or a Slack workspace (or the console's single team)."""

    platform: str
    external_id: str
    name: str = ""


@dataclass(frozen=True)
class Actor:
    """Who did it. `roles` are Discord role names and ids, or Slack user-group ids."""

    user_id: str
    display_name: str = ""
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class IncomingFile:
    """An attachment, downloaded only when the core decides to take it.

    `read(limit)` returns the bytes, or raises FileTooLarge past `limit` bytes (the adapter
    must stop downloading there), or FileUnavailable saying why it cannot. `size` is the
    platform's declared size, if any.
    """

    filename: str
    read: Callable[[int], bytes]
    size: int | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class Command:
    """A slash command (or an image posted in a style's thread: name "style add")."""

    event_id: str
    team: TeamRef
    channel: str
    user: Actor
    name: str  # "style create", "style add", ..., "imagine", "jobs", "cancel"
    args: Mapping[str, str] = field(default_factory=dict)
    thread: str | None = None
    attachments: Sequence[IncomingFile] = ()


@dataclass(frozen=True)
class Reaction:
    """An emoji added to (or removed from) a message the bot posted."""

    event_id: str
    team: TeamRef
    channel: str
    message_id: str  # the platform's id of the reacted-to message (Slack: its ts)
    emoji: str  # the unicode character, e.g. "✅"; adapters map Slack names to it
    user: Actor
    added: bool = True


@dataclass(frozen=True)
class Press:
    """A button pressed under a result, or the edit form it opened submitted.

    `button` is the button's id (storage.result_buttons: it names the action and the
    generation); `event_id` is the platform's interaction id, so a repeated press does
    nothing twice. `values` are a submitted form's fields.
    """

    event_id: str
    team: TeamRef
    channel: str
    user: Actor
    button: str
    thread: str | None = None
    values: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FormField:
    name: str
    label: str
    value: str = ""
    multiline: bool = False
    required: bool = True
    max_length: int = 2000
    choices: Sequence[str] = ()  # a pick list (Slack: a static select) instead of free text


@dataclass(frozen=True)
class Form:
    """A form for the person to fill in (Discord: a modal; Slack: a modal view). Submitting
    it comes back as a Press with `submit_id` as its button and the fields as values, or,
    for a command's form (`command_form_id`), as that Command with the fields as its args."""

    submit_id: str
    title: str
    fields: Sequence[FormField]


# A command's form is submitted as "atelier:command:<command name>".
_COMMAND_FORM = f"{PREFIX}:command:"


def command_form_id(name: str) -> str:
    return _COMMAND_FORM + name


def command_of_form(submit_id: str) -> str | None:
    """The command a submitted form runs, or None for a button's form."""
    return submit_id[len(_COMMAND_FORM) :] if submit_id.startswith(_COMMAND_FORM) else None


@dataclass(frozen=True)
class OutgoingFile:
    filename: str
    data: bytes


@dataclass(frozen=True)
class Reply:
    """The immediate answer to a command. `private`: only the invoker sees it."""

    text: str
    private: bool = False
    files: Sequence[OutgoingFile] = ()
    form: Form | None = None  # open this form for the person (answers to a Press only)


class CommandHandler(Protocol):
    def handle(self, command: Command) -> list[Reply]: ...

    def handle_reaction(self, reaction: Reaction) -> list[Reply]: ...

    def handle_press(self, press: Press) -> list[Reply]: ...

    def suggest(self, team: TeamRef, option: str, typed: str) -> list[str]:
        """Choices for an option as it is typed (Discord autocomplete)."""
        ...

    def command_form(self, team: TeamRef, name: str) -> Form | None:
        """A form for command `name` with pick lists for its options (Slack modals)."""
        ...


@dataclass(frozen=True)
class ParsedText:
    name: str
    args: dict[str, str]


TextParser = Callable[[str, str], ParsedText]
"""(slash command, its text) -> name and args, for platforms that send free text."""
