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
