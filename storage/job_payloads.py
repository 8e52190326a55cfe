"""Typed payloads of the jobs the bot enqueues and the runner runs.

Both sides import these from storage, which is the only thing they share.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from pydantic import BaseModel, ConfigDict, Field

from storage.families import GenerationDefaults
from storage.prompt_rules import MAX_WEIGHT, MIN_WEIGHT


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
    weight: float = Field(1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT)


class GeneratePayload(_Payload):
    prompt: str
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    # None: the base model's default (storage.families); the bot fills them in before it
    # enqueues, so a stored job says exactly what it renders.
    steps: int | None = Field(None, ge=1, le=150)
    cfg: float | None = Field(None, ge=0.0, le=30.0)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    count: int = Field(1, ge=1, le=8)
    sampler: str | None = None
    compare: bool = False
    base_model: str
    adapters: list[AdapterChoice] = Field(default_factory=list)
    # Set by a 🔁 reroll: the generation it repeats with a new seed.
    reroll_of: int | None = None

    def with_defaults(self, defaults: GenerationDefaults) -> GeneratePayload:
        """This payload with every unset setting taken from `defaults`."""
        given = {k: getattr(self, k) for k in ("steps", "cfg", "width", "height", "sampler")}
        filled = {k: getattr(defaults, k) for k, v in given.items() if v is None}
        return self.model_copy(update=filled)


def batch_key(payload: GeneratePayload) -> str:
    """Generations with equal keys can run in one pipeline call: same model, adapters,
    size, steps, CFG and sampler (prompts and seeds may differ)."""
    if None in (payload.width, payload.height, payload.steps, payload.cfg, payload.sampler):
        raise ValueError("fill in the payload's defaults (with_defaults) before batching it")
    adapters = ",".join(
        f"{a.model_version_id}:{a.weight:g}"
        for a in sorted(payload.adapters, key=lambda a: a.model_version_id)
    )
    return (
        f"{payload.base_model}|{adapters}|{payload.width}x{payload.height}|"
        f"{payload.steps}|{payload.cfg:g}|{payload.sampler}|{int(payload.compare)}"
    )


def progress_key(job_id: int) -> str:
    """Outbox key of the one message a job's progress edits in place."""
    return f"job:{job_id}:progress"


def result_key(job_id: int) -> str:
    return f"job:{job_id}:result"
