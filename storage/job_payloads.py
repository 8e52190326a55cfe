"""Typed payloads of the jobs the bot enqueues and the runner runs.

Both sides import these from storage, which is the only thing they share.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum, StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobKind(StrEnum):
    TRAIN = "train"
    GENERATE = "generate"
    CAPTION = "caption"


class Priority(IntEnum):
    """Higher runs first: quick generations never wait behind an hour of training."""

    TRAIN = 0
    CAPTION = 5
    GENERATE = 10


class ReplyTarget(BaseModel):
    """Where the runner's progress and results are posted (through the outbox)."""

    model_config = ConfigDict(frozen=True)

    platform: str
    channel: str
    thread: str | None = None
    team_id: int
    requester: str


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    reply: ReplyTarget


class TrainPayload(_Payload):
    training_run_id: int


class CaptionPayload(_Payload):
    dataset_version_id: int


class AdapterChoice(BaseModel):
    """A trained model version to apply, chosen by trigger word or `<lora:name:w>`."""

    model_config = ConfigDict(frozen=True)

    model_version_id: int
    name: str
    trigger: str
    weight: float = Field(1.0, ge=-4.0, le=4.0)


class GeneratePayload(_Payload):
    prompt: str
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    steps: int = Field(25, ge=1, le=150)
    cfg: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    count: int = Field(1, ge=1, le=8)
    sampler: str = "euler_a"
    compare: bool = False
    base_model: str
    adapters: list[AdapterChoice] = Field(default_factory=list)
    # Set by a 🔁 reroll: the generation it repeats with a new seed.
    reroll_of: int | None = None


def batch_key(payload: GeneratePayload) -> str:
    """Generations with equal keys can run in one pipeline call: same model, adapters,
    size, steps, CFG and sampler (prompts and seeds may differ)."""
    adapters = ",".join(
        f"{a.model_version_id}:{a.weight:g}"
        for a in sorted(payload.adapters, key=lambda a: a.model_version_id)
    )
    return (
        f"{payload.base_model}|{adapters}|{payload.width}x{payload.height}|"
        f"{payload.steps}|{payload.cfg:g}|{payload.sampler}|{int(payload.compare)}"
    )


# Typical device memory (MB) a job needs, by family: fp16 SD1.5 generates in ~4 GB and
# trains a LoRA in ~8 GB; SDXL needs ~8 GB and ~16 GB (kohya sd-scripts and diffusers
# training docs give figures in these ranges). The built-in tiny models need nothing.
_MEMORY_MB = {
    (JobKind.GENERATE, "sd15"): 4_000,
    (JobKind.TRAIN, "sd15"): 8_000,
    (JobKind.GENERATE, "sdxl"): 8_000,
    (JobKind.TRAIN, "sdxl"): 16_000,
}
TINY_MODELS = ("tiny-sd15", "tiny-sdxl")


def model_family(base_model: str, configured: Mapping[str, Any]) -> str | None:
    """sd15 or sdxl from the config (its `family`, else the name/source), None for tiny."""
    if base_model in TINY_MODELS:
        return None
    value = configured.get(base_model, "")
    if isinstance(value, Mapping):
        if value.get("family"):
            return "sdxl" if str(value["family"]) == "sdxl" else "sd15"
        value = value.get("source", "")
    return "sdxl" if "xl" in f"{base_model} {value}".lower() else "sd15"


def memory_needed_mb(kind: JobKind, base_model: str, configured: Mapping[str, Any]) -> int | None:
    family = model_family(base_model, configured)
    return None if family is None else _MEMORY_MB.get((kind, family))


def progress_key(job_id: int) -> str:
    """Outbox key of the one message a job's progress edits in place."""
    return f"job:{job_id}:progress"


def result_key(job_id: int) -> str:
    return f"job:{job_id}:result"
