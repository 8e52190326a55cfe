"""Prior preservation: images of the plain class, drawn by the base model itself, that the
LoRA must keep drawing as the base did when the trigger is absent.

DreamBooth's answer to a LoRA that restyles every prompt (Ruiz et al. 2023, "class-specific
prior preservation loss"; diffusers' train_dreambooth_lora.py `--with_prior_preservation`):
each step also denoises a base-model image captioned without the trigger, and the loss on
it pulls the adapter back towards the base model there. One prior per training image, from
its caption with the trigger removed, on fixed seeds (a resumed run draws the same ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gpu_runner.families import family_of_pipeline
from gpu_runner.training.dataset import TextCond, encode_text

# The trigger leaves prior captions by the rule captions and chat find it with.
from storage.prompt_rules import without_trigger


@dataclass
class Priors:
    latents: torch.Tensor  # (N, C, h, w) scaled, as the denoiser sees training latents
    text: TextCond
    time_ids: torch.Tensor  # (N, 6) SDXL size/crop ids of a full, uncropped square
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@torch.no_grad()
def draw_priors(
    pipeline: Any,
    captions: list[str],
    trigger: str,
    *,
    resolution: int,
    seed: int,
    steps: int,
    sampler: str,
    cfg: float,
    device: torch.device,
) -> Priors:
    """One base-model image per caption (trigger removed), kept as latents (no VAE trip)."""
    plain = [without_trigger(c, trigger) for c in captions]
    family = family_of_pipeline(pipeline)
    previous = pipeline.scheduler
    pipeline.scheduler = family.make_scheduler(previous.config, sampler)
    try:
        gens = [torch.Generator("cpu").manual_seed(seed * 7919 + i) for i in range(len(plain))]
        # Called as generation calls it (the family's CFG argument and its own, an empty
        # negative prompt): the base model's images of the plain captions, as /imagine draws.
        latents = pipeline(
            prompt=list(plain),  # a copy: ZImagePipeline rewrites the list it is given
            num_inference_steps=steps,
            height=resolution,
            width=resolution,
            generator=gens,
            output_type="latent",
            **family.cfg_kwargs(cfg),
            **family.call_kwargs([""] * len(plain)),
        ).images
    finally:
        pipeline.scheduler = previous
    latents = family.generated_latents_to_loop(pipeline, latents, resolution, resolution)
    ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(plain))
    text = encode_text(pipeline, plain, device)
    return Priors(latents.detach().float().to(device), text, ids.float(), plain)
