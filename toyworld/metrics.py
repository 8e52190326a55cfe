"""Exact, analytic scores of toy-world images: prompt adherence and one score per style.

Adherence reads the background from the image border (median colour, nearest background),
the shape colour from the non-background pixels (nearest palette colour or its stripe tint),
and the shape class from the filled silhouette (a triangle widens top to bottom; a square
overlaps a square of its own area more than a disc of it; a circle the reverse).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from toyworld.scenes import BACKGROUNDS, COLOURS, SIDE, Scene
from toyworld.styles import GRID_PERIOD, OUTLINE_WIDTH, STRIPE_PERIOD, erode, grid_line_colour, tint

# A pixel belongs to the shape when it is this far (RGB distance) from the background
# and from the background's grid-line colour.
_FOREGROUND_DISTANCE = 60.0
# Above these a style "shows"; ground truth sits far on either side (see tests).
STYLE_THRESHOLDS: dict[str, float] = {"stripes": 0.2, "outline": 0.5, "grid": 0.4}

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], np.float32)
_COLOUR_NAMES = list(COLOURS)
# Each palette colour and its stripe tint vote for the same name.
_PALETTE_RGB = np.array(
    [COLOURS[n] for n in _COLOUR_NAMES] + [tint(COLOURS[n]) for n in _COLOUR_NAMES], np.float32
)


@dataclass(frozen=True)
class Reading:
    """What the metrics see in one image."""

    shape: str | None
    colour: str | None
    background: str
    stripes: float
    outline: float
    grid: float

    def adherence(self, scene: Scene) -> dict[str, bool]:
        hits = {
            "shape": self.shape == scene.shape,
            "colour": self.colour == scene.colour,
            "background": self.background == scene.background,
        }
        hits["all"] = all(hits.values())
        return hits

    def shows(self, style: str) -> bool:
        return getattr(self, style) > STYLE_THRESHOLDS[style]


def _pixels(image: Image.Image) -> np.ndarray:
    """The image at the toy world's scale: its shorter side SIDE, its aspect ratio kept (a
    2:1 frame is read at 128x64, where stripes keep their period; squashing it to a square
    would halve the period across and hide them)."""
    image = image.convert("RGB")
    width, height = image.size
    if min(width, height) != SIDE:
        scale = SIDE / min(width, height)
        size = (max(SIDE, round(width * scale)), max(SIDE, round(height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, np.float32)


def _nearest(rgb: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.argmin(((rgb[..., None, :] - table) ** 2).sum(-1), axis=-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask`: a generated image's stray specks (a VAE
    artefact at the border, say) must not count as part of the shape."""
    labels = np.zeros(mask.shape, np.int32)
    sizes = [0]
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label = len(sizes)
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        sizes.append(size)
    if len(sizes) == 1:
        return mask
    return labels == int(np.argmax(sizes))


def _row_fill(mask: np.ndarray) -> np.ndarray:
    """Fill each row between its first and last set pixel (shapes are convex)."""
    filled = np.zeros_like(mask)
    for y in np.flatnonzero(mask.any(axis=1)):
        xs = np.flatnonzero(mask[y])
        filled[y, xs[0] : xs[-1] + 1] = True
    return filled


def _classify_shape(filled: np.ndarray) -> str | None:
    rows = filled.sum(axis=1)
    ys = np.flatnonzero(rows)
    if len(ys) < 4:
        return None
    top, bottom = ys[0], ys[-1]
    height = bottom - top + 1
    widths = rows[top : bottom + 1].astype(np.float32)
    quarter = max(1, height // 4)
    taper = widths[:quarter].mean() / max(widths[-quarter:].mean(), 1.0)
    if taper < 0.6:
        return "triangle"
    return "square" if _overlap(filled, _square) > _overlap(filled, _disc) else "circle"


def _square(dy: np.ndarray, dx: np.ndarray, area: float) -> np.ndarray:
    half = np.sqrt(area) / 2
    return (np.abs(dy) <= half) & (np.abs(dx) <= half)


def _disc(dy: np.ndarray, dx: np.ndarray, area: float) -> np.ndarray:
    return dy**2 + dx**2 <= area / np.pi


def _overlap(filled: np.ndarray, ideal: Callable[..., np.ndarray]) -> float:
    """Intersection over union of the silhouette and the ideal shape of its area centred on
    its centroid. An area measure, not an extent one: a generated square's wobbly edge or a
    bump on one side barely moves it, where it shrinks the fill of the bounding box (the
    earlier rule read such squares, plainly square to the eye, as circles)."""
    ys, xs = np.nonzero(filled)
    yy, xx = np.mgrid[0 : filled.shape[0], 0 : filled.shape[1]]
    shape = ideal(yy - ys.mean(), xx - xs.mean(), float(len(ys)))
    return float((shape & filled).sum() / (shape | filled).sum())


def _stripe_score(pixels: np.ndarray, region: np.ndarray) -> float:
    """Amplitude of the diagonal stripe frequency inside the shape, per pixel, over 255.

    Two times the Fourier coefficient at the stripe frequency of the mean-removed colour,
    searched over nearby periods; a 50% square wave of colour difference D scores 2D/(pi 255).
    """
    n = int(region.sum())
    if n < 16:
        return 0.0
    yy, xx = np.mgrid[0 : region.shape[0], 0 : region.shape[1]]
    inside = pixels[region]
    centred = inside - inside.mean(axis=0)
    best = 0.0
    for period in np.linspace(STRIPE_PERIOD - 1.5, STRIPE_PERIOD + 1.5, 7):
        phase = np.exp(-2j * np.pi * (xx + yy)[region] / period)
        amplitude = np.linalg.norm((centred * phase[:, None]).sum(axis=0))
        best = max(best, 2 * float(amplitude) / (n * 255))
    return best


def read(image: Image.Image) -> Reading:
    pixels = _pixels(image)
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    bg_index = int(_nearest(np.median(border, axis=0), _BG_RGB))
    bg_name = _BG_NAMES[bg_index]
    bg = _BG_RGB[bg_index]
    line = np.asarray(grid_line_colour(BACKGROUNDS[bg_name]), np.float32)
    far_bg = np.linalg.norm(pixels - bg, axis=-1) > _FOREGROUND_DISTANCE
    far_line = np.linalg.norm(pixels - line, axis=-1) > _FOREGROUND_DISTANCE * 0.8
    mask = largest_component(far_bg & far_line)
    filled = _row_fill(mask)
    shape = _classify_shape(filled)
    colour = None
    if mask.sum() >= 8:
        votes = _nearest(pixels[mask], _PALETTE_RGB) % len(_COLOUR_NAMES)
        colour = _COLOUR_NAMES[int(np.bincount(votes, minlength=len(_COLOUR_NAMES)).argmax())]
    # Stripes: inside the silhouette, away from its antialiased edge.
    core = erode(filled.astype(np.float32), 1) > 0.5
    stripes = _stripe_score(pixels, core)
    # Outline: how much of the silhouette's deep interior is not shape-coloured.
    interior = erode(filled.astype(np.float32), OUTLINE_WIDTH + 2) > 0.5
    outline = 1.0 - float(mask[interior].mean()) if interior.sum() >= 4 else 0.0
    # Grid: the share of background pixels nearer the grid-line colour than the background.
    ground = ~(erode((~filled).astype(np.float32), 2) < 0.5) & ~filled
    near_line = np.linalg.norm(pixels - line, axis=-1) < np.linalg.norm(pixels - bg, axis=-1)
    grid_share = float(near_line[ground].mean()) if ground.sum() else 0.0
    # Lines cover about 2 * width / period of the ground; scale so full lines read ~1.
    grid = grid_share / (2 * 2 / GRID_PERIOD)
    return Reading(shape, colour, bg_name, stripes, outline, grid)
