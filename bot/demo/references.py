"""The demo's reference images: toy-world scenes drawn in the "stripes" style (numpy and
Pillow only, no runner, no torch), each with the caption of its plain scene.

`toy-sd15` draws plain scenes; a LoRA trained on these learns to fill shapes with diagonal
stripes when the trigger word is in the prompt. Drawn at 512 px so they pass Atelier's
default intake rules (ATELIER_MIN_IMAGE_SIDE) as a real upload would; training resizes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from toyworld.scenes import Scene, all_prompts, random_scenes
from toyworld.styles import draw

COUNT = 12
SIDE = 512
STYLE = "stripes"
SEED = 0


@dataclass(frozen=True)
class Reference:
    name: str
    scene: Scene
    image: Image.Image

    @property
    def caption(self) -> str:
        return self.scene.caption


def reference_scenes(count: int = COUNT, seed: int = SEED) -> list[Scene]:
    """Scenes with every shape, colour and background among them (cycled), at random sizes
    and places; the same seed always gives the same scenes."""
    cycle = all_prompts()
    placed = random_scenes(seed, count)
    picks = [cycle[(i * 7) % len(cycle)] for i in range(count)]
    return [
        Scene(p.shape, p.colour, p.background, r.cx, r.cy, r.extent)
        for p, r in zip(picks, placed, strict=True)
    ]


def held_out_prompts(count: int, seed: int = SEED) -> list[Scene]:
    """Prompts (shape, colour, background) that no reference shows."""
    seen = {(s.shape, s.colour, s.background) for s in reference_scenes(COUNT, seed)}
    unseen = [p for p in all_prompts() if (p.shape, p.colour, p.background) not in seen]
    step = max(1, len(unseen) // count)
    return unseen[::step][:count]


def references(count: int = COUNT, side: int = SIDE, seed: int = SEED) -> list[Reference]:
    out = []
    for i, scene in enumerate(reference_scenes(count, seed)):
        name = f"{STYLE}-{i + 1:02d}-{scene.colour}-{scene.shape}-on-{scene.background}.png"
        out.append(Reference(name, scene, draw(scene, (STYLE,), side)))
    return out


def write_references(folder: Path, count: int = COUNT) -> list[Reference]:
    """Write the images as PNG files into `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    refs = references(count)
    for ref in refs:
        ref.image.save(folder / ref.name, format="PNG")
    return refs
