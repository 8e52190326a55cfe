"""Which device the runner uses and in what precision.

One runner serves one device: CUDA when present, then Apple's MPS, else the CPU; a config
value or ATELIER_DEVICE overrides it. Everything here asks about the chosen device by its
index: torch's bare calls (is_bf16_supported, empty_cache, mem_get_info()) ask the
*current* device, which is cuda:0 unless `pin_device` made the chosen one current.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

DeviceName = Literal["cuda", "mps", "cpu"]
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class DeviceError(ValueError):
    """A device or dtype that cannot be used here; str() says which ones can."""


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda", "cuda:1", "mps" or "cpu"
    dtype: torch.dtype

    @property
    def kind(self) -> DeviceName:
        kind = self.device.split(":")[0]
        assert kind in ("cuda", "mps", "cpu")
        return kind  # type: ignore[return-value]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def pick_device(override: str | None = None) -> str:
    """`override` (or ATELIER_DEVICE) if given and usable, else cuda > mps > cpu."""
    wanted = (override or os.environ.get("ATELIER_DEVICE") or "").strip().lower()
    if not wanted or wanted == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    kind = wanted.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device '{wanted}' was asked for but this torch has no CUDA GPU; "
                "use 'cpu' or install a CUDA build of torch"
            )
        index = int(wanted.split(":")[1]) if ":" in wanted else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device '{wanted}' does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        return wanted
    if kind == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' was asked for but MPS is not available; use 'cpu'")
        return "mps"
    if kind == "cpu":
        return "cpu"
    raise DeviceError(f"unknown device '{wanted}'; use auto, cuda, cuda:N, mps or cpu")


def has_native_bf16(device: str | torch.device) -> bool:
    """Whether this CUDA device computes bf16 in hardware (compute capability 8.0+: Ampere,
    Ada, Hopper and later; and AMD's ROCm cards).

    Not `torch.cuda.is_bf16_supported()`: it also counts emulation, so a T4, V100 or RTX
    20xx (7.x) would get bf16 that runs several times slower than fp16, and it asks the
    current device rather than the chosen one.
    """
    if torch.version.hip:
        return True
    major, _minor = torch.cuda.get_device_capability(torch.device(device))
    return major >= 8


def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA cards that have it natively (fp16 otherwise); fp32 on CPU and MPS.

    MPS gets fp32 because SD's VAE overflows in fp16 there (black or NaN images) and bf16
    needs recent macOS; fp16 is an explicit opt-in.
    """
    if device.startswith("cuda"):
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return torch.float32


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.strip().lower()]
    except KeyError:
        raise DeviceError(f"unknown dtype '{name}'; use fp32, fp16 or bf16") from None


def resolve_device(device: str | None = None, dtype: str | None = None) -> DeviceChoice:
    """The runner's device and dtype from config (None or 'auto' picks automatically)."""
    chosen = pick_device(device)
    wanted = dtype or os.environ.get("ATELIER_DTYPE")
    torch_dtype = parse_dtype(wanted) if wanted and wanted != "auto" else default_dtype(chosen)
    if chosen == "cpu" and torch_dtype == torch.float16:
        raise DeviceError("fp16 is not supported on the CPU here; use fp32 or bf16")
    return DeviceChoice(device=chosen, dtype=torch_dtype)


def cuda_index(choice: DeviceChoice) -> int:
    """The CUDA device's index ("cuda" alone means 0, as torch reads it with nothing pinned)."""
    index = choice.torch_device.index
    return 0 if index is None else index


def pin_device(choice: DeviceChoice) -> None:
    """Make the chosen GPU the process's current one, once at runner start.

    Without it a `cuda:1` runner still opens a context on GPU 0 (about 300-500 MB there)
    and every bare torch call (empty_cache, streams, generators) lands on GPU 0.
    """
    if choice.kind == "cuda":
        torch.cuda.set_device(cuda_index(choice))


def device_memory_bytes(choice: DeviceChoice) -> int:
    """All the memory of the device: the GPU's, or RAM on CPU/MPS (which share it)."""
    if choice.kind == "cuda":
        return int(torch.cuda.get_device_properties(cuda_index(choice)).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_memory_bytes(choice: DeviceChoice) -> int | None:
    """Memory a new allocation on the GPU can get now: the driver's free memory plus what
    torch's caching allocator holds unused (ours to reuse). Other programs on the same GPU
    (another runner, ComfyUI, a desktop) are accounted for, which the total is not.

    None on CPU and MPS: the OS pages and shares RAM, so no limit applies there.
    """
    if choice.kind != "cuda":
        return None
    index = cuda_index(choice)
    free, _total = torch.cuda.mem_get_info(index)
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return int(free + max(0, cached))


def memory_budget_bytes(choice: DeviceChoice, fraction: float = 0.6) -> int:
    """Default memory for warm pipelines: a share of the device's memory."""
    return int(device_memory_bytes(choice) * fraction)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError MPS/CPU allocators raise."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_cached_memory(choice: DeviceChoice) -> None:
    """Give freed blocks back to the driver (after eviction or an OOM)."""
    if choice.kind == "cuda":
        # Ours must be the current device while torch frees: a library may have switched
        # it, and whatever runs on the current device would open a context on GPU 0.
        index = cuda_index(choice)
        if torch.cuda.current_device() != index:
            torch.cuda.set_device(index)
        torch.cuda.empty_cache()
    elif choice.kind == "mps":
        torch.mps.empty_cache()
