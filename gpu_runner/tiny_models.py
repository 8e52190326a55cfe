"""Tiny SD1.5- and SDXL-shaped pipelines built in code: offline, deterministic, sub-second.

They serve the tests, CI and the first-run demo. Weights are random, so images are
noise, but module names follow the real models so kohya keys, LoRA targets and
pipeline code paths are the same as with real weights (see DESIGN.md, "Models").
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from gpu_runner.byte_symbols import byte_symbols

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
TEXT_HIDDEN = 32
MAX_TOKENS = 77

# A few whole-word merges so common test words become single tokens; everything else
# falls back to the 512 byte-level symbols, so any text tokenizes.
_WORDS = ("a", "an", "the", "of", "in", "photo", "style", "painting", "red", "blue", "cat")

# Real SD1.5 / SDXL scheduler settings (from their model repos' scheduler_config.json).
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def build_tiny_tokenizer(pad_token: str = EOS, words: tuple[str, ...] = _WORDS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer made with no files (transformers 5 accepts vocab/merges directly).
    Each of `words` becomes one token; any other text falls back to byte-level symbols."""
    symbols = byte_symbols()
    tokens: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words:
        # Merge left to right: "c a", "ca t</w>" ... ending in the whole word + "</w>".
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merged = current + nxt
            if (current, nxt) not in merges:
                merges.append((current, nxt))
            if merged not in tokens:
                tokens.append(merged)
            current = merged
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = MAX_TOKENS
    return tok


def text_config(tokenizer: CLIPTokenizer, act: str) -> CLIPTextConfig:
    eos_id = tokenizer.eos_token_id
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_HIDDEN * 4,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _tiny_vae() -> AutoencoderKL:
    # Same four blocks as the UNet; 3 downsamples give SD's factor of 8.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )


def build_tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5 layout in miniature: 3 cross-attention down blocks + 1 plain, 32-dim text."""
    # fork_rng keeps the caller's global torch RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8,
        )
        vae = _tiny_vae()
        tokenizer = build_tiny_tokenizer()
        text_encoder = CLIPTextModel(text_config(tokenizer, "quick_gelu"))
    scheduler = PNDMScheduler(
        **_SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL layout in miniature: plain + 2 cross-attention blocks, two text encoders,
    "text_time" added conditioning (pooled text + 6 size/crop ids)."""
    time_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            # Both encoders' penultimate hidden states are concatenated.
            cross_attention_dim=TEXT_HIDDEN * 2,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * time_dim,
        )
        vae = _tiny_vae()
        tokenizer = build_tiny_tokenizer()
        tokenizer_2 = build_tiny_tokenizer(pad_token="!")  # real SDXL's second tokenizer pads "!"
        text_encoder = CLIPTextModel(text_config(tokenizer, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, "gelu"))
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS, steps_offset=1, timestep_spacing="leading", interpolation_type="linear"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 70),
    "yellow": (230, 200, 40),
    "purple": (140, 50, 180),
    "orange": (240, 130, 30),
}


def demo_dataset(n: int = 12, size: int = 64, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """A small learnable "style": diagonal two-colour stripes with a disc, captioned by colour.

    Every image shares the structure (stripe angle, period, a disc) while colours and
    positions vary, so a LoRA has something consistent to learn and held-out images test it.
    """
    rng = np.random.default_rng(seed)
    names = list(_COLOURS)
    yy, xx = np.mgrid[0:size, 0:size]
    out: list[tuple[Image.Image, str]] = []
    for i in range(n):
        fg, bg = names[i % len(names)], names[(i * 5 + 1) % len(names)]
        if fg == bg:
            bg = names[(names.index(fg) + 1) % len(names)]
        period = size / 4
        phase = rng.uniform(0, period)
        stripes = ((xx + yy + phase) % period) < period / 2
        img = np.where(stripes[..., None], _COLOURS[fg], _COLOURS[bg]).astype(np.float32)
        cx, cy = rng.uniform(size * 0.3, size * 0.7, 2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (size * 0.18) ** 2
        img[disc] = (245, 245, 245)
        img += rng.normal(0, 4, img.shape)
        pixels = np.clip(img, 0, 255).astype(np.uint8)
        out.append((Image.fromarray(pixels, "RGB"), f"{fg} and {bg} stripes with a white disc"))
    return out
