"""The model families the runner knows, by name: one module each, one interface
(`base.ModelFamily`). Shared code asks the registry, never a family name."""

from __future__ import annotations

from typing import Any

from gpu_runner.families.base import ModelFamily, TinyBuilder
from gpu_runner.families.flux1 import Flux1
from gpu_runner.families.flux2_klein import Flux2Klein
from gpu_runner.families.qwenimage import QwenImage
from gpu_runner.families.sd15 import StableDiffusion15
from gpu_runner.families.sdxl import StableDiffusionXL
from gpu_runner.families.zimage import ZImage

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        StableDiffusion15(),
        StableDiffusionXL(),
        Flux2Klein(),
        Flux1(),
        QwenImage(),
        ZImage(),
    )
}


# The order adapter files are matched in (lora_signs.py): the transformer families first,
# FLUX before Qwen-Image (FLUX's diffusers files have Qwen-Image's joint attention too),
# SD last (SDXL's `transformer_blocks.1` is in every transformer's diffusers names).
DETECTION_ORDER: tuple[ModelFamily, ...] = tuple(
    FAMILIES[n] for n in ("flux2-klein", "flux1", "qwenimage", "zimage", "sdxl", "sd15")
)


class UnknownFamilyError(ValueError):
    pass


def get_family(name: str) -> ModelFamily:
    """The family of a `storage.families` name (SD2 shares SD1.5's: same pipeline class)."""
    family = FAMILIES.get("sd15" if name == "sd2" else name)
    if family is None:
        raise UnknownFamilyError(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}")
    return family


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family whose pipeline class `pipe` is."""
    for family in FAMILIES.values():
        if family.owns(pipe):
            return family
    raise UnknownFamilyError(f"{type(pipe).__name__} is not a pipeline of a known family")


def family_of_pipeline_class(cls: type[Any]) -> ModelFamily:
    """The family a pipeline class belongs to."""
    for family in FAMILIES.values():
        if issubclass(cls, family.pipeline_classes()):
            return family
    raise UnknownFamilyError(f"{cls.__name__} is not a pipeline of a known family")


def family_of_class_name(class_name: str) -> ModelFamily | None:
    """The family that loads a `model_index.json` `_class_name` (None: none does)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    return None


def runs_labels() -> str:
    """What Atelier runs, for messages: "SD1.5/SD2, SDXL, ... and Qwen-Image"."""
    names = [f.runs_label for f in FAMILIES.values()]
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]


def builtin_builder(name: str) -> TinyBuilder | None:
    """The builder of a built-in model, made in code or shipped (None: not one)."""
    for family in FAMILIES.values():
        builders = {**family.tiny_builders, **family.shipped_builders}
        if name in builders:
            return builders[name]
    return None


__all__ = [
    "DETECTION_ORDER",
    "FAMILIES",
    "ModelFamily",
    "UnknownFamilyError",
    "builtin_builder",
    "family_of_class_name",
    "family_of_pipeline",
    "family_of_pipeline_class",
    "get_family",
    "runs_labels",
]
