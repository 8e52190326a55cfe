"""Prior preservation: base-model images of the plain class join each training step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.training.priors import without_trigger

pytest_plugins = ("runner_fixtures",)


@pytest.mark.parametrize(
    ("caption", "plain"),
    [
        ("zxq, a red circle on a white background", "a red circle on a white background"),
        ("a red circle, ZXQ style", "a red circle, style"),
        ("zxq", ""),
        ("zxqs are not the trigger", "zxqs are not the trigger"),
    ],
)
def test_the_trigger_is_taken_out_of_prior_captions(caption: str, plain: str) -> None:
    assert without_trigger(caption, "zxq") == plain


@pytest.mark.runner
def test_prior_images_are_drawn_and_trained_on(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    from gpu_runner.training.config import make_config
    from gpu_runner.training.loop import train

    def run(weight: float, root: Path) -> Any:
        cfg = make_config(
            "lora", "sd15", "style", trigger="zxq", rank=4, alpha=4, prior_preservation=weight,
            **{**fast, "steps": 3, "checkpoint_every": 3, "validate_every": 3, "sample_seeds": [1]},
        )  # fmt: skip
        return train(
            cfg, demo_items, tiny_builders["sd15"](0), root / "o", checkpoint_dir=root / "c"
        )

    with_priors, without = run(1.0, tmp_path / "a"), run(0.0, tmp_path / "b")
    report = json.loads(with_priors.report.json.read_text())
    assert report["prior_images"] == report["train_images"] > 0
    assert json.loads(without.report.json.read_text())["prior_images"] == 0
    # Step 1 sees the same batch and noise either way; the prior term adds to its loss.
    assert with_priors.loss_history[0] > without.loss_history[0]


def test_prior_weight_is_bounded() -> None:
    from gpu_runner.training.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="prior_preservation"):
        make_config("lora", trigger="zxq", prior_preservation=5)
