"""The built-in tiny pipelines: build offline, generate, and are deterministic per seed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures",)  # shared session fixtures (tests/runner_fixtures.py)
pytestmark = pytest.mark.runner


def _generate(pipe: Any, seed: int) -> np.ndarray:
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe("a photo of a red cat", num_inference_steps=2, generator=g, output_type="np")
    return out.images[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_builds_and_generates(tiny_builders: dict[str, Callable[..., Any]], family: str) -> None:
    pipe = tiny_builders[family](0)
    image = _generate(pipe, 1)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    # Same seed, same pipeline: same pixels.
    np.testing.assert_array_equal(image, _generate(pipe, 1))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_same_seed_same_weights(tiny_builders: dict[str, Callable[..., Any]], family: str) -> None:
    import torch

    a, b, c = (tiny_builders[family](s) for s in (0, 0, 1))
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), f"{name} ignores the seed"


def test_build_leaves_global_rng_alone(tiny_builders: dict[str, Callable[..., Any]]) -> None:
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_builders["sd15"](7)
    assert torch.equal(torch.rand(3), expected)


def test_sd15_module_names_match_real_layout(tiny_builders: dict[str, Callable[..., Any]]) -> None:
    pipe = tiny_builders["sd15"](0)
    names = {n for n, _ in pipe.unet.named_modules()}
    # Real SD1.5 names that kohya keys are derived from.
    assert "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k" in names
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0" in names
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert not any(n.startswith("down_blocks.3.attentions") for n in names)


def test_tokenizer_round_trips_any_text(tiny_builders: dict[str, Callable[..., Any]]) -> None:
    tok = tiny_builders["sd15"](0).tokenizer
    ids = tok("a photo of zqx-9 ünï").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aphotoofzqx-9ünï"
