"""A tiny Qwen-Image-shaped pipeline built in code: offline, deterministic, well under 1 s.

Real module names (the MMDiT `transformer_blocks` with separate image/text q/k/v and
`img_mlp`/`txt_mlp`, a Qwen2.5-VL text encoder whose last hidden layer conditions it, the
16-channel causal video VAE with its published latent statistics, the published scheduler
config), so LoRA targets, exported keys and pipeline code paths are the real model's.
Weights are random: images are noise.
"""

from __future__ import annotations

from typing import Any

import torch

from gpu_runner.families.tiny_flux2_klein import build_tiny_qwen_tokenizer

TEXT_HIDDEN = 16
HEAD_DIM = 8
# Qwen/Qwen-Image scheduler/scheduler_config.json (recalled, not re-read offline; mflux's
# Qwen scheduler carries the same numbers): resolution-dependent exponential time shift.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


def _text_encoder(vocab_size: int) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_HIDDEN * 2, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
            # Multimodal RoPE's three sections (time, height, width) fill half a head.
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]},
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN, "fullatt_block_indexes": [0],
        },
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwenimage_pipeline(seed: int = 0) -> Any:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = build_tiny_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(len(tokenizer))
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 VAE channels x the 2x2 patch
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),  # frame, height, width: sums to attention_head_dim
        )
        # Three spatial downsamples (factor 8) as the real VAE; its RMS norms have no group
        # constraint on the width. The latent statistics are the published defaults.
        vae = AutoencoderKLQwenImage(base_dim=8, num_res_blocks=1)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
