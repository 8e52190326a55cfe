"""Every real preset (family x preset x method), with only the resolution lowered, builds
for any step count within bounds and trains a few steps on the tiny models."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.training.config import (
    BOUNDS,
    FAMILIES,
    METHODS,
    PRESETS,
    make_config,
    preset_defaults,
)
from storage.families import TRAINING_METHODS

# Every method a family supports (FLUX.2 [klein] has no textual inversion).
COMBOS = [
    c for c in itertools.product(FAMILIES, PRESETS, METHODS) if c[2] in TRAINING_METHODS[c[0]]
]


def test_a_method_the_family_lacks_is_refused_naming_those_it_has() -> None:
    from gpu_runner.training.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"FLUX.2 \[klein\] base models cannot train textual "
        r"inversion; use method=lora or method=dora",
    ):
        make_config("textual_inversion", "flux2-klein", "style", trigger="zxq")


@pytest.mark.parametrize(("family", "preset", "method"), COMBOS)
@pytest.mark.parametrize("steps", [1, 9, 80, 150, 999, int(BOUNDS["steps"][1])])
def test_real_preset_builds_for_any_step_count(
    family: str, preset: str, method: str, steps: int
) -> None:
    cfg = make_config(method, family, preset, trigger="zxq", steps=steps)
    assert cfg.steps == steps
    assert 0 <= cfg.warmup_steps <= max(1, steps // 10)
    full = preset_defaults(method, family, preset)
    if steps >= 10 * full["warmup_steps"]:
        assert cfg.warmup_steps == full["warmup_steps"]  # long runs keep the preset's warmup


def test_explicit_warmup_is_kept_and_checked() -> None:
    assert make_config("lora", trigger="zxq", steps=80, warmup_steps=40).warmup_steps == 40
    with pytest.raises(ValueError, match=r"warmup_steps \(90\) must not exceed steps \(80\)"):
        make_config("lora", trigger="zxq", steps=80, warmup_steps=90)


@pytest.mark.runner
@pytest.mark.parametrize(("family", "preset", "method"), COMBOS)
def test_real_preset_trains_a_few_steps(
    family: str, preset: str, method: str, tmp_path: Path, tiny_builders: Any, demo_items: Any
) -> None:
    from gpu_runner.families import get_family
    from gpu_runner.training.loop import train

    # The family's own LoRA layers, as the train job gives them (gpu_runner/jobs/train.py).
    targets = (
        {}
        if method == "textual_inversion"
        else {"target_modules": list(get_family(family).lora_targets)}
    )
    cfg = make_config(
        method, family, preset, trigger="zxq", steps=3, resolution=64, sample_seeds=[1], **targets
    )
    result = train(
        cfg, demo_items, tiny_builders[family](0), tmp_path / "out", checkpoint_dir=tmp_path / "c"
    )
    assert result.final_step == 3 and not result.stopped
    assert all(v == v for v in result.loss_history)  # no NaN
    written = result.embedding_path if method == "textual_inversion" else result.kohya_path
    assert written is not None and written.stat().st_size > 0


pytest_plugins = ("runner_fixtures",)


def test_qwen_image_refuses_textual_inversion_naming_lora_and_dora() -> None:
    from gpu_runner.training.config import ConfigError

    with pytest.raises(
        ConfigError,
        match="Qwen-Image base models cannot train textual inversion; use method=lora or "
        "method=dora",
    ):
        make_config("textual_inversion", "qwenimage", "style", trigger="zxq")
