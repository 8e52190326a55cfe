"""The demo's 12 reference images, drawn here with numpy and Pillow (no runner, no torch).

A small learnable "style": diagonal two-colour stripes with a white disc. Every image shares
the structure (angle, period, disc) while colours and positions vary, so a LoRA has
something consistent to learn and held-out images test it. Drawn at 512 px so they pass
Atelier's default intake rules (ATELIER_MIN_IMAGE_SIDE) like a real upload would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COUNT = 12
SIDE = 512

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 70),
    "yellow": (230, 200, 40),
    "purple": (140, 50, 180),
    "orange": (240, 130, 30),
}


def reference_images(
    count: int = COUNT, side: int = SIDE, seed: int = 0
) -> list[tuple[str, Image.Image]]:
    """(file name, image) pairs; the same seed always gives the same pixels."""
    rng = np.random.default_rng(seed)
    names = list(_COLOURS)
    yy, xx = np.mgrid[0:side, 0:side]
    period = side / 4
    out: list[tuple[str, Image.Image]] = []
    for i in range(count):
        fg = names[i % len(names)]
        bg = names[(i * 5 + 1) % len(names)]
        if fg == bg:
            bg = names[(names.index(fg) + 1) % len(names)]
        phase = rng.uniform(0, period)
        stripes = ((xx + yy + phase) % period) < period / 2
        pixels = np.where(stripes[..., None], _COLOURS[fg], _COLOURS[bg]).astype(np.float32)
        cx, cy = rng.uniform(side * 0.3, side * 0.7, 2)
        pixels[(xx - cx) ** 2 + (yy - cy) ** 2 < (side * 0.18) ** 2] = (245, 245, 245)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        out.append((f"stripes-{i + 1:02d}-{fg}-{bg}.png", image))
    return out


def write_references(folder: Path, count: int = COUNT) -> list[Path]:
    """Write the images as PNG files into `folder` (made if missing); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, image in reference_images(count):
        path = folder / name
        image.save(path, format="PNG")
        paths.append(path)
    return paths
