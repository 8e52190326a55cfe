"""The buttons under every generated result: one table, read by the runner (which writes
them into the result's outbox row), the core (which acts on a press) and every adapter
(which only draws them).

A button's id carries everything needed to act on it, `atelier:ACTION:GENERATION[:IMAGE]`,
so a press on a message posted before a restart still works: nothing is kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PREFIX = "atelier"
# Vary's image-to-image strength (share of the picture repainted): Midjourney's two kinds.
VARY_STRENGTH = {"vary-subtle": 0.35, "vary-strong": 0.75}
# Upscale: the picture resized x2 then repainted lightly (the SD "hires fix" second pass).
UPSCALE_STRENGTH = 0.35
UPSCALE_FACTOR = 2
# Results with several images get Upscale and Vary buttons per image, for this many.
MAX_IMAGE_BUTTONS = 8
# The tightest platform's room for buttons (Discord: 5 rows of 5): a grid gets its strong
# Vary row per image only where it fits beside the others.
ROW_WIDTH = 5
MAX_ROWS = 5


@dataclass(frozen=True)
class Action:
    name: str
    label: str
    help: str
    per_image: bool = False  # acts on one image of the result
    danger: bool = False


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("reroll", "🔁 Reroll", "the same request with a new seed"),
        Action(
            "vary-subtle",
            "Vary (subtle)",
            "image-to-image from the result, close to it",
            per_image=True,
        ),
        Action(
            "vary-strong", "Vary (strong)", "image-to-image from the result, freer", per_image=True
        ),
        Action(
            "upscale", "Upscale ×2", "a second pass at twice the size, same styles", per_image=True
        ),
        Action("edit", "✏️ Edit", "change the prompt and run it again"),
        Action(
            "delete", "🗑 Delete", "remove the result (its requester or an art lead)", danger=True
        ),
    )
}
# What people type at the console (`press N vary`) for each action.
ACTION_WORDS = {
    "reroll": "reroll",
    "vary": "vary-subtle",
    "subtle": "vary-subtle",
    "strong": "vary-strong",
    "vary-subtle": "vary-subtle",
    "vary-strong": "vary-strong",
    "upscale": "upscale",
    "edit": "edit",
    "delete": "delete",
}


@dataclass(frozen=True)
class ButtonId:
    action: str
    generation_id: int
    image: int = 1  # 1-based, for per-image actions

    def encode(self) -> str:
        tail = f":{self.image}" if ACTIONS[self.action].per_image else ""
        return f"{PREFIX}:{self.action}:{self.generation_id}{tail}"


def parse_button_id(raw: str) -> ButtonId | None:
    """The button an id names, or None for ids that are not Atelier's (or malformed)."""
    parts = raw.split(":")
    if len(parts) not in (3, 4) or parts[0] != PREFIX or parts[1] not in ACTIONS:
        return None
    if not all(p.isdigit() for p in parts[2:]):
        return None
    image = int(parts[3]) if len(parts) == 4 else 1
    if image < 1:
        return None
    return ButtonId(parts[1], int(parts[2]), image)


def result_buttons(generation_id: int, images: int) -> list[list[dict[str, Any]]]:
    """Rows of buttons for a result with `images` pictures, as outbox `extra["buttons"]`:
    each button {"id", "label", "danger"}. Adapters split rows to their own limits."""

    def button(action: str, image: int = 1, label: str | None = None) -> dict[str, Any]:
        spec = ACTIONS[action]
        return {
            "id": ButtonId(action, generation_id, image).encode(),
            "label": label or spec.label,
            "danger": spec.danger,
        }

    if images <= 1:
        return [
            [button("reroll"), button("vary-subtle"), button("vary-strong"), button("upscale")],
            [button("edit"), button("delete")],
        ]
    shown = range(1, min(images, MAX_IMAGE_BUTTONS) + 1)
    rows = [
        [button("reroll"), button("edit"), button("delete")],
        [button("upscale", i, f"U{i}") for i in shown],
        [button("vary-subtle", i, f"V{i}") for i in shown],
        [button("vary-strong", i, f"V{i} strong") for i in shown],
    ]
    # Rows in order of use, as many as fit when each is split ROW_WIDTH wide.
    kept: list[list[dict[str, Any]]] = []
    for row in rows:
        if sum(-(-len(r) // ROW_WIDTH) for r in [*kept, row]) > MAX_ROWS:
            break
        kept.append(row)
    return kept


def buttons_help() -> str:
    """One line per button, for `/style help` and the README (tests check both)."""
    return "\n".join(f"{a.label}: {a.help}" for a in ACTIONS.values())
