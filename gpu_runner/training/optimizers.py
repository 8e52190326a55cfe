"""The optimizer a run trains with (`TrainConfig.optimizer`): AdamW, bitsandbytes' 8-bit
AdamW on CUDA, or Prodigy, which needs no learning rate."""

from __future__ import annotations

from typing import Any

import torch

# Prodigy's own learning rate is a multiplier of the step size it estimates: 1.0 is what
# its authors and every trainer's Prodigy preset use (prodigyopt README; kohya, OneTrainer).
PRODIGY_LR = 1.0


class OptimizerError(RuntimeError):
    """The optimizer cannot run here; the message says which one to use instead."""


def make_optimizer(
    name: str,
    params: list[torch.nn.Parameter],
    config: Any,
    device: torch.device,
    text_params: list[torch.nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer over the denoiser's adapter `params` and, in a group of their own at
    the config's `text_encoder_lr`, a text encoder's (`text_params`)."""
    lr = PRODIGY_LR if name == "prodigy" else config.learning_rate
    groups: list[dict[str, Any]] = [{"params": params, "lr": lr}]
    if text_params:
        # Prodigy estimates the step size itself; its multiplier stays at 1 for both groups.
        text_lr = PRODIGY_LR if name == "prodigy" else config.text_encoder_lr
        groups.append({"params": text_params, "lr": text_lr})
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise OptimizerError(
                f"optimizer=adamw8bit keeps its state in bitsandbytes' 8-bit CUDA kernels, and "
                f"this runner trains on {device.type}: train with optimizer=adamw (or prodigy)"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(  # type: ignore[no-any-return]
            groups, lr=lr, weight_decay=config.weight_decay
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        # safeguard_warmup and bias correction: the prodigyopt README's advice for diffusion
        # models, where a warmup follows.
        return Prodigy(  # type: ignore[no-any-return]
            groups,
            lr=lr,
            weight_decay=config.weight_decay,
            safeguard_warmup=config.warmup_steps > 0,
            use_bias_correction=True,
        )
    raise OptimizerError(f"unknown optimizer {name!r}: use adamw, adamw8bit or prodigy")
