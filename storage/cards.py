"""A reference image's card: one chat message per image, posted at review, edited in place
when a lead drops the image or the captioning job captions it. Bot and runner both write
cards, so their key and text live here."""

from __future__ import annotations


def card_key(image_id: int) -> str:
    return f"card:image:{image_id}"


NO_CAPTION = "(no caption)"
AUTO_MARK = " _(auto caption)_"


def card_text(
    style_name: str,
    position: int,
    caption: str | None,
    *,
    auto: bool,
    original_name: str,
    width: int,
    height: int,
    note: str = "",
) -> str:
    """`ink #3: a red circle (auto caption) (ref3.png, 96×96)`; auto captions are marked."""
    shown = caption or NO_CAPTION
    mark = AUTO_MARK if caption and auto else ""
    text = f"{style_name} #{position}: {shown}{mark} ({original_name}, {width}×{height})"
    return f"{text}\n{note}" if note else text
