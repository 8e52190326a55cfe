"""A tiny Z-Image-shaped pipeline built in code: offline, deterministic, well under a second.

Real module names (the single-stream `layers`, the `noise_refiner` and `context_refiner`
blocks, `attention.to_q/to_k/to_v/to_out.0`, `feed_forward.w1/w2/w3`, `adaLN_modulation`, a
Qwen3 text encoder read at its second-to-last hidden layer, a 16-channel FLUX-style VAE with
its shift and scale), so LoRA targets, exported keys and pipeline code paths are the real
model's. Weights are random: images are noise.
"""

from __future__ import annotations

from typing import Any

import torch

from gpu_runner.families.tiny_flux2_klein import build_tiny_qwen_tokenizer

TEXT_HIDDEN = 16
# ComfyUI's Z-Image key map slices the fused native qkv into three `dim`-wide parts, which
# holds only while every head has its own key/value (as the real model: 30 heads, 30 kv).
HEADS = 2
DIM = 32  # head_dim 16


def build_tiny_zimage_pipeline(seed: int = 0) -> Any:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tiny_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Qwen3Model (no LM head), as Z-Image's text_encoder and diffusers' Z-Image LoRA
        # example load it; the pipeline reads hidden_states[-2], so 2 layers are enough.
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN,
                intermediate_size=TEXT_HIDDEN * 2, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=512,
            )
        )  # fmt: skip
        transformer = ZImageTransformer2DModel(
            in_channels=16,
            dim=DIM,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=HEADS,
            n_kv_heads=HEADS,
            cap_feat_dim=TEXT_HIDDEN,
            axes_dims=[4, 6, 6],  # sums to head_dim
        )
        # GroupNorm's 32 groups need block widths divisible by 32; 4 blocks give factor 8.
        # Shift and scale are the FLUX.1 VAE's, which Z-Image uses.
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=16,
            sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
    # Z-Image's published scheduler_config as recalled offline (static shift 3, no dynamic
    # shifting; not re-read here, no network): the pipeline's own sigmas then shift by 3.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
