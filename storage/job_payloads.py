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
    IMPORT = "import"


class GenerationMode(StrEnum):
    """How a generation came about; recorded on its Generation row and shown in its message."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"  # /imagine with an attached image
    REROLL = "reroll"  # same request, new seed
    VARY = "vary"  # image-to-image from a result
    UPSCALE = "upscale"  # hires fix: the result resized x2, then a light image-to-image pass
    EDIT = "edit"  # the request with its prompt edited


class Priority(IntEnum):
    """Higher runs first: quick generations never wait behind an hour of training."""

    TRAIN = 0
    IMPORT = 5
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


class ImportPayload(_Payload):
    """A LoRA file someone attached to `/style import`, stored as a blob, for the runner to
    check (safetensors only, family against the style's base) and publish as a version."""

    style_id: int
    blob_sha256: str
    filename: str


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
    mode: GenerationMode = GenerationMode.TXT2IMG
    # The result this one was made from (vary, upscale, edit, reroll).
    parent_generation_id: int | None = None
    # Image-to-image: the starting picture (a blob) and how much of it to repaint.
    init_image: str | None = None
    strength: float | None = Field(None, ge=0.05, le=1.0)

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
    # Image-to-image runs share a call only with the same picture and strength.
    init = f"|{payload.init_image}:{payload.strength or 0:g}" if payload.init_image else ""
    return (
        f"{payload.base_model}|{adapters}|{payload.width}x{payload.height}|"
        f"{payload.steps}|{payload.cfg:g}|{payload.sampler}|{int(payload.compare)}{init}"
    )


def progress_key(job_id: int) -> str:
    """Outbox key of the one message a job's progress edits in place."""
    return f"job:{job_id}:progress"


def result_key(job_id: int) -> str:
    return f"job:{job_id}:result"
