"""What every captioner kind shares: the caption record, the error, image opening and the
interface a kind's module implements."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from PIL import Image

ImageInput = Image.Image | bytes | str | Path


class CaptionError(ValueError):
    """The captioning model cannot be used; str() says what to fix."""


@dataclass(frozen=True)
class Caption:
    text: str  # empty when `error` is set
    source: Literal["auto"] = "auto"
    model: str = ""
    error: str | None = None  # why this one image got no caption (e.g. a corrupt file)


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str | None  # the kind's own default when None
    max_new_tokens: int
    num_beams: int


class CaptionModel(Protocol):
    """A loaded captioning model of one kind: readable RGB images in, one text each out."""

    def generate(self, images: list[Image.Image], options: GenerateOptions) -> list[str]: ...


def open_rgb(item: ImageInput) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    data = item if isinstance(item, bytes) else Path(item).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def tidy(text: str, prompt: str | None) -> str:
    """One line of text, without the prompt a model may echo at its start."""
    text = " ".join(text.split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt) :].strip()
    return text
