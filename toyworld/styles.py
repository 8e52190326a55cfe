"""Styles of a scene that a LoRA can learn; each keeps the scene's shape, colour and background.

- stripes: the shape filled with diagonal stripes (its colour and a light tint of it),
- outline: the shape drawn as its outline only,
- grid: thin grid lines over the background (the shape untouched).
stripes and grid touch different pixels, so both can show in one image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from toyworld.scenes import BACKGROUNDS, COLOURS, SIDE, Scene, compose, flat, shape_mask

# Stripe period in pixels at 64 px (scaled with the side); 45 degree diagonal. Two latent
# cells wide: a factor-8 VAE could not keep 8 px stripes (one cell per period).
STRIPE_PERIOD = 16
GRID_PERIOD = 16
OUTLINE_WIDTH = 3
TINT = 0.55  # share of white mixed into the stripes' light colour


def tint(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(round(c + TINT * (255 - c)) for c in colour)  # type: ignore[return-value]


def grid_line_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    # Darker lines on light grounds, lighter on dark ones.
    if sum(background) / 3 > 100:
        return tuple(int(c * 0.62) for c in background)  # type: ignore[return-value]
    return tuple(c + 80 for c in background)  # type: ignore[return-value]


def _grid(side: int) -> np.ndarray:
    period = GRID_PERIOD * side / SIDE
    idx = np.arange(side)
    # Lines sit mid-period, so the border (where the background is read) stays clear.
    lines = ((idx + period / 2) % period) < max(1.0, 2 * side / SIDE)
    return (lines[None, :] | lines[:, None]).astype(np.float32)


def stripe_pattern(side: int) -> np.ndarray:
    period = STRIPE_PERIOD * side / SIDE
    yy, xx = np.mgrid[0:side, 0:side]
    return (((xx + yy) % period) < period / 2).astype(np.float32)


def _background(scene: Scene, side: int, grid: bool) -> np.ndarray:
    bg = flat(BACKGROUNDS[scene.background], side)
    if grid:
        g = _grid(side)[..., None]
        bg = bg * (1 - g) + flat(grid_line_colour(BACKGROUNDS[scene.background]), side) * g
    return bg


def draw(scene: Scene, styles: tuple[str, ...] = (), side: int = SIDE) -> Image.Image:
    """The scene in any combination of styles (() draws it plain)."""
    unknown = set(styles) - set(STYLES)
    if unknown:
        raise ValueError(f"unknown style(s) {sorted(unknown)}; use {', '.join(STYLES)}")
    cover = shape_mask(scene, side)
    colour = COLOURS[scene.colour]
    fill = flat(colour, side)
    if "stripes" in styles:
        light = stripe_pattern(side)[..., None]
        fill = fill * (1 - light) + flat(tint(colour), side) * light
    if "outline" in styles:
        # Keep only a stroke: the shape minus its erosion by the stroke width.
        width = max(1, round(OUTLINE_WIDTH * side / SIDE))
        cover = np.clip(cover - erode(cover, width), 0.0, 1.0)
    return compose(_background(scene, side, "grid" in styles), fill, cover)


def erode(cover: np.ndarray, radius: int) -> np.ndarray:
    """Grey-scale erosion by a disc of `radius` pixels (minimum over the disc)."""
    padded = np.pad(cover, radius, mode="constant")
    out = cover.copy()
    h, w = cover.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                window = padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
                out = np.minimum(out, window)
    return out


def stripes(scene: Scene, side: int = SIDE) -> Image.Image:
    return draw(scene, ("stripes",), side)


def outline(scene: Scene, side: int = SIDE) -> Image.Image:
    return draw(scene, ("outline",), side)


def grid(scene: Scene, side: int = SIDE) -> Image.Image:
    return draw(scene, ("grid",), side)


STYLES: dict[str, Callable[[Scene, int], Image.Image]] = {
    "stripes": stripes,
    "outline": outline,
    "grid": grid,
}


def as_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels.astype(np.uint8), "RGB")
