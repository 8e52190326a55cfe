"""Output preservation: without its trigger, the adapter must predict what the base does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures",)
pytestmark = pytest.mark.runner


def _image(pipe: Any, prompt: str) -> np.ndarray:
    import torch

    g = torch.Generator("cpu").manual_seed(3)
    return pipe(prompt, num_inference_steps=4, generator=g, output_type="np").images[0]


def test_preservation_keeps_untriggered_prompts_as_the_base_draws_them(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    from gpu_runner.training.config import make_config
    from gpu_runner.training.loop import train

    plain_prompt, prompt = "red and blue stripes", "red and blue stripes, zxq"
    base = tiny_builders["sd15"](0)
    base_plain, base_trigger = _image(base, plain_prompt), _image(base, prompt)

    def changes(weight: float) -> tuple[float, float]:
        cfg = make_config(
            "lora", "sd15", "style", trigger="zxq", rank=4, alpha=4,
            output_preservation=weight, caption_dropout=0.0,
            **{**fast, "learning_rate": 5e-3, "steps": 30, "checkpoint_every": 30,
               "validate_every": 30},
        )  # fmt: skip
        root = tmp_path / str(weight)
        result = train(
            cfg, demo_items, tiny_builders["sd15"](0), root / "o", checkpoint_dir=root / "c"
        )
        pipe = tiny_builders["sd15"](0)
        pipe.load_lora_weights(str(result.diffusers_path), adapter_name="style")
        plain = float(np.abs(_image(pipe, plain_prompt) - base_plain).mean())
        triggered = float(np.abs(_image(pipe, prompt) - base_trigger).mean())
        return plain, triggered

    (free_plain, free_trigger), (kept_plain, kept_trigger) = changes(0.0), changes(4.0)
    assert kept_plain < 0.75 * free_plain, (kept_plain, free_plain, kept_trigger, free_trigger)
    # The trigger still changes the image: preservation holds back only the plain prompt.
    assert kept_trigger > 1.25 * kept_plain, (kept_trigger, kept_plain)
    assert free_trigger > 0


def test_preservation_weight_is_bounded() -> None:
    from gpu_runner.training.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="output_preservation"):
        make_config("lora", trigger="zxq", output_preservation=9)
