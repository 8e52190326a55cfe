"""The core writes Markdown (`**bold**`, `[label](url)`); Slack reads its own mrkdwn."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_BOLD = re.compile(r"\*\*(.+?)\*\*", re.DOTALL)
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^\s)]+)\)")


def to_mrkdwn(text: str) -> str:
    """Escape &, <, > (Slack's control characters: a prompt like `<lora:x>` must show as
    typed), then turn Markdown bold and links into Slack's `*bold*` and `<url|label>`."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    escaped = _BOLD.sub(r"*\1*", escaped)
    return _LINK.sub(lambda m: f"<{m.group(2)}|{m.group(1)}>", escaped)


# Slack truncates message text past 40,000 characters; stop a little short.
MAX_TEXT = 39_000


def _seed_text(seed: Any) -> str | None:
    if seed is None:
        return None
    if isinstance(seed, list | tuple):
        return ", ".join(str(s) for s in seed) or None
    return str(seed)


def parameters_line(extra: Mapping[str, Any]) -> str:
    """`Seed: 42 · steps: 25 · cfg: 7.0` from an outbox row's extra (the same keys the
    Discord adapter reads: `seed`, an int or a list, and a `parameters` mapping)."""
    parts: list[str] = []
    if (seed := _seed_text(extra.get("seed"))) is not None:
        parts.append(f"Seed: {seed}")
    raw = extra.get("parameters")
    if isinstance(raw, Mapping):
        parts += [f"{k}: {v}" for k, v in raw.items() if v is not None and str(v) != ""]
    return " · ".join(parts)


def message_text(text: str, extra: Mapping[str, Any]) -> str:
    """The text Slack shows for an outbox row: Slack may strip PNG metadata, so the seed and
    parameters go in the text too (unless the writer already put the seed there)."""
    line = parameters_line(extra)
    seed = _seed_text(extra.get("seed"))
    if line and not (seed is not None and f"Seed: {seed}" in text):
        text = f"{text}\n{line}" if text else line
    text = to_mrkdwn(text)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def button_blocks(text: str, extra: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """Block Kit for a message with buttons (storage.result_buttons rows in
    `extra["buttons"]`): the text as a section, one actions block per row. None without
    buttons; an empty list clears old buttons (a deleted result's edit)."""
    rows = extra.get("buttons")
    if not isinstance(rows, list) or not rows:
        return [] if extra.get("deleted") else None
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000] or " "}}
    ]
    for row in rows:
        elements = []
        for spec in row[:25]:
            button: dict[str, Any] = {
                "type": "button",
                "text": {"type": "plain_text", "text": str(spec["label"])[:75], "emoji": True},
                "action_id": str(spec["id"])[:255],
                "value": str(spec["id"])[:2000],
            }
            if spec.get("danger"):
                button["style"] = "danger"
            elements.append(button)
        blocks.append({"type": "actions", "elements": elements})
    return blocks
