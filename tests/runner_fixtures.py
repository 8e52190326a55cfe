"""Shared session fixtures for the runner's tests (tiny pipelines and data, made in code).

Test files pull them in with `pytest_plugins = ("runner_fixtures",)`; the lead may move them
into conftest later.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from storage.settings import load_settings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Settings that make the tiny pipeline train in seconds (64 px, batch 4, lr 5e-3: DESIGN.md
# measured ~40% lower held-out loss in 100 steps with these).
FAST: dict[str, Any] = {
    "resolution": 64,
    "batch_size": 4,
    "learning_rate": 5e-3,
    "warmup_steps": 0,
    "sample_steps": 2,
    "sample_seeds": [1, 2],
    "flip": False,  # as the tiny model's own defaults: its stripes are diagonal
}


@pytest.fixture
def fast() -> dict[str, Any]:
    """A copy of FAST for tests to extend."""
    return dict(FAST)


@pytest.fixture(scope="session")
def tiny_builders() -> dict[str, Callable[..., Any]]:
    """Pipeline builders; importing diffusers (~7 s) happens once per session here."""
    pytest.importorskip("diffusers")
    import torch

    # The tiny models' ops are too small to gain from 2 threads, and when the 2 cores are
    # shared (CI, parallel jobs) OpenMP's spinning threads made the suite 3-4x slower
    # (measured: 94 s with 1 thread vs 340 s with 2 under a load of ~4).
    torch.set_num_threads(1)
    from gpu_runner.families.tiny_flux1 import build_tiny_flux1_pipeline
    from gpu_runner.families.tiny_flux2_klein import build_tiny_flux2_klein_pipeline
    from gpu_runner.families.tiny_qwenimage import build_tiny_qwenimage_pipeline
    from gpu_runner.families.tiny_zimage import build_tiny_zimage_pipeline
    from gpu_runner.tiny_models import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline

    return {
        "sd15": build_tiny_sd15_pipeline,
        "sdxl": build_tiny_sdxl_pipeline,
        "flux2-klein": build_tiny_flux2_klein_pipeline,
        "flux1": build_tiny_flux1_pipeline,
        "qwenimage": build_tiny_qwenimage_pipeline,
        "zimage": build_tiny_zimage_pipeline,
    }


@pytest.fixture(scope="session")
def demo_items() -> list[tuple[Any, str]]:
    """12 structured 64 px images (stripes + disc) with colour captions."""
    from gpu_runner.tiny_models import demo_dataset

    return demo_dataset(12, 64, seed=0)


@dataclass
class TrainedRun:
    config: Any
    result: Any
    out_dir: Path


@pytest.fixture(scope="session")
def trained_lora(
    tiny_builders: dict[str, Callable[..., Any]],
    demo_items: list[tuple[Any, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainedRun:
    """One full LoRA run on the tiny SD1.5 pipeline, shared by the tests that inspect it."""
    from gpu_runner.training.config import make_config
    from gpu_runner.training.loop import train

    config = make_config(
        "lora",
        "sd15",
        "style",
        trigger="zxq",
        steps=100,
        rank=8,
        alpha=16,  # scale 2: ~37% lower held-out loss in 100 steps (30% at alpha 8)
        validate_every=50,
        checkpoint_every=50,
        output_name="zxq_style",
        base_model_name="tiny-sd15",
        base_model_hash="0" * 64,
        dataset_hash="d" * 64,
        sample_prompts=["[trigger]", "a red cat"],
        **FAST,
    )
    root = tmp_path_factory.mktemp("trained_lora")
    result = train(
        config,
        demo_items,
        tiny_builders["sd15"](0),
        root / "out",
        checkpoint_dir=root / "ckpt",
    )
    return TrainedRun(config, result, root / "out")


@pytest.fixture
def data_dir(tmp_path: Path, sqlite_template: Path) -> Path:
    """A data folder with a fresh, migrated SQLite database."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "atelier.db").write_bytes(sqlite_template.read_bytes())
    return data


@pytest.fixture
def services(data_dir: Path, tiny_builders: Any) -> Any:
    from gpu_runner.services import open_services

    return open_services(load_settings(data_dir=data_dir, device="cpu"))


def make_runner(services: Any, worker_id: str = "test-runner") -> Any:
    """A runner in this process with every job handler, on `services`."""
    from gpu_runner.jobs import handlers
    from gpu_runner.worker import Runner

    return Runner(
        queue=services.queue,
        outbox=services.outbox,
        handlers={kind: partial(handler, services) for kind, handler in handlers.items()},
        worker_id=worker_id,
    )


@dataclass
class ConsoleStudio:
    """The console chat and an in-process runner on one data folder: what a person types,
    and the jobs it queues run when `work()` is called."""

    session: Any
    services: Any
    runner: Any

    def work(self) -> str:
        """Run every queued job; the messages posted meanwhile."""
        while self.runner.run_once():
            pass
        return "\n".join(self.session.run_line("wait 0"))

    def approved_style(self, base: str, pictures: dict[str, bytes], name: str = "ink") -> None:
        """`name` (trigger `inkstyle`) on `base`, its references approved by the lead."""
        for file, data in pictures.items():
            (self.session.base_dir / file).write_bytes(data)
        created = self.session.run_line(f"/style create {name} inkstyle style {base}")
        assert f"Created style **{name}**" in created[0], created
        self.session.run_line(f"/style add {name} " + " ".join(pictures))
        sheet = next(b for b in self.session.run_line(f"/style review {name}") if "📋" in b)
        self.session.run_line("as you lead")
        approved = self.session.run_line(f"react {sheet[1 : sheet.index(']')]} ✅")
        assert f"approved **{name}**" in approved[0], approved


def console_studio(db_url: str, tmp_path: Path) -> ConsoleStudio:
    from bot.console import open_console
    from gpu_runner.services import open_services

    settings = load_settings(
        data_dir=tmp_path / "data", database_url=db_url, device="cpu", min_image_side=64
    )
    session = open_console(settings, out_dir=tmp_path / "console")
    session.base_dir = tmp_path
    services = open_services(settings)
    return ConsoleStudio(session, services, make_runner(services))
