"""The `toy-sd15` architecture and its shipped weights.

The UNet keeps SD1.5's block layout (3 cross-attention down blocks + 1 plain, 2 layers per
block), so LoRA module names and kohya keys are SD1.5's. The VAE keeps SD's factor of 8 but
has 16 latent channels (as FLUX's and SD3's do): a 4-channel factor-8 VAE at 64 px turned
red into orange in the planning spike, and colour is half of what the toy world asks.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from gpu_runner.families.base import BuiltinBuildError
from gpu_runner.lora_import import file_sha256
from gpu_runner.tiny_models import MAX_TOKENS, TEXT_HIDDEN, build_tiny_tokenizer, text_config
from toyworld.scenes import BACKGROUNDS, COLOURS, SHAPES, SIDE

WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = "manifest.json"
COMPONENTS = ("unet", "vae", "text_encoder")
LATENT_CHANNELS = 16
# The word pretraining captions outlined scenes with: a look the base knows by name, as
# real models know "line art" (textual inversion can only find looks the base can draw).
OUTLINED_WORD = "outlined"
# Every word of the toy world's captions is one token; anything else (trigger words
# included) falls back to byte-level symbols, as rare words do in real CLIP.
VOCABULARY = ("a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS, OUTLINED_WORD)
# Weights made before OUTLINED_WORD was one token (their manifests name no vocabulary).
FIRST_VOCABULARY = VOCABULARY[:-1]
# SD1.5's betas (its model repo's scheduler_config.json), rescaled to zero terminal SNR with
# v-prediction and trailing timesteps (Lin et al. 2024, "Common Diffusion Noise Schedules and
# Sample Steps are Flawed"): with 8x8x16 latents SD's last step still carries enough signal
# that an epsilon model read the background from the noise and ignored the prompt there
# (measured: background at chance, 36%, after 1000 steps); at zero SNR only the text is left.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
NOISE_SCHEDULE = {**SD_BETAS, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}


class ToyWeightsError(BuiltinBuildError):
    """The shipped weights are missing or do not match their manifest."""


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIDE // 8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
    )


def build_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        sample_size=SIDE,
        scaling_factor=scaling_factor,
    )


def build_tokenizer(words: tuple[str, ...] = VOCABULARY) -> CLIPTokenizer:
    return build_tiny_tokenizer(words=words)


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(text_config(tokenizer, "quick_gelu"))


def build_scheduler() -> DPMSolverMultistepScheduler:
    # steps_offset only shifts "leading" spacing; 1 is what SD pipelines expect to see.
    return DPMSolverMultistepScheduler(
        **NOISE_SCHEDULE, timestep_spacing="trailing", steps_offset=1
    )


def assemble(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_manifest(folder: Path = WEIGHTS_DIR) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ToyWeightsError(
            f"the toy-sd15 weights are missing ({path}); reinstall Atelier, or make them with "
            f"`python -m gpu_runner.toyworld.pretrain --out {folder}`"
        )
    return json.loads(path.read_text())


def verify(folder: Path = WEIGHTS_DIR) -> dict:
    """Check every weight file against the manifest's sha256; returns the manifest."""
    manifest = read_manifest(folder)
    for name in COMPONENTS:
        entry = manifest["files"][name]
        path = folder / entry["file"]
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise ToyWeightsError(
                f"toy-sd15 weight file {path} is missing or does not match its manifest; "
                "reinstall Atelier or rerun the command recorded in the manifest"
            )
    return manifest


def vocabulary_of(manifest: dict) -> tuple[str, ...]:
    """The whole words the weights' text encoder was trained with (its token table's)."""
    return tuple(manifest.get("vocabulary", FIRST_VOCABULARY))


def build_toy_sd15_pipeline(folder: Path = WEIGHTS_DIR) -> StableDiffusionPipeline:
    """The pretrained toy model, in fp32 on the CPU (weights are shipped as fp16)."""
    manifest = verify(folder)
    tokenizer = build_tokenizer(vocabulary_of(manifest))
    unet = build_unet()
    vae = build_vae(scaling_factor=float(manifest["vae_scaling_factor"]))
    text_encoder = build_text_encoder(tokenizer)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        state = load_file(folder / manifest["files"][name]["file"])
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        module.eval()
    return assemble(unet, vae, text_encoder, tokenizer)


__all__ = ["MAX_TOKENS", "build_toy_sd15_pipeline", "verify"]
