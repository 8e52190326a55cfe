"""Samplers by their A1111 names, and the diffusers schedulers that run them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpu_runner.prompts import InvalidRequestError


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # A1111's name, written into the `parameters` chunk
    scheduler: str  # diffusers class
    options: Mapping[str, Any] = field(default_factory=dict)


_SAMPLER_LIST = (
    SamplerSpec("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # Options are explicit both ways: a scheduler made from another one's config (a warm
    # pipeline's last) must not inherit its Karras sigmas.
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler"),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    SamplerSpec("DDIM", "DDIMScheduler"),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {"use_karras_sigmas": False}),
)
SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in _SAMPLER_LIST}


def _sampler_key(name: str) -> str:
    return "".join(ch for ch in name.lower().replace("++", "pp") if ch.isalnum())


# A1111 names plus ComfyUI-style spellings (dpmpp_2m_karras, euler_ancestral, ...).
_SAMPLER_ALIASES: dict[str, str] = {_sampler_key(s.name): s.name for s in _SAMPLER_LIST}
_SAMPLER_ALIASES.update({"eulerancestral": "Euler a", "dpmpp2mkarras": "DPM++ 2M Karras"})


def resolve_sampler(name: str) -> SamplerSpec:
    canonical = _SAMPLER_ALIASES.get(_sampler_key(name))
    if canonical is None:
        raise InvalidRequestError(f"unknown sampler '{name}'; use one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[canonical]


def make_scheduler(base_config: Mapping[str, Any], sampler: str) -> Any:
    """A fresh scheduler for `sampler` on a base model's scheduler config."""
    import diffusers

    spec = resolve_sampler(sampler)
    return getattr(diffusers, spec.scheduler).from_config(dict(base_config), **spec.options)


__all__ = ["SAMPLERS", "SamplerSpec", "make_scheduler", "resolve_sampler"]
