"""DoRA and textual inversion learning a style on `toy-sd15`, through the runner's jobs
(their own file, so the suite's workers train them beside tests/test_toy_learning.py).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ("runner_fixtures", "toy_learning_fixtures")
pytest.importorskip("torch")

from toy_learning_fixtures import LEARNING, train_style, with_and_without  # noqa: E402

pytestmark = LEARNING


# Textual inversion trains one embedding, so it can only find a look the base model can
# already draw: toy-sd15 draws "outlined" (pretraining's outlined_share) but no stripes
# (measured: stripes in 5% after 300 steps). DoRA learns stripes as a LoRA does, slower:
# both train the whole budget, 300 steps, at their toy-sd15 defaults
# (gpu_runner/jobs/train.py; LoRA's short recipe left DoRA's stripes at 75% after 200).
# The base's own "outlined" caps it: 20% of held-out prompts draw outlines with the word.
# Weights with the decoder phase and 5500 more UNet steps at outlined_share 0.4-0.5 drew
# them in 65-75%, and textual inversion then reached 65-70% (issue 9's note).
_TI_MISSES = "measured: outlines in 5% after 300 steps at lr 5e-3 and at 1e-2"
_STEPS = 300


@pytest.mark.parametrize(
    ("method", "style"),
    [
        ("dora", "stripes"),
        pytest.param(
            "textual_inversion", "outline", marks=pytest.mark.xfail(strict=True, reason=_TI_MISSES)
        ),
    ],
)
def test_dora_and_textual_inversion_show_the_style(toy: Any, method: str, style: str) -> None:
    trained = train_style(toy, f"{style}-{method}", f"zx{method[:4]}", style, method, steps=_STEPS)
    with_trigger, without = with_and_without(toy, trained, style)
    assert with_trigger["style_shows"] >= 0.8, with_trigger
    assert without["style_shows"] <= 0.15, without
