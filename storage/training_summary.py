"""How a trained model version is described in chat, from what the runner stores on it
(`ModelVersion.validation`): one wording for the runner's result message and the bot's
`/style info`. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping


def buckets_text(counts: Mapping[str, int]) -> str:
    """ "trained at 640x384 (3 images) and 512x512 (9)"; "" when nothing was recorded."""
    if not counts:
        return ""
    first, *rest = counts.items()
    parts = [f"{first[0]} ({first[1]} image{'s' if first[1] != 1 else ''})"]
    parts += [f"{label} ({n})" for label, n in rest]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return f"trained at {listed}"


# A lead reacts with a keycap digit on a training result to pick that row of its
# checkpoints.png: 1️⃣ the top row. Reactions arrive without the variation selector.
GRID_ROWS = 9


def keycap(row: int) -> str:
    """The keycap emoji for grid row `row` (1-9) as people see it: 1️⃣."""
    return f"{row}\ufe0f\u20e3"


def row_of(emoji: str) -> int | None:
    """The grid row a keycap reaction (variation selectors dropped) picks, else None."""
    if len(emoji) == 2 and emoji[1] == "\u20e3" and emoji[0] in "123456789":
        return int(emoji[0])
    return None
