"""What a person may set for a training run: the methods, the presets and the safe bounds.

The bot reads this to refuse `/style train ... rank=500` in chat, before anything is
queued; the runner validates every training config against the same table. It lives in
storage because that is the one package both processes import (the bot never imports the
runner). Plain data, no torch.
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["lora", "dora", "textual_inversion"]
Preset = Literal["style", "concept"]  # one preset per kind of style (storage.models.StyleKind)

METHODS: tuple[Method, ...] = get_args(Method)
PRESETS: tuple[Preset, ...] = get_args(Preset)
# How LoRA/DoRA training stores the frozen base: as loaded, or its linear layers in 4-bit
# NormalFloat (QLoRA; gpu_runner/training/quantize.py), for big models on small cards.
Quantization = Literal["none", "nf4"]
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)
# The optimizer: AdamW (every trainer's default); bitsandbytes' 8-bit AdamW (CUDA only), a
# quarter of AdamW's state memory; Prodigy (Mishchenko & Defazio 2023), which estimates its
# own step size, so a run needs no learning rate.
Optimizer = Literal["adamw", "adamw8bit", "prodigy"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
# The layers a LoRA trains: attention only; attention, feed-forwards and projections
# (kohya's "full" LoRA); those and the convolutions too (LoCon, SD families only). Each
# family names its modules for each (gpu_runner/families, `lora_layer_sets`).
LayerSet = Literal["attention", "full", "locon"]
LAYER_SETS: tuple[LayerSet, ...] = get_args(LayerSet)

# Safe bounds for anything a person may override: (low, high), both inclusive.
# Wide enough for real use, narrow enough that a typo cannot OOM a GPU or run for days.
# Settings that count things take whole numbers only.
WHOLE_BOUNDS: dict[str, tuple[int, int]] = {
    "rank": (1, 128),
    "steps": (1, 20_000),
    "resolution": (64, 2048),
    "batch_size": (1, 64),
    "warmup_steps": (0, 5_000),
    "checkpoint_every": (1, 20_000),
    "validate_every": (1, 20_000),
    "sample_steps": (1, 100),
    "num_vectors": (1, 16),
    "keep_checkpoints": (1, 100),
    "gradient_accumulation": (1, 16),
    "keep_tags": (0, 32),
    "epochs": (1, 1_000),
    "min_timestep": (0, 999),
    "max_timestep": (1, 1_000),
}
REAL_BOUNDS: dict[str, tuple[float, float]] = {
    "alpha": (0.5, 256),
    "learning_rate": (1e-6, 1e-2),
    "caption_dropout": (0.0, 0.5),
    "min_snr_gamma": (0.0, 20.0),  # 0 turns min-SNR weighting off
    "val_fraction": (0.05, 0.5),
    "max_grad_norm": (0.01, 100.0),
    "weight_decay": (0.0, 0.5),
    # Crosslabs' offset noise (kohya's --noise_offset): 0.05-0.1 is the range trainers use.
    "noise_offset": (0.0, 0.2),
    # Output preservation's weight (gpu_runner/training/config.py); ai-toolkit's differential
    # output preservation uses 1. 0 turns it off.
    "output_preservation": (0.0, 4.0),
}
BOUNDS: dict[str, tuple[float, float]] = {**WHOLE_BOUNDS, **REAL_BOUNDS}
