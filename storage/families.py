"""Model families and built-in base models: the one table of generation defaults (size,
steps, sampler, CFG) and memory needs that the bot and the runner both read.

Sources of the defaults:
  [sd15]  runwayml/stable-diffusion-v1-5 model card: trained at 512x512; A1111's txt2img
          defaults: 20 steps, CFG 7, DPM++ 2M with the Karras schedule.
  [sdxl]  stabilityai/stable-diffusion-xl-base-1.0 model card: 1024x1024 native; diffusers'
          StableDiffusionXLPipeline default guidance_scale 5.0; Stability's guide: 25-40 steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["sd15", "sdxl"]
FAMILIES: tuple[Family, ...] = ("sd15", "sdxl")
FAMILY_LABELS: dict[str, str] = {"sd15": "SD1.5/SD2", "sdxl": "SDXL"}


@dataclass(frozen=True)
class GenerationDefaults:
    width: int
    height: int
    steps: int
    sampler: str  # an Atelier sampler name (A1111's)
    cfg: float


FAMILY_DEFAULTS: dict[Family, GenerationDefaults] = {
    "sd15": GenerationDefaults(512, 512, 25, "DPM++ 2M Karras", 7.0),  # [sd15]
    "sdxl": GenerationDefaults(1024, 1024, 30, "DPM++ 2M Karras", 5.0),  # [sdxl]
}


@dataclass(frozen=True)
class BuiltinModel:
    """A base model that ships with Atelier (no config, no download)."""

    name: str
    family: Family
    native_side: int  # what it was made or trained for
    random: bool  # random weights: images are noise
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "tiny-sd15", "sd15", 64, True, "SD1.5 layout in miniature, random weights (tests)"
        ),
        BuiltinModel(
            "tiny-sdxl", "sdxl", 64, True, "SDXL layout in miniature, random weights (tests)"
        ),
        BuiltinModel(
            "toy-sd15",
            "sd15",
            64,
            False,
            "Atelier's own small SD1.5-layout model pretrained on the toy world (shapes, "
            "colours, backgrounds at 64 px)",
        ),
    )
}

# Typical device memory (MB) a job needs, by family: fp16 SD1.5 generates in ~4 GB and
# trains a LoRA in ~8 GB; SDXL needs ~8 GB and ~16 GB (kohya sd-scripts and diffusers
# training docs give figures in these ranges). The built-in models need nothing.
MEMORY_MB: dict[tuple[str, Family], int] = {
    ("generate", "sd15"): 4_000,
    ("train", "sd15"): 8_000,
    ("generate", "sdxl"): 8_000,
    ("train", "sdxl"): 16_000,
}


def model_family(base_model: str, configured: Mapping[str, Any]) -> Family:
    """The family of a base model: built-in, else its config's `family`, else a guess from
    its name and source ("xl" means SDXL; the runner checks it when the model loads)."""
    if base_model in BUILTIN_MODELS:
        return BUILTIN_MODELS[base_model].family
    value = configured.get(base_model, "")
    if isinstance(value, Mapping):
        if value.get("family") in FAMILIES:
            return value["family"]  # type: ignore[no-any-return]
        value = value.get("source", "")
    return "sdxl" if "xl" in f"{base_model} {value}".lower() else "sd15"


def generation_defaults(base_model: str, configured: Mapping[str, Any]) -> GenerationDefaults:
    """What `/imagine` uses when the person does not say: the family's table, at the
    built-in model's own size."""
    return defaults_for(base_model, model_family(base_model, configured))


def defaults_for(base_model: str, family: str) -> GenerationDefaults:
    """The family's defaults (SD2 shares SD1.5's), at a built-in model's own size."""
    defaults = FAMILY_DEFAULTS["sdxl" if family == "sdxl" else "sd15"]
    builtin = BUILTIN_MODELS.get(base_model)
    if builtin is not None:
        side = builtin.native_side
        return GenerationDefaults(side, side, defaults.steps, defaults.sampler, defaults.cfg)
    return defaults


def memory_needed_mb(kind: str, base_model: str, configured: Mapping[str, Any]) -> int | None:
    if base_model in BUILTIN_MODELS:
        return None
    return MEMORY_MB.get((kind, model_family(base_model, configured)))
