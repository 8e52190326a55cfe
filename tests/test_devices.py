"""Which GPU a runner uses and in what precision, on a simulated two-GPU machine.

torch.cuda's answers are simulated (tests/simulated_gpus.py); device choice, precision and
the runner's start-up are Atelier's real code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage.settings import load_settings

pytest_plugins = ("runner_fixtures", "simulated_gpus")

A100 = (8, 0)  # compute capability: bf16 in hardware
T4 = (7, 5)  # bf16 only emulated (as on V100 and RTX 20xx)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [([A100, T4], "fp16"), ([T4, A100], "bf16")],
    ids=["T4-on-cuda1", "A100-on-cuda1"],
)
def test_precision_follows_the_chosen_gpu_and_never_emulated_bf16(
    gpus: Any, machine: list[tuple[int, int]], expected: str
) -> None:
    """A `--device cuda:1` runner: bf16 only where cuda:1 has it in hardware; a T4 (7.5)
    gets fp16 with the grad scaler, whatever cuda:0 is and although torch's
    is_bf16_supported() says yes (it counts emulation)."""
    import torch

    from gpu_runner.devices import resolve_device
    from gpu_runner.training.precision import choose_precision

    gpus(machine)
    choice = resolve_device("cuda:1")
    precision = choose_precision(torch.device("cuda:1"), "auto")
    if expected == "fp16":
        assert choice.dtype == torch.float16
        assert precision.autocast_dtype == torch.float16 and precision.use_grad_scaler
    else:
        assert choice.dtype == torch.bfloat16
        assert precision.autocast_dtype == torch.bfloat16 and not precision.use_grad_scaler
    # An explicit choice is kept either way.
    assert choose_precision(torch.device("cuda:1"), "fp16").use_grad_scaler
    assert choose_precision(torch.device("cuda:1"), "no").autocast_dtype is None


def test_runner_on_cuda1_pins_it_and_frees_memory_there(
    gpus: Any, data_dir: Path, tiny_builders: Any
) -> None:
    """Starting the runner makes cuda:1 the current device (so nothing opens a context on
    GPU 0), and freeing cached memory after an eviction acts on cuda:1 even after a library
    switched the current device back to 0."""
    from gpu_runner.devices import release_cached_memory
    from gpu_runner.services import open_services

    machine = gpus([A100, T4])
    services = open_services(load_settings(data_dir=data_dir, device="cuda:1"))
    assert machine.set_device_calls and machine.current == 1
    machine.current = 0  # e.g. a library's own torch.cuda.device(0) block leaked
    release_cached_memory(services.device)
    assert machine.empty_cache_on == [1]
    assert machine.current == 1
    services.db.dispose()


def test_cpu_runner_touches_no_gpu(gpus: Any, data_dir: Path, tiny_builders: Any) -> None:
    from gpu_runner.devices import release_cached_memory
    from gpu_runner.services import open_services

    machine = gpus([A100])
    services = open_services(load_settings(data_dir=data_dir, device="cpu"))
    release_cached_memory(services.device)
    assert machine.set_device_calls == [] and machine.empty_cache_on == []
    services.db.dispose()
