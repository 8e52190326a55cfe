"""The key of Atelier's JSON record in its PNGs, shared by the runner that writes it and the
bot that reads it (the bot never imports the runner)."""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

RECORD_KEY = "atelier"


def read_record(image: Image.Image) -> dict[str, Any] | None:
    """The JSON record in an opened PNG's text chunks (None when it has none)."""
    raw = (getattr(image, "text", None) or {}).get(RECORD_KEY)
    return json.loads(raw) if raw else None
