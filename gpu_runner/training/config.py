"""Typed training configs (one per method), presets per family, and bounded per-run overrides.

The runner's side: the bot does not import this module. The method and preset names and
the bounds of every setting a person may override live in `storage.training_bounds`, which
the bot reads to refuse bad `/style train` arguments in chat and this module validates
every config against.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from storage.families import (
    FAMILIES,
    TRAINING_METHODS,
    Family,
    MethodNotSupportedError,
    check_text_encoder_lora,
    check_training_method,
    size_multiple,
)
from storage.training_bounds import (
    BOUNDS,
    METHODS,
    PRESETS,
    WHOLE_BOUNDS,
    Method,
    Optimizer,
    Preset,
    Quantization,
)

LrSchedule = Literal["constant_with_warmup", "cosine"]
Precision = Literal["auto", "no", "fp16", "bf16"]


# A preset's warmup never takes more than 1/WARMUP_SHARE of a run.
WARMUP_SHARE = 10
# A text-encoder LoRA learns at this share of the denoiser's rate: kohya's train_network
# docs pair unet_lr 1e-4 with text_encoder_lr 5e-5 (CLIP drifts fast and every prompt reads it).
TEXT_ENCODER_LR_SHARE = 0.5


class ConfigError(ValueError):
    """A training setting is out of bounds or unknown; the message is one line for people."""


class TrainConfigBase(BaseModel):
    """Settings shared by every method. Prefer `make_config` to building this directly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Method
    family: Family = "sd15"
    preset: Preset = "style"
    trigger: str = Field(min_length=1, max_length=64)
    steps: int
    learning_rate: float
    resolution: int
    batch_size: int
    caption_dropout: float = 0.0
    min_snr_gamma: float | None = 5.0
    lr_scheduler: LrSchedule = "constant_with_warmup"
    warmup_steps: int = 0
    weight_decay: float = 1e-2  # diffusers training scripts' --adam_weight_decay default
    max_grad_norm: float = 1.0  # diffusers training scripts' --max_grad_norm default
    seed: int = 0
    # None: take the base model scheduler's prediction type (epsilon for SD1.5/SDXL base).
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    val_fraction: float = 0.15
    # Each image at its aspect-ratio bucket (training/buckets.py), every trainer's default
    # (kohya's enable_bucket, ai-toolkit, OneTrainer); False centre-crops to the square.
    aspect_buckets: bool = True
    # Mirrored copies of the references (their latents cached too), each step drawing one
    # orientation per image: twice the views of a style; off for concepts, whose sides can
    # matter (a logo, a character's scar). The presets set it.
    flip: bool = False
    # A per-image, per-channel constant added to the noise (offset noise): lets the model
    # move an image's mean brightness, so very dark and very bright styles train. 0: off.
    noise_offset: float = 0.0
    # The timesteps a step trains on, of the schedule's 1000 (kohya's --min_timestep and
    # --max_timestep): a texture drawn in the low-noise steps learns faster without the
    # noisiest, which decide composition and colour and stay the base model's.
    min_timestep: int = 0
    max_timestep: int = 1000
    # Micro-batches per optimizer step: a batch of batch_size x this, in batch_size's memory.
    gradient_accumulation: int = 1
    optimizer: Optimizer = "adamw"
    # kohya's shuffle_caption / keep_tokens: each step the captions' comma-separated tags
    # in a new order, the first `keep_tags` and the trigger's tag staying where they are,
    # so no tag order is learnt as part of the style. Text is then encoded every step.
    caption_shuffle: bool = False
    keep_tags: int = 0
    validate_every: int = 100
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    sample_prompts: list[str] = Field(default_factory=lambda: ["[trigger]"])
    sample_seeds: list[int] = Field(default_factory=lambda: [1, 2])
    sample_steps: int = 20
    cache_latents: bool = True  # VAE latents + text embeddings once per run (exact)
    mixed_precision: Precision = "auto"  # auto: bf16 if the GPU has it, else fp16; fp32 on CPU
    gradient_checkpointing: bool = True  # CUDA only; saves memory at ~20% speed
    output_name: str = "lora"
    base_model_name: str = ""
    base_model_hash: str = ""
    dataset_hash: str = ""

    @model_validator(mode="after")
    def _check_bounds(self) -> TrainConfigBase:
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name, None)
            if value is None:
                continue
            if not low <= value <= high:
                raise ValueError(f"{name} must be between {low:g} and {high:g} (got {value:g})")
        step = size_multiple(self.family)  # the side step the family's pipeline draws in
        if self.resolution % step:
            raise ValueError(f"resolution must be a multiple of {step} (got {self.resolution})")
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})"
            )
        if self.min_timestep >= self.max_timestep:
            raise ValueError(
                f"min_timestep ({self.min_timestep}) must be below max_timestep "
                f"({self.max_timestep})"
            )
        if any(c.isspace() for c in self.trigger):
            raise ValueError(f"trigger must be one word without spaces (got {self.trigger!r})")
        if not self.sample_seeds or not self.sample_prompts:
            raise ValueError("sample_prompts and sample_seeds must each hold at least one entry")
        return self

    def fingerprint(self) -> str:
        """Hash of the settings that shape the trained weights (resume must match it)."""
        cosmetic = {
            "output_name",
            "base_model_name",
            "sample_prompts",
            "sample_seeds",
            "sample_steps",
            "validate_every",
            "checkpoint_every",
            "keep_checkpoints",
        }
        data = self.model_dump(mode="json", exclude=cosmetic)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class LoraConfig(TrainConfigBase):
    """LoRA on the UNet's attention projections (peft)."""

    method: Literal["lora"] = "lora"
    rank: int
    alpha: float
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # Weight of the prior-preservation loss on base-model images of the plain class
    # (gpu_runner/training/priors.py); 0 turns it off. DreamBooth's prior_loss_weight is 1.
    prior_preservation: float = Field(0.0, ge=0.0, le=2.0)
    # Weight of output preservation (ai-toolkit's "differential output preservation"): on the
    # same noisy latents, the adapter's prediction for the caption without the trigger (or
    # the empty one CFG uses) must match the base model's. 0 turns it off. It keeps the style
    # to its trigger, and so lets CFG amplify it instead of cancelling it.
    output_preservation: float = 0.0
    # The frozen base as loaded, or quantized to NF4 under the adapter (QLoRA): about a
    # quarter of the denoiser's memory, for FLUX.1 / FLUX.2 9B / Qwen-Image on 24 GB cards.
    quantize: Quantization = "none"
    # A LoRA on the CLIP text encoder(s) too (SD families; kohya's default unless
    # network_train_unet_only): the trigger's meaning is learnt in the text as well. Text
    # is then encoded every step, and the file carries kohya's `lora_te*` keys.
    train_text_encoder: bool = False

    @model_validator(mode="after")
    def _check_text_encoder(self) -> LoraConfig:
        if self.train_text_encoder:
            check_text_encoder_lora(self.family)
        return self

    @property
    def text_encoder_lr(self) -> float:
        """The text-encoder LoRA's learning rate (0 when the text encoders stay frozen)."""
        return self.learning_rate * TEXT_ENCODER_LR_SHARE if self.train_text_encoder else 0.0


class DoraConfig(LoraConfig):
    """Weight-decomposed LoRA (peft `use_dora=True`); exported with kohya `dora_scale` keys."""

    method: Literal["dora"] = "dora"  # type: ignore[assignment]


class TextualInversionConfig(TrainConfigBase):
    """Trains only the embedding row(s) of the trigger token in the text encoder(s)."""

    method: Literal["textual_inversion"] = "textual_inversion"
    num_vectors: int = 1
    # The new token's embedding starts from this word's (diffusers textual_inversion example's
    # --initializer_token); must tokenize to one token.
    initializer_token: str = "style"


TrainConfig = Annotated[
    LoraConfig | DoraConfig | TextualInversionConfig, Field(discriminator="method")
]
AnyTrainConfig = LoraConfig | DoraConfig | TextualInversionConfig

# Presets: well-trodden defaults. Sources:
#  [kohya]  kohya-ss/sd-scripts docs/train_network.md example: network_dim 16, network_alpha 8,
#           learning_rate 1e-4, cosine schedule, 100 warmup steps; caption_dropout_rate in
#           docs/config_README (0.05-0.1 is the usual community range for styles).
#  [dlora]  diffusers examples/text_to_image/README (train_text_to_image_lora.py): lr 1e-4,
#           resolution 512, ~1500 steps, batch 1 with grad accumulation 4; SDXL README
#           (train_text_to_image_lora_sdxl.py): resolution 1024, lr 1e-4, batch 1.
#  [dbooth] diffusers examples/dreambooth README_sdxl (train_dreambooth_lora_sdxl.py): a
#           subject/concept in ~500 steps at lr 1e-4, constant schedule.
#  [kflip]  kohya-ss/sd-scripts `--flip_aug` (train_util.py): horizontal flips as augmentation,
#           documented for subjects that look the same mirrored, not asymmetric ones
#           (recalled, not re-read offline); ai-toolkit's and OneTrainer's flip options alike.
#  [minsnr] Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting": gamma = 5.
#  [dora]   Liu et al. 2024, "DoRA": matches LoRA at about half the rank, same lr.
#  [ti]     diffusers examples/textual_inversion README: lr 5e-4, 3000 steps, batch 1 x 4
#           accumulation, 512 px (SDXL script: 1024 px).
#  [dflux2] diffusers examples/dreambooth README_flux2 (train_dreambooth_lora_flux2_klein.py)
#           on the klein base: lr 1e-4, constant schedule with no warmup, resolution 1024,
#           batch 1 x 4 accumulation, ~500 steps for a subject, weighting_scheme "none"
#           (flow matching: no min-SNR). Recalled from the example, not re-read offline.
#  [dflux1] diffusers examples/dreambooth train_dreambooth_lora_flux.py (read): lr 1e-4,
#           constant schedule, weighting_scheme "none"; its README_flux.md (read): a subject
#           in 500 steps at batch 1 x 4 accumulation, --guidance_scale=1, constant with no
#           warmup; its LoRA example trains at 512 px to save memory, its full fine-tune at
#           FLUX.1's native 1024.
#  [kflux1] kohya-ss/sd-scripts docs/flux_train_network.md (read): learning_rate 1e-4,
#           constant schedule, network_dim 16, --guidance_scale=1.0 when training dev.
#  [dqwen]  diffusers examples/dreambooth/train_dreambooth_lora_qwen_image.py (its argument
#           defaults, read in its source): lr 1e-4, constant schedule, weighting_scheme
#           "none" (flow matching: no min-SNR), max_sequence_length 512.
#  [musqw]  kohya-ss/musubi-tuner docs/qwen_image.md LoRA example: network_dim 16,
#           learning_rate 5e-5, weighting_scheme none, batch 1 (its VRAM table), bf16 with
#           gradient checkpointing; 1328x1328 is the resolution it writes for Qwen-Image.
#  [dzimage] diffusers examples/dreambooth README_z_image.md (train_dreambooth_lora_z_image.py)
#           on Tongyi-MAI/Z-Image: lr 1e-4, resolution 1024, batch 1 x 4 accumulation, 500
#           steps for a subject, "constant" schedule (its 100 warmup steps apply only to
#           constant_with_warmup), flow matching without SNR weights.
_LORA_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # Styles want more capacity (rank 32/alpha 16 is the common kohya style setting) and a
    # little caption dropout so the look also leaks into untriggered text.
    ("sd15", "style"): {
        "rank": 32,  # [kohya] community style setting (docs example uses 16 for subjects)
        "alpha": 16,  # [kohya] alpha = rank / 2
        "learning_rate": 1e-4,  # [kohya] [dlora]
        "steps": 1500,  # [dlora]
        "resolution": 512,  # [dlora] SD1.5 native
        "batch_size": 4,  # [dlora] 1 x 4 accumulation, as one batch
        "caption_dropout": 0.05,  # [kohya]
        "flip": True,  # [kflip] a style reads the same mirrored
        "min_snr_gamma": 5.0,  # [minsnr]
        "lr_scheduler": "cosine",  # [kohya]
        "warmup_steps": 100,  # [kohya]
    },
    ("sd15", "concept"): {
        "rank": 16,  # [kohya] docs example
        "alpha": 8,  # [kohya]
        "learning_rate": 1e-4,  # [kohya] [dbooth]
        "steps": 800,  # [dbooth] ~500 for one subject; more for a few views
        "resolution": 512,
        "batch_size": 2,
        "caption_dropout": 0.0,  # a concept must stay tied to its trigger
        "flip": False,  # [kflip] a concept's sides can matter
        "min_snr_gamma": 5.0,  # [minsnr]
        "lr_scheduler": "constant_with_warmup",  # [dbooth] constant
        "warmup_steps": 0,  # [dbooth]
    },
    ("sdxl", "style"): {
        "rank": 32,
        "alpha": 16,
        "learning_rate": 1e-4,  # [dlora] SDXL README
        "steps": 2000,
        "resolution": 1024,  # [dlora] SDXL native
        "batch_size": 1,  # [dlora] SDXL README; 24 GB cards
        "caption_dropout": 0.05,  # [kohya]
        "flip": True,  # [kflip] a style reads the same mirrored
        "min_snr_gamma": 5.0,  # [minsnr]
        "lr_scheduler": "cosine",
        "warmup_steps": 100,
    },
    ("sdxl", "concept"): {
        "rank": 16,
        "alpha": 8,
        "learning_rate": 1e-4,  # [dbooth]
        "steps": 1000,  # [dbooth] 500 at batch 1, doubled for several views
        "resolution": 1024,
        "batch_size": 1,
        "caption_dropout": 0.0,
        "flip": False,  # [kflip] a concept's sides can matter
        "min_snr_gamma": 5.0,
        "lr_scheduler": "constant_with_warmup",
        "warmup_steps": 0,
    },
    # FLUX.2 [klein]: the SDXL shapes (1024 px, batch 1) with flow matching's objective.
    ("flux2-klein", "style"): {
        "rank": 32,  # [kohya] community style setting, as for SD
        "alpha": 16,  # [kohya]
        "learning_rate": 1e-4,  # [dflux2]
        "steps": 2000,  # as SDXL style: 4x [dflux2]'s subject run at batch 1
        "resolution": 1024,  # [dflux2] klein native
        "batch_size": 1,  # [dflux2]
        "caption_dropout": 0.05,  # [kohya]
        "flip": True,  # [kflip] a style reads the same mirrored
        "min_snr_gamma": None,  # [dflux2] flow matching weights no timestep by SNR
        "lr_scheduler": "cosine",  # [kohya], as the SD style presets
        "warmup_steps": 100,  # [kohya]
    },
    ("flux2-klein", "concept"): {
        "rank": 16,
        "alpha": 8,
        "learning_rate": 1e-4,  # [dflux2]
        "steps": 1000,  # [dflux2] 500 at 1 x 4, doubled for several views (as SDXL)
        "resolution": 1024,  # [dflux2]
        "batch_size": 1,  # [dflux2]
        "caption_dropout": 0.0,  # a concept must stay tied to its trigger
        "flip": False,  # [kflip] a concept's sides can matter
        "min_snr_gamma": None,  # [dflux2]
        "lr_scheduler": "constant_with_warmup",  # [dflux2] constant
        "warmup_steps": 0,  # [dflux2]
    },
    # FLUX.1 [dev]: the SDXL shapes (1024 px, batch 1) with flow matching's objective.
    ("flux1", "style"): {
        "rank": 32,  # [kohya] community style setting, as for SD
        "alpha": 16,  # [kohya]
        "learning_rate": 1e-4,  # [dflux1] [kflux1]
        "steps": 2000,  # as SDXL style: 4x [dflux1]'s subject run at batch 1
        "resolution": 1024,  # [dflux1] FLUX.1 native, as the SDXL presets
        "batch_size": 1,  # [dflux1]
        "caption_dropout": 0.05,  # [kohya]
        "flip": True,  # [kflip] a style reads the same mirrored
        "min_snr_gamma": None,  # [dflux1] flow matching weights no timestep by SNR
        "lr_scheduler": "cosine",  # [kohya], as the SD style presets
        "warmup_steps": 100,  # [kohya]
    },
    ("flux1", "concept"): {
        "rank": 16,
        "alpha": 8,
        "learning_rate": 1e-4,  # [dflux1] [kflux1]
        "steps": 1000,  # [dflux1] 500 at 1 x 4, doubled for several views (as SDXL)
        "resolution": 1024,  # [dflux1]
        "batch_size": 1,  # [dflux1]
        "caption_dropout": 0.0,  # a concept must stay tied to its trigger
        "flip": False,  # [kflip] a concept's sides can matter
        "min_snr_gamma": None,  # [dflux1]
        "lr_scheduler": "constant_with_warmup",  # [dflux1] [kflux1] constant
        "warmup_steps": 0,  # [dflux1]
    },
    # Qwen-Image: a 20B transformer at its native 1328 px, batch 1, musubi-tuner's lower lr.
    ("qwenimage", "style"): {
        "rank": 32,  # [kohya] community style setting, as for SD
        "alpha": 16,  # [kohya]
        "learning_rate": 5e-5,  # [musqw]
        "steps": 2000,  # as the SDXL and FLUX.2 style presets at batch 1
        "resolution": 1328,  # [musqw] Qwen-Image native
        "batch_size": 1,  # [musqw]
        "caption_dropout": 0.05,  # [kohya]
        "flip": True,  # [kflip] a style reads the same mirrored
        "min_snr_gamma": None,  # [dqwen] [musqw] no SNR weighting in flow matching
        "lr_scheduler": "cosine",  # [kohya], as the SD style presets
        "warmup_steps": 100,  # [kohya]
    },
    ("qwenimage", "concept"): {
        "rank": 16,  # [musqw] network_dim
        "alpha": 8,  # [kohya] alpha = rank / 2
        "learning_rate": 5e-5,  # [musqw]
        "steps": 1000,  # as the SDXL and FLUX.2 concept presets at batch 1
        "resolution": 1328,  # [musqw]
        "batch_size": 1,  # [musqw]
        "caption_dropout": 0.0,  # a concept must stay tied to its trigger
        "flip": False,  # [kflip] a concept's sides can matter
        "min_snr_gamma": None,  # [dqwen]
        "lr_scheduler": "constant_with_warmup",  # [dqwen] constant
        "warmup_steps": 0,  # [dqwen] constant, no warmup
    },
    # Z-Image: the same shapes as FLUX.2 [klein] (1024 px, batch 1, flow matching).
    ("zimage", "style"): {
        "rank": 32,  # [kohya] community style setting, as for SD
        "alpha": 16,  # [kohya]
        "learning_rate": 1e-4,  # [dzimage]
        "steps": 2000,  # as SDXL style: 4x [dzimage]'s subject run at batch 1
        "resolution": 1024,  # [dzimage] Z-Image native
        "batch_size": 1,  # [dzimage]
        "caption_dropout": 0.05,  # [kohya]
        "flip": True,  # [kflip] a style reads the same mirrored
        "min_snr_gamma": None,  # [dzimage] flow matching weights no timestep by SNR
        "lr_scheduler": "cosine",  # [kohya], as the SD style presets
        "warmup_steps": 100,  # [kohya]
    },
    ("zimage", "concept"): {
        "rank": 16,
        "alpha": 8,
        "learning_rate": 1e-4,  # [dzimage]
        "steps": 1000,  # [dzimage] 500 at 1 x 4, doubled for several views (as SDXL)
        "resolution": 1024,  # [dzimage]
        "batch_size": 1,  # [dzimage]
        "caption_dropout": 0.0,  # a concept must stay tied to its trigger
        "flip": False,  # [kflip] a concept's sides can matter
        "min_snr_gamma": None,  # [dzimage]
        "lr_scheduler": "constant_with_warmup",  # [dzimage] constant
        "warmup_steps": 0,  # [dzimage]
    },
}
_TI_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    (family, preset): {
        "learning_rate": 5e-4,  # [ti]
        "steps": 3000 if preset == "style" else 2000,  # [ti]; objects converge sooner
        "resolution": _LORA_PRESETS[(family, "style")]["resolution"],  # [ti] native
        "batch_size": 4,  # [ti] 1 x 4 accumulation
        "caption_dropout": 0.0,  # the caption must hold the token being learnt
        "min_snr_gamma": None,  # [ti] the example uses plain MSE
        "lr_scheduler": "constant_with_warmup",  # [ti]
        "warmup_steps": 0,
        "initializer_token": "style" if preset == "style" else "object",
    }
    for family in FAMILIES
    if "textual_inversion" in TRAINING_METHODS[family]
    for preset in PRESETS
}


def preset_defaults(method: str, family: str, preset: str) -> dict[str, Any]:
    """The preset's settings as a plain dict (for `/style info` and the report)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}: use one of {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    try:
        check_training_method(family, method)
    except MethodNotSupportedError as exc:
        raise ConfigError(str(exc)) from None
    if method == "textual_inversion":
        return dict(_TI_PRESETS[(family, preset)])
    values = dict(_LORA_PRESETS[(family, preset)])
    if method == "dora":
        values["rank"] = max(1, values["rank"] // 2)  # [dora]
        values["alpha"] = values["rank"] / 2
    return values


def make_config(
    method: str = "lora",
    family: str = "sd15",
    preset: str = "style",
    *,
    trigger: str,
    **overrides: Any,
) -> AnyTrainConfig:
    """Preset defaults + per-run overrides, validated. Raises ConfigError with one clear line.

    None-valued overrides are ignored, so optional chat arguments can be passed straight in.
    """
    values = preset_defaults(method, family, preset)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    if "warmup_steps" not in given:
        # Warmup scales with the run: the preset's steps, but at most a tenth of the run
        # (kohya's and diffusers' examples warm up for 5-10% of their default runs).
        values["warmup_steps"] = min(values["warmup_steps"], values["steps"] // WARMUP_SHARE)
    # A rank override without an alpha override keeps the preset's alpha/rank ratio.
    base = preset_defaults(method, family, preset)
    rank = overrides.get("rank")
    if isinstance(rank, int) and overrides.get("alpha") is None and "rank" in base:
        values["alpha"] = rank * base["alpha"] / base["rank"]
    cls: type[AnyTrainConfig] = {
        "lora": LoraConfig,
        "dora": DoraConfig,
        "textual_inversion": TextualInversionConfig,
    }[method]
    try:
        return cls(method=method, family=family, preset=preset, trigger=trigger, **values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def config_from_dict(data: dict[str, Any]) -> AnyTrainConfig:
    """Rebuild a config saved with `model_dump()` (e.g. from a TrainingRun row)."""
    method = data.get("method", "lora")
    cls = {"lora": LoraConfig, "dora": DoraConfig, "textual_inversion": TextualInversionConfig}.get(
        method
    )
    if cls is None:
        raise ConfigError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {field!r}")
        elif err["type"] == "value_error" or not field:
            parts.append(msg)
        elif err["type"].startswith(("int_", "float_")) and field in BOUNDS:
            kind = "a whole number" if field in WHOLE_BOUNDS else "a number"
            parts.append(f"{field} must be {kind} (got {err.get('input')!r})")
        else:
            parts.append(f"{field}: {msg[:1].lower()}{msg[1:]}")
    return "; ".join(parts)
