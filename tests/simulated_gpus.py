"""A CUDA machine as torch.cuda reports it, for the device-choice tests on CPU-only hosts.

Only what torch tells about devices is simulated (how many, compute capability, memory, which
one is current); Atelier's own code runs unchanged. `empty_cache_on` records which device was
current at each `empty_cache()`, and `set_device_calls` every `set_device`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

GIB = 1 << 30


@dataclass
class SimulatedGpus:
    capability: list[tuple[int, int]]
    total: list[int]
    free: list[int]
    current: int = 0
    set_device_calls: list[int] = field(default_factory=list)
    empty_cache_on: list[int] = field(default_factory=list)

    def index(self, device: Any = None) -> int:
        import torch

        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        parsed = torch.device(device)
        return self.current if parsed.index is None else parsed.index

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch

        cuda = torch.cuda

        def set_device(device: Any) -> None:
            self.current = self.index(device)
            self.set_device_calls.append(self.current)

        def properties(device: Any = None) -> SimpleNamespace:
            i = self.index(device)
            major, minor = self.capability[i]
            return SimpleNamespace(
                name=f"simulated {major}.{minor}",
                major=major,
                minor=minor,
                total_memory=self.total[i],
            )

        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: len(self.capability))
        monkeypatch.setattr(
            cuda, "get_device_capability", lambda d=None: self.capability[self.index(d)]
        )
        monkeypatch.setattr(cuda, "get_device_properties", properties)
        # torch's own answer counts emulation (and asks the current device): what made T4s
        # train in slow bf16.
        monkeypatch.setattr(cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(cuda, "set_device", set_device)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(
            cuda,
            "mem_get_info",
            lambda d=None: (self.free[self.index(d)], self.total[self.index(d)]),
        )
        monkeypatch.setattr(cuda, "memory_reserved", lambda d=None: 0)
        monkeypatch.setattr(cuda, "memory_allocated", lambda d=None: 0)
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.empty_cache_on.append(self.current))


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a machine: `gpus(capabilities=[A100, T4], total_gib=[80, 16], free_gib=...)`."""

    def make(
        capabilities: list[tuple[int, int]],
        total_gib: list[int] | None = None,
        free_gib: list[int] | None = None,
    ) -> SimulatedGpus:
        total = [g * GIB for g in (total_gib or [24] * len(capabilities))]
        free = [g * GIB for g in free_gib] if free_gib else list(total)
        machine = SimulatedGpus(list(capabilities), total, free)
        machine.install(monkeypatch)
        monkeypatch.delenv("ATELIER_DEVICE", raising=False)
        monkeypatch.delenv("ATELIER_DTYPE", raising=False)
        return machine

    return make
