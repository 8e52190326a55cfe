"""Model families and built-in base models: the one table of generation defaults (size,
steps, sampler, CFG) and memory needs that the bot and the runner both read.

Sources of the defaults:
  [sd15]  runwayml/stable-diffusion-v1-5 model card: trained at 512x512; A1111's txt2img
          defaults: 20 steps, CFG 7, DPM++ 2M with the Karras schedule.
  [sdxl]  stabilityai/stable-diffusion-xl-base-1.0 model card: 1024x1024 native; diffusers'
          StableDiffusionXLPipeline default guidance_scale 5.0; Stability's guide: 25-40 steps.
  [flux2] diffusers 0.42 Flux2KleinPipeline defaults for the (undistilled) klein base:
          num_inference_steps 50, guidance_scale 4.0, 128 latent px x VAE factor 8 = 1024;
          flow-matching Euler (FlowMatchEulerDiscreteScheduler).
  [flux1] diffusers 0.42 FluxPipeline defaults for FLUX.1 [dev]: num_inference_steps 28,
          guidance_scale 3.5 (the guidance embedding of the distilled model, not CFG),
          default_sample_size 128 x VAE factor 8 = 1024; flow-matching Euler.
  [qwen]  Qwen/Qwen-Image model card: 1328x1328 for 1:1 (its aspect table), 50 steps,
          true_cfg_scale 4.0 with a negative prompt; QwenImagePipeline samples with
          flow-matching Euler. Sides are multiples of 16 (VAE factor 8 x 2x2 packing).
  [zimage] diffusers 0.42 ZImagePipeline defaults: 1024x1024, num_inference_steps 50,
          guidance_scale 5.0 (the inference example of diffusers' README_z_image.md uses the
          same); flow-matching Euler. (The pipeline's docstring runs Z-Image-Turbo, the
          distilled model, at 8 steps and CFG 0; these defaults are the base model's.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from storage.training_bounds import LayerSet, Method

Family = Literal["sd15", "sdxl", "flux2-klein", "flux1", "qwenimage", "zimage"]
# Families with training presets and memory estimates (chat offers these).
FAMILIES: tuple[Family, ...] = ("sd15", "sdxl", "flux2-klein", "flux1", "qwenimage", "zimage")
# How people read each family (and SD2, which runs as SD1.5 but takes only SD2 adapters).
FAMILY_LABELS: dict[str, str] = {
    "sd15": "SD1.5",
    "sd2": "SD2",
    "sdxl": "SDXL",
    "flux2-klein": "FLUX.2 [klein]",
    "flux1": "FLUX.1",
    "qwenimage": "Qwen-Image",
    "zimage": "Z-Image",
}
# The training methods each family supports. Textual inversion needs a CLIP-style token
# table whose rows are the prompt's meaning; FLUX.2's Qwen3 language model reads prompts
# through a chat template and 36 layers of context, where one new row is not a style (no
# FLUX.2 trainer offers it: ai-toolkit, musubi-tuner, the diffusers examples). FLUX.1's
# CLIP-L gives only a pooled summary; its prompt's tokens are T5's, where a new row helps
# only beside a LoRA (the diffusers advanced script's pivotal tuning), not alone (kohya
# sd-scripts and ai-toolkit train FLUX.1 LoRAs only).
# FLUX.2 trainer offers it: ai-toolkit, musubi-tuner, the diffusers examples). Z-Image reads
# prompts through a Qwen3 language model too, and no Z-Image trainer offers it either.
TRAINING_METHODS: dict[Family, tuple[Method, ...]] = {
    "sd15": ("lora", "dora", "textual_inversion"),
    "sdxl": ("lora", "dora", "textual_inversion"),
    "flux2-klein": ("lora", "dora"),
    "flux1": ("lora", "dora"),
    # Qwen-Image reads the last layer of a 28-layer Qwen2.5-VL behind a system prompt: as
    # for FLUX.2, one new token row is no style, and no Qwen-Image trainer offers it.
    "qwenimage": ("lora", "dora"),
    "zimage": ("lora", "dora"),
}
# The LoRA layer sets (storage.training_bounds.LayerSet) each family offers; its module
# names for each are the family module's `lora_layer_sets`. LoCon adds convolutions, which
# only the SD UNets have.
LAYER_SETS_OF: dict[Family, tuple[LayerSet, ...]] = {
    "sd15": ("attention", "full", "locon"),
    "sdxl": ("attention", "full", "locon"),
    "flux2-klein": ("attention", "full"),
    "flux1": ("attention", "full"),
    "qwenimage": ("attention", "full"),
    "zimage": ("attention", "full"),
}


def check_layer_set(family: str, layers: str) -> None:
    """Refuse a layer set the family has no layers for, naming those it has."""
    fam = "sd15" if family == "sd2" else family
    offered = LAYER_SETS_OF.get(fam, ())  # type: ignore[call-overload]
    if layers not in offered:
        label = FAMILY_LABELS.get(family, family)
        allowed = " or ".join(f"layers={s}" for s in offered)
        raise MethodNotSupportedError(
            f"{label} has no convolutions for layers={layers} to train; use {allowed}"
        )


# The families whose text encoders a LoRA may train too (`/style train text_encoder=on`):
# the SD ones, whose CLIP encoders kohya, A1111 and ComfyUI all read `lora_te*` keys for.
# The transformer families' encoders are LLMs no trainer offers a LoRA on.
TEXT_ENCODER_LORA_FAMILIES: tuple[Family, ...] = ("sd15", "sdxl")


def check_text_encoder_lora(family: str) -> None:
    """Refuse a text-encoder LoRA on a family whose trainers and loaders have none."""
    fam = "sd15" if family == "sd2" else family
    if fam not in TEXT_ENCODER_LORA_FAMILIES:
        label = FAMILY_LABELS.get(family, family)
        raise MethodNotSupportedError(
            f"{label} has no text-encoder LoRA (SD1.5 and SDXL have one); leave text_encoder out"
        )


# Chat spells methods as `/style train method=...` takes them.
_CHAT_METHOD = {"textual_inversion": "ti"}


class MethodNotSupportedError(ValueError):
    """A training method the family cannot train; str() names the ones it can."""


def check_training_method(family: str, method: str) -> None:
    """Refuse a method the family does not support, naming those it does."""
    fam = "sd15" if family == "sd2" else family
    methods = TRAINING_METHODS.get(fam, ())  # type: ignore[call-overload]
    if method not in methods:
        label = FAMILY_LABELS.get(family, family)
        allowed = " or ".join(f"method={_CHAT_METHOD.get(m, m)}" for m in methods)
        raise MethodNotSupportedError(
            f"{label} base models cannot train {method.replace('_', ' ')}; use {allowed}"
        )


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
    "flux2-klein": GenerationDefaults(1024, 1024, 50, "Euler", 4.0),  # [flux2]
    "flux1": GenerationDefaults(1024, 1024, 28, "Euler", 3.5),  # [flux1]
    "qwenimage": GenerationDefaults(1328, 1328, 50, "Euler", 4.0),  # [qwen]
    "zimage": GenerationDefaults(1024, 1024, 50, "Euler", 5.0),  # [zimage]
}


@dataclass(frozen=True)
class BuiltinModel:
    """A base model that ships with Atelier (no config, no download)."""

    name: str
    family: Family
    native_side: int  # what it was made or trained for
    random: bool  # random weights: images are noise
    description: str
    # Its own sampler and CFG where the family's do not suit it (None: the family's).
    sampler: str | None = None
    cfg: float | None = None
    steps: int | None = None
    # The LoRA weight a trigger word applies (a `<lora:NAME:w>` tag says its own).
    trigger_weight: float = 1.0


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
            "tiny-flux2-klein",
            "flux2-klein",
            64,
            True,
            "FLUX.2 [klein] layout in miniature, random weights (tests)",
        ),
        BuiltinModel(
            "tiny-flux1",
            "flux1",
            64,
            True,
            "FLUX.1 [dev] layout in miniature, random weights (tests)",
        ),
        BuiltinModel(
            "tiny-qwenimage",
            "qwenimage",
            64,
            True,
            "Qwen-Image layout in miniature, random weights (tests)",
        ),
        BuiltinModel(
            "tiny-zimage", "zimage", 64, True, "Z-Image layout in miniature, random weights (tests)"
        ),
        BuiltinModel(
            "toy-sd15",
            "sd15",
            64,
            False,
            "Atelier's own small SD1.5-layout model pretrained on the toy world (shapes, "
            "colours, backgrounds at 64 px)",
            # Zero terminal SNR with trailing timesteps (gpu_runner/toyworld/model.py): plain
            # DPM++ 2M, whose sigmas end where the schedule does, not Karras' re-spacing.
            sampler="DPM++ 2M",
            # All three of shape, colour and background right in 96.7% of 90 samples at 12
            # steps, 93.3% at 25 (gpu_runner/toyworld/evaluate.py): more steps add nothing.
            steps=12,
            # Its styles train with output preservation (gpu_runner/jobs/train.py), so the
            # trigger is their only path and CFG 7 multiplies it: at weight 1 the stripes
            # wash out colour and shape (measured: colour right 30%), at 0.8 they show in
            # 90-95% of held-out prompts with colour right in 80-90%.
            trigger_weight=0.8,
        ),
    )
}


def trigger_weight(base_model: str) -> float:
    """The weight a style trained on `base_model` gets when its trigger word selects it."""
    builtin = BUILTIN_MODELS.get(base_model)
    return builtin.trigger_weight if builtin is not None else 1.0


# --- Device memory ------------------------------------------------------------------------
# Peak GPU memory (MiB) of a job on a real model in fp16/bf16, so that a runner claims only
# what fits in the memory it has free. Built-in models need nothing. bench/gpu.py prints the
# measured peaks of full-size architectures: correct these from its figures.
#
# [params] Parameter counts of the published configs, counted from diffusers'
#          UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel built from
#          them: SD1.5 UNet 859.5M + CLIP ViT-L/14 123.1M + VAE 83.7M; SDXL UNet 2567.5M +
#          CLIP ViT-L 123.1M + OpenCLIP ViT-bigG 694.7M + the same VAE. 2 bytes each.
# [lora]   Inputs + outputs of the to_q/to_k/to_v/to_out.0 layers (the training targets),
#          counted the same way: LoRA parameters per unit of rank.
# [adamw]  A trainable fp32 parameter holds its weight, gradient and AdamW's two moments.
# [kohya]  kohya-ss/sd-scripts README, SDXL training: an SDXL LoRA trains in 8 GB (10 GB
#          recommended) at batch 1 with gradient checkpointing, cached latents and text
#          embeddings, an 8-bit optimizer and dim 4-8: ~2.5 GB of activations beside the
#          5 GB UNet. Atelier also keeps the text encoders on the GPU and uses AdamW.
# [est]    Estimates (no GPU measurement yet): training without gradient checkpointing
#          keeps every block's activations, several times the checkpointed figure; SDXL
#          decodes with its VAE upcast to fp32 at 1024 px (force_upcast), which dominates a
#          generation's peak; cuBLAS/cuDNN workspaces and allocator fragmentation.
# [f2params] FLUX.2 [klein] 4B weights, counted by `bench/gpu.py --count-params` (the
#          published configs built on the meta device): Flux2Transformer2DModel 3,875.5M +
#          Qwen3-4B text encoder 4,022.5M + FLUX.2 VAE 84.0M, 2 bytes each, in MiB. (The
#          denoiser's share was 7,800, 3.9B x 2 B in decimal MB: 5.5% over.)
# [f2est]  FLUX.2 [klein] 4B, ESTIMATES not yet measured (no network or GPU when they were
#          written; bench/gpu.py should replace them): LoRA targets (Flux2Klein.lora_targets)
#          on 5 double blocks of 8 3072x3072 projections and 20 single blocks' 3072 -> 27648
#          fused projection; activations at 1024 px (4096 image + 512 text tokens) taken
#          as 1.6x SDXL's checkpointed figure, as community klein-4B trainers report 13+ GB
#          cards with 8-bit AdamW.
# [f1est]  FLUX.1 [dev]. Weights and LoRA counted from the published configs built on the
#          meta device (configs recalled, not downloaded): FluxTransformer2DModel 11,901.4M
#          (19 double + 38 single blocks, width 3072) + T5-v1.1-XXL encoder 4,762.3M + CLIP-L
#          123.1M + the 16-channel VAE 83.8M, 2 bytes each; LoRA inputs + outputs of
#          Flux1.lora_targets per unit of rank. Activations are ESTIMATES (no GPU here;
#          bench/gpu.py should replace them): checkpointed, the 57 blocks' boundary states
#          of 4608 tokens x 3072 at 2 B (~1.6 GB) plus one block recomputed with its 4x MLP,
#          rounded up; without checkpointing ~20 such tensors per block are kept. A
#          generation has no CFG pair (guidance is embedded): one pass per step, then the
#          VAE at 1024 px as SDXL's. Check: diffusers' README_flux.md says a rank-16 LoRA
#          "can exceed 40GB of VRAM" with every component trained; the concept preset
#          (rank 16, transformer only) comes to ~38.6 GB here.
# [qwest]  Qwen-Image, ESTIMATES (no GPU when they were written; bench/gpu.py should replace
#          them). Weights counted from configs built on the meta device (no download):
#          diffusers 0.42's QwenImageTransformer2DModel and AutoencoderKLQwenImage defaults
#          (Qwen-Image's sizes) 20,430.4M + 126.9M, Qwen2.5-VL-7B (sizes recalled: 28 layers
#          of 3584, vision tower 32 x 1280) 8,292.2M, at 2 bytes. LoRA: the 8 attention
#          projections (QwenImage.lora_targets), 3072 -> 3072 in each of 60 blocks, counted
#          the same way. Activations from kohya-ss/musubi-tuner docs/qwen_image.md, which
#          measured 42 GB for a 1024 px, batch-1 LoRA with gradient checkpointing and the
#          text encoder off the GPU: ~1.2 GB beside the 40.9 GB transformer, scaled to
#          1328 px (x1.68) with headroom. Without checkpointing: ~20 saved tensors of
#          6889 image tokens x 3072 in bf16 per block (MLP's 4x counted 4 times), 60 blocks.
# [zparams] Z-Image, counted from diffusers 0.42's ZImageTransformer2DModel defaults (the
#          released 6B config: dim 3840, 30 layers + 2 noise + 2 context refiner blocks, 30
#          heads, caption width 2560) built on the meta device: 6154.9M; the Qwen3-4B text
#          encoder as Qwen3Model (36 layers, hidden 2560, config recalled offline): 4022.5M;
#          the FLUX.1 VAE layout (16 channels, blocks 128-512): 83.8M. 2 bytes each. LoRA
#          targets (ZImage.lora_targets) in all 34 blocks: 136 3840x3840 projections.
# [zest]   Z-Image ESTIMATES, not measured (no GPU when written; bench/gpu.py should replace
#          them): at 1024 px a block sees 4096 image + up to 512 caption tokens of width 3840.
#          Checkpointed training keeps each of the 34 blocks' inputs (~35 MB each) and
#          recomputes one block (~0.7 GB); without checkpointing every block keeps its
#          activations (~730 MB: attention 10x the width, the 10240-wide SwiGLU 4x). A
#          generation's peak is the FLUX.1 VAE decoding 1024 px beside the CFG pair's tokens.
WEIGHTS_MB: dict[Family, int] = {
    "sd15": 2_035,  # [params]
    "sdxl": 6_616,  # [params]
    "flux2-klein": 15_225,  # [f2params]
    "flux1": 32_178,  # [f1est]
    "qwenimage": 55_026,  # [qwest]
    "zimage": 19_572,  # [zparams]
}
# The denoiser's share of WEIGHTS_MB: what a quantized base (NF4) shrinks.
DENOISER_MB: dict[Family, int] = {
    "sd15": 1_639,  # [params] 859.5M x 2 B, in MiB
    "sdxl": 4_897,  # [params] 2567.5M x 2 B, in MiB
    "flux2-klein": 7_392,  # [f2params] 3,875.5M x 2 B
    "flux1": 22_700,  # [f1est] 11,901.4M x 2 B
    "qwenimage": 38_968,  # [qwest] 20,430.4M x 2 B, in MiB
    "zimage": 11_740,  # [zparams] 6,154.9M x 2 B, in MiB
}
# [nf4] bitsandbytes NF4: 4 bits a weight plus one fp32 absmax per block of 64 weights
#       (Dettmers et al. 2023, "QLoRA"): 4.5 / 16 of bf16's bytes.
NF4_BYTES_RATIO = 4.5 / 16
LORA_PARAMS_PER_RANK: dict[Family, int] = {
    "sd15": 199_296,  # [lora]
    "sdxl": 1_451_520,  # [lora]
    "flux2-klein": 860_160,  # [f2est] 5 x 8 x 6144 + 20 x 30720
    "flux1": 3_385_344,  # [f1est] 19 x (8 x 6144 + 4 x 15360) + 38 x (3 x 6144 + 15360)
    "qwenimage": 2_949_120,  # [qwest] 60 x 8 x 6144
    "zimage": 1_044_480,  # [zparams] 136 x 7680
}
TRAINABLE_BYTES_PER_PARAM = 16  # [adamw] 4 B weight + 4 B gradient + 8 B moments
# Activations of one training image at the family's native side, with and without gradient
# checkpointing (key: family, checkpointing); they grow with the pixel count.
TRAIN_IMAGE_MB: dict[tuple[Family, bool], int] = {
    ("sd15", True): 800,  # [est] scaled from [kohya] by SD1.5's 4x fewer latent pixels
    ("sd15", False): 2_400,  # [est]
    ("sdxl", True): 2_500,  # [kohya]
    ("sdxl", False): 14_000,  # [est]
    ("flux2-klein", True): 4_000,  # [f2est]
    ("flux2-klein", False): 24_000,  # [f2est]
    ("flux1", True): 5_000,  # [f1est]
    ("flux1", False): 40_000,  # [f1est]
    ("qwenimage", True): 2_500,  # [qwest]
    ("qwenimage", False): 52_000,  # [qwest]
    ("zimage", True): 2_500,  # [zest]
    ("zimage", False): 25_000,  # [zest]
}
# One generated image at the native side: the UNet on the CFG pair, then the VAE decode.
GENERATE_IMAGE_MB: dict[Family, int] = {
    "sd15": 1_000,  # [est]
    "sdxl": 4_000,  # [est]
    "flux2-klein": 3_000,  # [f2est] the CFG pair's 4608 tokens, then the VAE at 1024 px
    "flux1": 3_000,  # [f1est]
    "qwenimage": 6_000,  # [qwest] true CFG's two passes of 6889 tokens, the video VAE at 1328
    "zimage": 3_000,  # [zest]
}
WORKSPACE_MB = 600  # [est]
# DoRA: peft rebuilds each adapted weight (W + BA) to take its norm on every forward, and
# keeps extra activations for the magnitude vector.
DORA_ACTIVATION_FACTOR = 1.3  # [est]
# Textual inversion back-propagates through the text encoder(s) (77 tokens a caption) and
# keeps private token tables: 49408 x (768 [+ 1280]) x 2 B [params].
TI_TEXT_IMAGE_MB: dict[Family, int] = {"sd15": 60, "sdxl": 250}  # [est]
TI_TABLES_MB: dict[Family, int] = {"sd15": 75, "sdxl": 195}  # [params]
# The training loop checkpoints the UNet for every method on CUDA (gpu_runner/training/loop.py
# `_setup`), textual inversion included.
TI_UNET_CHECKPOINTING = True
# Each preset's batch size and rank (gpu_runner/training/config.py; tests/test_memory.py
# checks they agree), for estimates made before a config exists: the bot's, at enqueue.
# Every preset trains at the family's native side.
PRESET_BATCH_RANK: dict[tuple[Family, str, str], tuple[int, int | None]] = {
    ("sd15", "lora", "style"): (4, 32),
    ("sd15", "lora", "concept"): (2, 16),
    ("sdxl", "lora", "style"): (1, 32),
    ("sdxl", "lora", "concept"): (1, 16),
    ("sd15", "dora", "style"): (4, 16),
    ("sd15", "dora", "concept"): (2, 8),
    ("sdxl", "dora", "style"): (1, 16),
    ("sdxl", "dora", "concept"): (1, 8),
    ("flux2-klein", "lora", "style"): (1, 32),
    ("flux2-klein", "lora", "concept"): (1, 16),
    ("flux2-klein", "dora", "style"): (1, 16),
    ("flux2-klein", "dora", "concept"): (1, 8),
    ("flux1", "lora", "style"): (1, 32),
    ("flux1", "lora", "concept"): (1, 16),
    ("flux1", "dora", "style"): (1, 16),
    ("flux1", "dora", "concept"): (1, 8),
    ("qwenimage", "lora", "style"): (1, 32),
    ("qwenimage", "lora", "concept"): (1, 16),
    ("qwenimage", "dora", "style"): (1, 16),
    ("qwenimage", "dora", "concept"): (1, 8),
    ("zimage", "lora", "style"): (1, 32),
    ("zimage", "lora", "concept"): (1, 16),
    ("zimage", "dora", "style"): (1, 16),
    ("zimage", "dora", "concept"): (1, 8),
    **{
        (f, "textual_inversion", p): (4, None)
        for f in FAMILIES
        if "textual_inversion" in TRAINING_METHODS[f]
        for p in ("style", "concept")
    },
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
    defaults = FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["sd15"])  # type: ignore[call-overload]
    builtin = BUILTIN_MODELS.get(base_model)
    if builtin is not None:
        side = builtin.native_side
        return GenerationDefaults(
            side,
            side,
            builtin.steps or defaults.steps,
            builtin.sampler or defaults.sampler,
            builtin.cfg if builtin.cfg is not None else defaults.cfg,
        )
    return defaults


def _pixels_ratio(family: Family, width: int, height: int) -> float:
    side = FAMILY_DEFAULTS[family].width
    return (width * height) / (side * side)


def generation_memory_mb(family: Family, *, width: int, height: int, count: int = 1) -> int:
    """Peak memory of one pipeline call making `count` images (all decoded at once)."""
    images = GENERATE_IMAGE_MB[family] * _pixels_ratio(family, width, height) * count
    return round(WEIGHTS_MB[family] + images + WORKSPACE_MB)


def training_memory_mb(
    base_model: str,
    family: str,
    *,
    method: str,
    resolution: int,
    batch_size: int,
    rank: int | None,
    gradient_checkpointing: bool = True,
    quantize: str = "none",
) -> int | None:
    """Peak memory of a training run (None for the built-in models); `quantize="nf4"`
    stores the denoiser's weights in NF4 [nf4]."""
    if base_model in BUILTIN_MODELS:
        return None
    fam: Family = family if family in FAMILIES else "sd15"  # type: ignore[assignment]  # SD2
    ti = method == "textual_inversion"
    checkpointed = gradient_checkpointing and (TI_UNET_CHECKPOINTING or not ti)
    per_image = TRAIN_IMAGE_MB[(fam, checkpointed)] * _pixels_ratio(fam, resolution, resolution)
    if method == "dora":
        per_image *= DORA_ACTIVATION_FACTOR
    if ti:
        per_image += TI_TEXT_IMAGE_MB[fam]
        state = TI_TABLES_MB[fam]
    else:
        params = LORA_PARAMS_PER_RANK[fam] * (rank or 0)
        state = params * TRAINABLE_BYTES_PER_PARAM / 2**20
    weights = WEIGHTS_MB[fam]
    if quantize == "nf4":
        weights -= DENOISER_MB[fam] * (1 - NF4_BYTES_RATIO)
    return round(weights + state + per_image * batch_size + WORKSPACE_MB)


def memory_needed_mb(
    kind: str,
    base_model: str,
    configured: Mapping[str, Any],
    *,
    width: int | None = None,
    height: int | None = None,
    count: int = 1,
    method: str | None = None,
    preset: str | None = None,
    rank: int | None = None,
    quantize: str = "none",
) -> int | None:
    """Device memory (MiB) a job needs, for the queue's claim filter: generations by size
    and count, trainings by method, preset and rank (the preset's when not given). None
    where no estimate applies (built-in models, captioning)."""
    if base_model in BUILTIN_MODELS:
        return None
    family = model_family(base_model, configured)
    side = FAMILY_DEFAULTS[family].width
    if kind == "generate":
        return generation_memory_mb(
            family, width=width or side, height=height or side, count=max(1, count)
        )
    if kind == "train":
        method = method or "lora"
        check_training_method(family, method)
        batch, preset_rank = PRESET_BATCH_RANK[(family, method, preset or "style")]
        return training_memory_mb(
            base_model,
            family,
            method=method,
            resolution=side,
            batch_size=batch,
            rank=rank if rank is not None and preset_rank is not None else preset_rank,
            quantize=quantize,
        )
    return None


# --- Sizes --------------------------------------------------------------------------------
# The step each family's pipeline draws sides in: the VAE's factor of 8, times 2 where the
# transformer reads latents in 2x2 patches ([qwen]; the FLUX and Z-Image pipelines' latents
# are 2 * (side // 16) high and wide). The pipelines floor any other side silently, so a size
# off this grid would be recorded as one the image does not have.
FAMILY_SIZE_MULTIPLE: dict[Family, int] = {
    "sd15": 8,
    "sdxl": 8,
    "flux2-klein": 16,
    "flux1": 16,
    "qwenimage": 16,
    "zimage": 16,
}


def size_multiple(family: str) -> int:
    """The step the family's sides go in (SD2 draws as SD1.5)."""
    return FAMILY_SIZE_MULTIPLE["sd15" if family == "sd2" else family]  # type: ignore[index]


class SizeOffGridError(ValueError):
    """A size the family's pipeline cannot draw; str() names the nearest sizes it can."""


def check_size(family: str, width: int, height: int) -> None:
    """Refuse a width or height off the family's grid, naming the sizes just below and above."""
    step = size_multiple(family)
    if not width % step and not height % step:
        return
    sides = (width, height)
    below = [side // step * step for side in sides]
    above = [math.ceil(side / step) * step for side in sides]
    raise SizeOffGridError(
        f"{FAMILY_LABELS.get(family, family)} draws sides in steps of {step}: use "
        f"size={below[0]}x{below[1]} or size={above[0]}x{above[1]}"
    )


# --- Aspect ratios --------------------------------------------------------------------------
# `/imagine ar=16:9` keeps the family's native pixel count at that shape. Ratios past 21:9
# leave the range the families were trained on (SDXL's buckets stop near 4:1 at 1024 px but
# compose badly there), so only these are accepted.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1), (4, 5), (5, 4), (3, 4), (4, 3), (2, 3), (3, 2),
    (9, 16), (16, 9), (1, 2), (2, 1), (9, 21), (21, 9),
)  # fmt: skip
# Full-size sides are multiples of this (SDXL's and SD1.5's usual buckets, on every family's
# grid) where the native side is one; built-in models (64 px) and Qwen-Image (1328 px) keep
# to their family's own step.
SIZE_MULTIPLE = 64
MIN_SIDE = 64


def aspect_size(
    base_model: str, configured: Mapping[str, Any], ratio: tuple[int, int]
) -> tuple[int, int]:
    """The family's native size reshaped to `ratio` (same pixel count, rounded to its grid)."""
    native = generation_defaults(base_model, configured)
    area = native.width * native.height
    step = size_multiple(model_family(base_model, configured))
    if native.width >= 512 and not native.width % SIZE_MULTIPLE:
        step = SIZE_MULTIPLE
    rw, rh = ratio
    width = (area * rw / rh) ** 0.5
    height = width * rh / rw
    # Never below the smallest side a generation takes (built-in models are 64 px).
    grow = max(1.0, MIN_SIDE / min(width, height))
    return round(width * grow / step) * step, round(height * grow / step) * step
