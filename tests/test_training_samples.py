"""Checkpoint samples use one fixed sampler, whatever the last /imagine left on the warm
pipeline, so samples from different checkpoints and runs compare; the report says which."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ("runner_fixtures",)
pytestmark = pytest.mark.runner
torch = pytest.importorskip("torch")

from gpu_runner.samplers import make_scheduler  # noqa: E402
from gpu_runner.training.config import make_config  # noqa: E402
from gpu_runner.training.loop import train  # noqa: E402


def _samples(tiny_builders: Any, items: Any, fast: dict[str, Any], root: Path, left: str) -> Any:
    pipe = tiny_builders["sd15"](0)
    pipe.scheduler = make_scheduler(pipe.scheduler.config, left)  # what /imagine left behind
    config = make_config(
        "lora", "sd15", "style", trigger="zxq", rank=4, alpha=4,
        **{**fast, "steps": 2, "checkpoint_every": 1, "validate_every": 2, "sample_seeds": [1]},
    )  # fmt: skip
    result = train(config, items, pipe, root / "out", checkpoint_dir=root / "c")
    assert (
        type(pipe.scheduler).__name__
        == make_scheduler(pipe.scheduler.config, left).__class__.__name__
    )
    report = json.loads(result.report.json.read_text())
    return [p.read_bytes() for p in result.sample_images], report


def test_samples_ignore_the_sampler_a_generation_left(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    after_euler, report = _samples(tiny_builders, demo_items, fast, tmp_path / "a", "Euler a")
    after_ddim, _ = _samples(tiny_builders, demo_items, fast, tmp_path / "b", "DDIM")
    assert after_euler and after_euler == after_ddim
    assert report["sample_sampler"] == "DPM++ 2M Karras"
