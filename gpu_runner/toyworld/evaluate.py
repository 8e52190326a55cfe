"""Scores of the toy model with the toy world's metrics: VAE reconstructions and prompt
adherence of generated images (45 prompts, every shape x colour x background)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from gpu_runner.samplers import make_scheduler
from storage.families import generation_defaults
from toyworld.metrics import read
from toyworld.scenes import SIDE, all_prompts, random_scenes
from toyworld.styles import STYLES, draw

# What "the default CFG" means for the targets: the settings /imagine uses on toy-sd15.
_DEFAULTS = generation_defaults("toy-sd15", {})
EVAL_SETTINGS = {"steps": _DEFAULTS.steps, "cfg": _DEFAULTS.cfg, "sampler": _DEFAULTS.sampler}


def images_to_tensor(images: list[Any], device: torch.device) -> torch.Tensor:
    """RGB images as a (N, 3, H, W) batch in [-1, 1], as the VAE takes them."""
    arr = np.stack([np.asarray(im, np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(device)


def rates(hits: list[dict[str, bool]]) -> dict[str, float]:
    keys = ("shape", "colour", "background", "all")
    return {k: round(float(np.mean([h[k] for h in hits])), 4) for k in keys}


@torch.no_grad()
def reconstruction_report(vae: Any, device: torch.device, seed: int, count: int = 300) -> dict:
    """Adherence of VAE reconstructions, plain and per style (the VAE caps the whole model)."""
    scenes = random_scenes(seed, count)
    report: dict[str, Any] = {}
    for style in ((), *((name,) for name in STYLES)):
        images = [draw(s, style) for s in scenes]
        x = images_to_tensor(images, device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        readings = [read(Image.fromarray(a)) for a in arr]
        entry = rates([r.adherence(s) for r, s in zip(readings, scenes, strict=True)])
        if style:
            entry["style_shows"] = round(float(np.mean([r.shows(style[0]) for r in readings])), 4)
        report[style[0] if style else "plain"] = entry
    return report


@torch.no_grad()
def adherence_report(pipe: Any, seeds: int = 2, prefix: str = "") -> dict[str, Any]:
    """Generate every prompt with `seeds` seeds and score shape, colour, background."""
    pipe.scheduler = make_scheduler(pipe.scheduler.config, str(EVAL_SETTINGS["sampler"]))
    scenes = all_prompts()
    hits = []
    for seed in range(seeds):
        prompts = [prefix + s.caption for s in scenes]
        gens = [
            torch.Generator(device="cpu").manual_seed(seed * 1000 + i) for i in range(len(scenes))
        ]
        images = pipe(
            prompt=prompts,
            num_inference_steps=EVAL_SETTINGS["steps"],
            guidance_scale=EVAL_SETTINGS["cfg"],
            generator=gens,
            height=SIDE,
            width=SIDE,
        ).images
        hits += [read(im).adherence(s) for im, s in zip(images, scenes, strict=True)]
    return {"rates": rates(hits), "samples": len(hits), "settings": EVAL_SETTINGS}
