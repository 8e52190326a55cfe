"""The denoising objective: targets for epsilon / v-prediction, min-SNR weights, and the
fixed-noise validation batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep."""
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) loss weights, as in diffusers' training examples:
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


def target_for(
    noise_scheduler: object,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)  # type: ignore[attr-defined]
    raise ValueError(
        f"unsupported prediction type {prediction_type!r}: use epsilon or v_prediction"
    )


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * weights).mean()


@dataclass
class ValidationBatch:
    """Fixed latents, noise and timesteps for the held-out images: every measurement of base
    and trained weights sees exactly the same problems, so differences are the weights'."""

    image_idx: torch.Tensor  # (M,) index into the dataset
    latents: torch.Tensor  # (M, 4, h, w) scaled
    noise: torch.Tensor
    timesteps: torch.Tensor  # (M,)


def make_validation_batch(
    val_idx: list[int],
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    shift_factor: float,
    num_train_timesteps: int,
    seed: int,
    timesteps_per_image: int = 8,
) -> ValidationBatch:
    """Each held-out image at evenly spaced timesteps across the schedule, fixed noise."""
    gen = torch.Generator().manual_seed(seed + 15485863)
    k = timesteps_per_image
    ts = ((torch.arange(k, dtype=torch.float64) + 0.5) * num_train_timesteps / k).long()
    image_idx = torch.tensor(val_idx).repeat_interleave(k)
    timesteps = ts.repeat(len(val_idx))
    mean = latent_mean[image_idx].cpu()
    std = latent_std[image_idx].cpu()
    z = mean + std * torch.randn(mean.shape, generator=gen)
    latents = (z - shift_factor) * scaling_factor
    noise = torch.randn(latents.shape, generator=gen)
    device = latent_mean.device
    return ValidationBatch(image_idx, latents.to(device), noise.to(device), timesteps.to(device))
