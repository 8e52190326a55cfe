"""Scenes ("a red circle on a white background") and how they are drawn, deterministic by seed.

A scene is a shape of one colour on a flat background; styles (toyworld.styles) are
functions of a scene, so the same scene can be drawn plain or styled.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated, far apart in RGB, and far from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (150, 40, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "black": (22, 22, 22),
    "grey": (128, 128, 128),
}
SIDE = 64
# Shape extent as a share of the side, and the margin kept free at the image border
# (the background metric reads the border).
MIN_EXTENT, MAX_EXTENT = 0.38, 0.62
BORDER_MARGIN = 0.08


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    # Centre and extent (diameter / side / base) as shares of the image side.
    cx: float = 0.5
    cy: float = 0.5
    extent: float = 0.5

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_prompts() -> list[Scene]:
    """Every (shape, colour, background) once, centred: 3 x 5 x 3 = 45 prompts."""
    return [Scene(s, c, b) for s, c, b in product(SHAPES, COLOURS, BACKGROUNDS)]


def random_scene(rng: np.random.Generator) -> Scene:
    extent = float(rng.uniform(MIN_EXTENT, MAX_EXTENT))
    lo = BORDER_MARGIN + extent / 2
    cx, cy = (float(v) for v in rng.uniform(lo, 1 - lo, 2))
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        cx=cx,
        cy=cy,
        extent=extent,
    )


def random_scenes(seed: int, count: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]


def shape_mask(scene: Scene, side: int = SIDE, supersample: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape (antialiased by supersampling)."""
    n = side * supersample
    coords = (np.arange(n) + 0.5) / n
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    half = scene.extent / 2
    dx, dy = xx - scene.cx, yy - scene.cy
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif scene.shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif scene.shape == "triangle":
        # Pointing up: apex at the top centre, base at the bottom, as wide as it is tall.
        t = (dy + half) / (2 * half)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; use one of {', '.join(SHAPES)}")
    cover = inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
    return cover.astype(np.float32)


def compose(background: np.ndarray, fill: np.ndarray, cover: np.ndarray) -> Image.Image:
    """Blend a fill (HxWx3) over a background (HxWx3) by coverage (HxW)."""
    pixels = background * (1 - cover[..., None]) + fill * cover[..., None]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def flat(colour: tuple[int, int, int], side: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.float32), (side, side, 3)).copy()


def render(scene: Scene, side: int = SIDE) -> Image.Image:
    """The scene drawn plain: a flat shape on a flat background."""
    cover = shape_mask(scene, side)
    return compose(
        flat(BACKGROUNDS[scene.background], side), flat(COLOURS[scene.colour], side), cover
    )
