"""The review contact sheet: numbered thumbnails with their captions, drawn with Pillow."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from bot.core.previews import THUMB_SIDE

CELL_W = THUMB_SIDE + 24
CAPTION_LINES = 3
LINE_H = 16
CELL_H = THUMB_SIDE + 16 + CAPTION_LINES * LINE_H + 8
HEADER_H = 44
COLUMNS = 5
BACKGROUND = (250, 250, 247)
INK = (30, 30, 30)
MUTED = (120, 120, 120)
DROPPED = (200, 30, 30)


@dataclass(frozen=True)
class SheetEntry:
    number: int
    thumbnail: Image.Image
    caption: str
    dropped: bool = False


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ValueError):  # Pillow built without FreeType
        return ImageFont.load_default()


def render_contact_sheet(title: str, entries: Sequence[SheetEntry]) -> bytes:
    """A PNG grid of the entries under a title line."""
    columns = max(1, min(COLUMNS, len(entries)))
    rows = max(1, -(-len(entries) // columns))
    sheet = Image.new("RGB", (columns * CELL_W, HEADER_H + rows * CELL_H), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((12, 12), title, fill=INK, font=_font(18))
    for index, entry in enumerate(entries):
        x = (index % columns) * CELL_W + 12
        y = HEADER_H + (index // columns) * CELL_H
        _draw_cell(sheet, draw, x, y, entry)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", compress_level=3)
    return buf.getvalue()


def _draw_cell(
    sheet: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int, e: SheetEntry
) -> None:
    thumb = e.thumbnail
    ox = x + (THUMB_SIDE - thumb.width) // 2
    oy = y + (THUMB_SIDE - thumb.height) // 2
    if e.dropped:
        thumb = Image.blend(thumb, Image.new("RGB", thumb.size, BACKGROUND), 0.65)
    sheet.paste(thumb, (ox, oy))
    if e.dropped:
        draw.line((ox, oy, ox + thumb.width, oy + thumb.height), fill=DROPPED, width=4)
        draw.line((ox, oy + thumb.height, ox + thumb.width, oy), fill=DROPPED, width=4)
    label = f"#{e.number}"
    font = _font(16)
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    draw.rectangle((x, y, x + right - left + 10, y + bottom - top + 8), fill=INK)
    draw.text((x + 5 - left, y + 4 - top), label, fill=(255, 255, 255), font=font)
    caption = "(dropped) " + e.caption if e.dropped else e.caption or "(no caption)"
    lines = textwrap.wrap(caption, width=26, max_lines=CAPTION_LINES, placeholder=" …")
    colour = MUTED if e.dropped or not e.caption else INK
    for n, line in enumerate(lines):
        draw.text((x, y + THUMB_SIDE + 8 + n * LINE_H), line, fill=colour, font=_font(13))
