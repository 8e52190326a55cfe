"""The denoising objective: targets for epsilon / v-prediction, min-SNR weights, and the
fixed-noise validation batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


class Objective(ABC):
    """What a family trains its denoiser to do: how timesteps are drawn, how latents are
    noised at them, what the prediction is compared with, and how samples are weighted.
    Timesteps are drawn on the caller's CPU generator, so a run is the same on any device."""

    prediction_type: str

    @abstractmethod
    def sample_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` training timesteps (CPU)."""

    @abstractmethod
    def validation_timesteps(self, count: int) -> torch.Tensor:
        """`count` timesteps evenly spread over the schedule, for the fixed validation batch."""

    @abstractmethod
    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor: ...

    @abstractmethod
    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor: ...

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (None: plain MSE)."""
        return None


class DiffusionObjective(Objective):
    """DDPM training as SD1.5/SDXL were trained: uniform integer timesteps, epsilon or
    v-prediction targets, optional min-SNR-gamma weights (diffusers'
    train_text_to_image_lora.py)."""

    def __init__(
        self, scheduler_config: Any, prediction_type: str | None, min_snr_gamma: float | None,
        device: torch.device, timesteps: tuple[int, int] = (0, 1000),
    ) -> None:  # fmt: skip
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = prediction_type or self.scheduler.config.prediction_type
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.min_snr_gamma = min_snr_gamma
        low, high = timesteps
        self.trained = (min(low, self.num_timesteps - 1), min(high, self.num_timesteps))

    def sample_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        low, high = self.trained
        return torch.randint(low, high, (count,), generator=generator)

    def validation_timesteps(self, count: int) -> torch.Tensor:
        k = count
        return ((torch.arange(k, dtype=torch.float64) + 0.5) * self.num_timesteps / k).long()

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return target_for(self.scheduler, latents, noise, timesteps, self.prediction_type)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if not self.min_snr_gamma:
            return None
        return min_snr_weights(
            self.alphas_cumprod, timesteps, self.min_snr_gamma, self.prediction_type
        )


class FlowMatchObjective(Objective):
    """Rectified-flow training as diffusers' FLUX LoRA examples do it
    (examples/dreambooth/train_dreambooth_lora_flux2_klein.py, weighting_scheme "none"):
    a uniform draw indexes the scheduler's own (possibly shifted) timestep table,
    x_t = (1 - sigma) x + sigma noise with sigma = t / 1000, and the model predicts the
    velocity noise - x. Timesteps stay on the scheduler's 0-1000 scale."""

    prediction_type = "flow_matching"

    def __init__(self, scheduler_config: Any, timesteps: tuple[int, int] = (0, 1000)) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_timesteps = int(scheduler.config.num_train_timesteps)
        self.table = scheduler.timesteps.float().cpu()
        low, high = timesteps
        inside = self.table[(self.table >= low) & (self.table <= high)]
        # A range narrower than the table's spacing keeps the entry nearest its middle.
        nearest = self.table[(self.table - (low + high) / 2).abs().argmin()].view(1)
        self.trained_table = inside if len(inside) else nearest

    @staticmethod
    def _at(table: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The entries of `table` at shares `u` (0-1) of its length."""
        return table[(u * len(table)).long().clamp(0, len(table) - 1)]

    def sample_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return self._at(self.trained_table, torch.rand(count, generator=generator))

    def validation_timesteps(self, count: int) -> torch.Tensor:
        return self._at(self.table, (torch.arange(count, dtype=torch.float64) + 0.5) / count)

    def _sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = timesteps.to(like.device, torch.float32) / self.num_timesteps
        return sigma.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        sigma = self._sigma(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return noise - latents


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * weights).mean()


def offset_noise(noise: torch.Tensor, offset: float, gen: torch.Generator) -> torch.Tensor:
    """Offset noise (Guttenberg 2023, crosslabs; kohya's --noise_offset): one extra normal
    draw per image and channel, times `offset`, added everywhere in that channel, so the
    model learns to move an image's mean (very dark or bright styles)."""
    n, c = noise.shape[:2]
    shift = torch.randn((n, c, *([1] * (noise.ndim - 2))), generator=gen)
    return noise + offset * shift.to(noise.device)


@dataclass
class ValidationBatch:
    """Fixed latents, noise and timesteps for the held-out images: every measurement of base
    and trained weights sees exactly the same problems, so differences are the weights'."""

    image_idx: torch.Tensor  # (M,) index into the dataset
    latents: torch.Tensor  # (M, 4, h, w) scaled
    noise: torch.Tensor
    timesteps: torch.Tensor  # (M,)


def validation_generator(seed: int) -> torch.Generator:
    """The one generator every validation batch of a run draws its fixed noise from."""
    return torch.Generator().manual_seed(seed + 15485863)


def make_validation_batch(
    val_idx: list[int],
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scale: Callable[[torch.Tensor], torch.Tensor],
    objective: Objective,
    gen: torch.Generator,
    timesteps_per_image: int = 8,
) -> ValidationBatch:
    """Each validation image (one bucket: `latent_mean` row i is image val_idx[i]) at evenly
    spaced timesteps across the schedule, fixed noise from `gen`; `scale` turns VAE samples
    into the denoiser's latents (the family's shift and scale)."""
    k = timesteps_per_image
    ts = objective.validation_timesteps(k)
    image_idx = torch.tensor(val_idx).repeat_interleave(k)
    timesteps = ts.repeat(len(val_idx))
    mean = latent_mean.repeat_interleave(k, dim=0).cpu()
    std = latent_std.repeat_interleave(k, dim=0).cpu()
    z = mean + std * torch.randn(mean.shape, generator=gen)
    latents = scale(z)
    noise = torch.randn(latents.shape, generator=gen)
    device = latent_mean.device
    return ValidationBatch(image_idx, latents.to(device), noise.to(device), timesteps.to(device))
