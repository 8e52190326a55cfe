"""A tiny FLUX.2 [klein]-shaped pipeline built in code: offline, deterministic, ~0.05 s.

Real module names (double-stream `transformer_blocks`, single-stream
`single_transformer_blocks`, a Qwen3 text encoder read at hidden layers 9/18/27, the
32-channel FLUX.2 VAE with its batch-norm latent statistics), so LoRA targets, exported
keys and pipeline code paths are the real model's. Weights are random: images are noise.
"""

from __future__ import annotations

from typing import Any

import torch

from gpu_runner.byte_symbols import byte_symbols

TEXT_HIDDEN = 16
# Flux2KleinPipeline stacks the text encoder's hidden states 9, 18 and 27: it needs 27 layers.
TEXT_LAYERS = 27
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template reduced to what Flux2KleinPipeline asks of it (one user turn, the
# assistant prompt, thinking off): a tokenizer made without files has no template at all.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def build_tiny_qwen_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer with no merges: every text tokenizes, byte by byte."""
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(dict.fromkeys([*byte_symbols(), *_SPECIALS]))}
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_flux2_klein_pipeline(seed: int = 0) -> Any:
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN,
                intermediate_size=TEXT_HIDDEN * 2, num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=512, tie_word_embeddings=True,
            )
        )  # fmt: skip
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=128,  # 32 VAE channels x the 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * TEXT_HIDDEN,  # three hidden layers, concatenated
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
            guidance_embeds=False,  # klein is not guidance-distilled
        )
        # GroupNorm's 32 groups need block widths divisible by 32; 4 blocks give factor 8.
        vae = AutoencoderKLFlux2(
            block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32,
            sample_size=64,
        )  # fmt: skip
    # Dynamic shifting as in FLUX.1's published scheduler_config (not checked against the
    # klein repository here, no network); the pipeline passes its own resolution-dependent mu.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    pipe = Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
