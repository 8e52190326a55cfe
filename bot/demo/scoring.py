"""Scoring the demo's images with the toy world's metrics (torch-free).

A compare PNG carries both halves; its `atelier` record says where each panel is, so the
base and styled images are cut out by the record, not by guessing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from storage.png_record import read_record
from toyworld.metrics import read
from toyworld.scenes import Scene


def panels(png: bytes) -> dict[str, Image.Image]:
    """{"base": image, "style": image} of a compare PNG, {"style"|"base": image} otherwise."""
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        record = read_record(image) or {}
        rgb = image.convert("RGB")
    if record.get("variant") != "compare":
        return {str(record.get("variant", "style")): rgb}
    out = {}
    for panel in record["panels"]:
        out[str(panel["variant"])] = rgb.crop(tuple(panel["box"]))
    return out


@dataclass
class Tally:
    """Shares of images where each check held."""

    adherence: list[bool]
    colour: list[bool]
    style: list[bool]
    scores: list[float]

    @classmethod
    def empty(cls) -> Tally:
        return cls([], [], [], [])

    def add(self, image: Image.Image, scene: Scene, style: str) -> None:
        reading = read(image)
        hits = reading.adherence(scene)
        self.adherence.append(hits["all"])
        self.colour.append(hits["colour"])
        self.style.append(reading.shows(style))
        self.scores.append(float(getattr(reading, style)))

    @staticmethod
    def share(values: list[bool]) -> float:
        return float(np.mean(values)) if values else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "images": len(self.adherence),
            "adherence": self.share(self.adherence),
            "colour": self.share(self.colour),
            "style_shows": self.share(self.style),
            "style_score": float(np.mean(self.scores)) if self.scores else 0.0,
        }
