"""Neutral message content -> Discord message parts, within Discord's size limits.

Outbox rows for results carry the generation's parameters in `extra`; they are shown in an
embed and repeated in the text, because Discord strips PNG metadata from images:
  extra["seed"]        int, or a list of ints for a batch
  extra["parameters"]  {name: value} such as steps, cfg, size, sampler, model, loras
  extra["prompt"], extra["negative_prompt"], extra["title"]  optional strings
  extra["buttons"]     rows of {"id", "label", "danger"} (storage.result_buttons)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import discord

from bot.commands import OutgoingFile

MAX_CONTENT = 2000
MAX_FILES = 10
MAX_EMBED_TITLE = 256
MAX_EMBED_DESCRIPTION = 4096
MAX_FIELD_VALUE = 1024
MAX_FIELDS = 25
MAX_ROW_BUTTONS = 5
MAX_ROWS = 5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
EMBED_COLOUR = 0x8E6CEF


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def split_text(text: str, limit: int = MAX_CONTENT) -> list[str]:
    """Split on line breaks into pieces Discord accepts; a single long line is cut."""
    pieces: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:limit])
            line = line[limit:]
        if len(current) + len(line) > limit:
            pieces.append(current)
            current = ""
        current += line
    if current or not pieces:
        pieces.append(current)
    return [p.rstrip("\n") for p in pieces]


def to_files(files: Sequence[OutgoingFile]) -> list[discord.File]:
    """Fresh discord.File objects (each can be sent once), at most Discord's 10."""
    return [discord.File(io.BytesIO(f.data), filename=f.filename) for f in files[:MAX_FILES]]


def _seed_text(seed: Any) -> str | None:
    if seed is None:
        return None
    if isinstance(seed, list | tuple):
        return ", ".join(str(s) for s in seed) or None
    return str(seed)


def _parameters(extra: Mapping[str, Any]) -> dict[str, str]:
    raw = extra.get("parameters")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items() if v is not None and str(v) != ""}


def parameters_line(extra: Mapping[str, Any]) -> str:
    """A line like `Seed: 42 · steps: 25 · cfg: 7.0`; empty when there are no parameters."""
    parts: list[str] = []
    if (seed := _seed_text(extra.get("seed"))) is not None:
        parts.append(f"Seed: {seed}")
    parts += [f"{name}: {value}" for name, value in _parameters(extra).items()]
    return " · ".join(parts)


def content_with_parameters(text: str, extra: Mapping[str, Any]) -> str:
    """The text, plus the seed and parameters unless the writer already put the seed in."""
    line = parameters_line(extra)
    seed = _seed_text(extra.get("seed"))
    if not line or (seed is not None and f"Seed: {seed}" in text):
        return clip(text, MAX_CONTENT)
    joined = f"{text}\n{line}" if text else line
    return clip(joined, MAX_CONTENT)


def result_embed(extra: Mapping[str, Any], files: Sequence[OutgoingFile]) -> discord.Embed | None:
    """An embed with the seed and parameters, or None for messages without any."""
    seed = _seed_text(extra.get("seed"))
    parameters = _parameters(extra)
    if seed is None and not parameters:
        return None
    title = str(extra.get("title") or "Generation")
    embed = discord.Embed(title=clip(title, MAX_EMBED_TITLE), colour=EMBED_COLOUR)
    if prompt := extra.get("prompt"):
        embed.description = clip(str(prompt), MAX_EMBED_DESCRIPTION)
    fields: list[tuple[str, str]] = []
    if seed is not None:
        fields.append(("Seed", seed))
    if negative := extra.get("negative_prompt"):
        fields.append(("Negative prompt", str(negative)))
    fields += list(parameters.items())
    for name, value in fields[:MAX_FIELDS]:
        embed.add_field(name=name, value=clip(value, MAX_FIELD_VALUE), inline=len(value) <= 40)
    images = [f for f in files[:MAX_FILES] if f.filename.lower().endswith(IMAGE_SUFFIXES)]
    if images:
        embed.set_image(url=f"attachment://{images[0].filename}")
    return embed


def result_view(extra: Mapping[str, Any]) -> discord.ui.View | None:
    """The message's buttons as components (None: none, which also clears old ones).

    The view is stopped before it is sent, so discord.py keeps no copy in memory: presses
    arrive as interactions the client routes by custom id, before and after a restart.
    """
    rows = extra.get("buttons")
    if not isinstance(rows, list) or not rows:
        return None
    view = discord.ui.View(timeout=None)
    row_index = 0
    for row in rows:
        for start in range(0, len(row), MAX_ROW_BUTTONS):
            if row_index >= MAX_ROWS:
                break
            for spec in row[start : start + MAX_ROW_BUTTONS]:
                style = (
                    discord.ButtonStyle.danger
                    if spec.get("danger")
                    else discord.ButtonStyle.secondary
                )
                view.add_item(
                    discord.ui.Button(
                        label=str(spec["label"])[:80],
                        custom_id=str(spec["id"])[:100],
                        style=style,
                        row=row_index,
                    )
                )
            row_index += 1
    view.stop()
    return view
