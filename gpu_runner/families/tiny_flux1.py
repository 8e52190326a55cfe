"""A tiny FLUX.1 [dev]-shaped pipeline built in code: offline, deterministic, ~0.05 s.

Real module names (double-stream `transformer_blocks` and single-stream
`single_transformer_blocks` with their separate q/k/v, `proj_mlp` and per-block
modulation, the guidance embedding of the guidance-distilled dev model, CLIP-L for the
pooled vector and T5 for the tokens, the 16-channel VAE with FLUX.1's shift and scale), so
LoRA targets, exported keys and pipeline code paths are the real model's. Two blocks of
each kind, so block indices above 0 are exercised. Weights are random: images are noise.
"""

from __future__ import annotations

import string
from typing import Any

import torch

from gpu_runner.tiny_models import build_tiny_tokenizer, text_config

T5_HIDDEN = 32
# A few whole words become one T5 piece each; any other printable character is its own.
_T5_WORDS = ("a", "the", "of", "in", "photo", "style", "red", "blue", "cat", "harbour")


def build_tiny_t5_tokenizer() -> Any:
    """A T5 (unigram) tokenizer made with no files: `<pad>`, `</s>`, `<unk>` first as in T5,
    then word pieces and single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in _T5_WORDS]
    chars = [c for c in string.printable if not c.isspace()]
    pieces += [(c, -3.0) for c in chars] + [(f"▁{c}", -3.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_flux1_pipeline(seed: int = 0) -> Any:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(tokenizer, "quick_gelu"))
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2), d_model=T5_HIDDEN, d_kv=16, d_ff=T5_HIDDEN * 2,
                num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                dropout_rate=0.0,  # a model built in code is in train mode: no random drops
            )
        )  # fmt: skip
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 VAE channels x the 2x2 patch
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_HIDDEN,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=True,  # dev is guidance-distilled (schnell is not)
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
        # GroupNorm's 32 groups need block widths divisible by 32; 4 blocks give factor 8.
        # No quant convs, and FLUX.1's latent shift and scale (its VAE's config).
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
            layers_per_block=1, latent_channels=16, sample_size=64, scaling_factor=0.3611,
            shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
    # FLUX.1 [dev]'s scheduler_config: the pipeline passes its resolution-dependent mu.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
