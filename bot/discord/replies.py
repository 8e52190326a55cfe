"""The core's immediate Replies -> Discord messages (interaction followups or plain replies)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import discord

from bot.commands import Form, OutgoingFile, Reply
from bot.discord.render import MAX_FILES, split_text, to_files

log = logging.getLogger(__name__)

DONE_TEXT = "Done."


@dataclass(frozen=True)
class Piece:
    """One Discord message's worth of a Reply (long texts become several pieces)."""

    text: str
    files: Sequence[OutgoingFile]
    private: bool


def pieces(replies: Sequence[Reply]) -> list[Piece]:
    out: list[Piece] = []
    for reply in replies:
        texts = split_text(reply.text)
        files = list(reply.files)
        for i, text in enumerate(texts):
            # Files ride on the first piece; beyond Discord's 10 they go in extra messages.
            chunk = files[:MAX_FILES] if i == 0 else []
            out.append(Piece(text, chunk, reply.private))
        for start in range(MAX_FILES, len(files), MAX_FILES):
            out.append(Piece("", files[start : start + MAX_FILES], reply.private))
    return [p for p in out if p.text or p.files]


async def answer_interaction(
    interaction: discord.Interaction, replies: Sequence[Reply], *, deferred_private: bool
) -> None:
    """Replace the "thinking…" message and send the rest as followups.

    Discord fixes the first answer's visibility at defer time, so the first piece whose
    visibility matches the defer takes the original message; the others are followups,
    which may each be ephemeral or not.
    """
    todo = pieces(replies)
    first = next((i for i, p in enumerate(todo) if p.private == deferred_private), None)
    if first is not None:
        piece = todo.pop(first)
        await interaction.edit_original_response(
            content=piece.text or None, attachments=to_files(piece.files)
        )
    elif deferred_private or not todo:
        # Only public answers after a private defer (or none at all): close the spinner.
        await interaction.edit_original_response(content=DONE_TEXT)
    else:
        # Only private answers after a public defer: a public message must not show them.
        await interaction.delete_original_response()
    for piece in todo:
        await interaction.followup.send(
            piece.text or discord.utils.MISSING,
            files=to_files(piece.files),
            ephemeral=piece.private,
        )


async def answer_message(message: discord.Message, replies: Sequence[Reply]) -> None:
    """Reply in the message's channel (a thread has no private messages: all are visible)."""
    for piece in pieces(replies):
        await message.reply(
            piece.text or None, files=to_files(piece.files), mention_author=piece.private
        )


async def answer_reaction(
    channel: discord.abc.Messageable,
    open_dm: Callable[[], Awaitable[discord.abc.Messageable]],
    replies: Sequence[Reply],
) -> None:
    """Public answers go to the channel; private ones by direct message, if the user allows.

    A reaction has no ephemeral channel of its own, and a refusal ("only art leads can
    approve") must not be announced to the whole channel.
    """
    for piece in pieces(replies):
        try:
            target = await open_dm() if piece.private else channel
            await target.send(piece.text or None, files=to_files(piece.files))
        except discord.HTTPException as exc:
            if not piece.private:
                raise
            log.info("could not send a private answer by DM (%s %s)", exc.status, exc.text)


async def answer_press(interaction: discord.Interaction, replies: Sequence[Reply]) -> None:
    """After a silent defer of a button press: each answer as a followup, ephemeral where
    private (a refusal is for the presser alone; a queued note is for the channel)."""
    for piece in pieces(replies):
        await interaction.followup.send(
            piece.text or discord.utils.MISSING,
            files=to_files(piece.files),
            ephemeral=piece.private,
        )


def form_modal(form: Form) -> discord.ui.Modal:
    """A Form as a Discord modal; the submit comes back as a modal interaction (type 5)
    with the form's id, handled like any press (the modal is not kept in memory)."""
    modal = discord.ui.Modal(title=form.title[:45], custom_id=form.submit_id[:100], timeout=None)
    for field in form.fields[:5]:
        modal.add_item(
            discord.ui.TextInput(
                label=field.label[:45],
                custom_id=field.name,
                default=field.value[:4000] or None,
                style=discord.TextStyle.paragraph if field.multiline else discord.TextStyle.short,
                required=field.required,
                max_length=min(field.max_length, 4000),
            )
        )
    modal.stop()
    return modal
