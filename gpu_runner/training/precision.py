"""Device-dependent numerics: fp32 on CPU; autocast (bf16, else fp16 + grad scaler) on CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gpu_runner.devices import has_native_bf16


@dataclass(frozen=True)
class Precision:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32 maths
    use_grad_scaler: bool  # fp16 gradients underflow without loss scaling

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.use_grad_scaler else None

    @property
    def label(self) -> str:
        return "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).split(".")[-1]


def choose_precision(device: torch.device, setting: str) -> Precision:
    """`setting`: auto | no | fp16 | bf16. Only CUDA gets mixed precision; CPU/MPS train in
    fp32 (CPU autocast is slower than fp32 for these sizes, and MPS lacks a grad scaler).

    auto picks bf16 only where `device` (not whichever GPU is current) computes it natively;
    emulated bf16 on a T4/V100/RTX 20xx is several times slower than fp16 + grad scaler.
    """
    if device.type != "cuda" or setting == "no":
        return Precision(device, None, False)
    if setting == "bf16" or (setting == "auto" and has_native_bf16(device)):
        return Precision(device, torch.bfloat16, False)
    return Precision(device, torch.float16, True)
