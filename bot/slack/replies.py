"""Show the core's immediate Replies in Slack."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from slack_bolt.context.respond import Respond
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot.commands import Form, FormField, OutgoingFile, Reply
from bot.slack.text import to_mrkdwn

log = logging.getLogger(__name__)


class ReplyPoster:
    """Slash commands answer through their response_url (`respond`): ephemeral for private
    replies, in_channel otherwise. Events (thread uploads, reactions) have no response_url,
    so their replies use chat.postEphemeral / chat.postMessage in the same thread."""

    def __init__(self, client: WebClient) -> None:
        self._client = client

    def answer_command(self, respond: Respond, channel: str, replies: Sequence[Reply]) -> None:
        for reply in replies:
            try:
                if reply.files and not reply.private:
                    self._upload(channel, None, reply.text, reply.files)
                    continue
                response_type = "ephemeral" if reply.private else "in_channel"
                respond(text=_text(reply), response_type=response_type)
            except Exception:
                log.exception("Could not show a reply in Slack channel %s.", channel)

    def answer_event(
        self, channel: str, user: str, thread: str | None, replies: Sequence[Reply]
    ) -> None:
        for reply in replies:
            try:
                if reply.private:
                    self._client.chat_postEphemeral(
                        channel=channel, user=user, text=_text(reply), thread_ts=thread
                    )
                elif reply.files:
                    self._upload(channel, thread, reply.text, reply.files)
                else:
                    self._client.chat_postMessage(
                        channel=channel, text=to_mrkdwn(reply.text), thread_ts=thread
                    )
            except SlackApiError as exc:
                log.warning(
                    "Could not show a reply in Slack channel %s: %s",
                    channel,
                    exc.response.get("error"),
                )

    def open_form(self, trigger_id: str, form: Form, channel: str, thread: str | None) -> None:
        """The form as a modal view; where it was asked for rides along in private_metadata
        (a submitted view names no channel)."""
        try:
            view = form_view(form, channel, thread)
            self._client.views_open(trigger_id=trigger_id, view=view)
        except SlackApiError as exc:
            log.warning("Could not open a Slack modal: %s", exc.response.get("error"))

    def _upload(
        self, channel: str, thread: str | None, text: str, files: Sequence[OutgoingFile]
    ) -> None:
        self._client.files_upload_v2(
            channel=channel,
            thread_ts=thread,
            initial_comment=to_mrkdwn(text),
            file_uploads=[{"file": f.data, "filename": f.filename} for f in files],
        )


def _text(reply: Reply) -> str:
    text = reply.text
    if reply.private and reply.files:
        # Slack cannot attach files to a message only one person sees.
        names = ", ".join(f.filename for f in reply.files)
        text += f"\n(Not shown here: {names}; Slack has no private attachments.)"
    return to_mrkdwn(text)


# Slack's limits: 100 options per static select, 75 characters per option text.
_MAX_OPTIONS = 100


def form_view(form: Form, channel: str, thread: str | None) -> dict[str, object]:
    """A Form as a Slack modal view; its submit comes back as view_submission. Fields with
    choices become static selects."""
    blocks = []
    for field in form.fields:
        element = _select(field) if field.choices else _text_input(field)
        blocks.append(
            {
                "type": "input",
                "block_id": field.name,
                "optional": not field.required,
                "label": {"type": "plain_text", "text": field.label[:2000]},
                "element": element,
            }
        )
    return {
        "type": "modal",
        "callback_id": form.submit_id[:255],
        "title": {"type": "plain_text", "text": form.title[:24]},
        "submit": {"type": "plain_text", "text": "Run"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "private_metadata": json.dumps({"channel": channel, "thread": thread}),
        "blocks": blocks,
    }


def _text_input(field: FormField) -> dict[str, object]:
    element: dict[str, object] = {
        "type": "plain_text_input",
        "action_id": field.name,
        "multiline": field.multiline,
        "max_length": min(field.max_length, 3000),
    }
    if field.value:
        element["initial_value"] = field.value[:3000]
    return element


def _select(field: FormField) -> dict[str, object]:
    options = [
        {"text": {"type": "plain_text", "text": choice[:75]}, "value": choice[:150]}
        for choice in field.choices[:_MAX_OPTIONS]
    ]
    element: dict[str, object] = {
        "type": "static_select",
        "action_id": field.name,
        "placeholder": {"type": "plain_text", "text": f"Pick a {field.name}"},
        "options": options,
    }
    chosen = next((o for o in options if o["value"] == field.value), None)
    if chosen is not None:
        element["initial_option"] = chosen
    return element
