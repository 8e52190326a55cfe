"""Exported files (kohya + diffusers LoRA) and the training report, from one shared run."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures",)
pytestmark = pytest.mark.runner
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

Builders = dict[str, Callable[..., Any]]


def _image(pipe: Any, prompt: str = "zxq, blue and red stripes", seed: int = 4) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="np").images[0]


def test_kohya_keys_follow_sd15_names(trained_lora: Any) -> None:
    tensors = load_file(trained_lora.result.kohya_path)
    assert all(k.startswith("lora_unet_") for k in tensors)
    modules = {k.split(".")[0] for k in tensors}
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= tensors.keys()
        assert tensors[f"{m}.lora_down.weight"].shape[0] == 8
        assert float(tensors[f"{m}.alpha"]) == 16.0
    # 16 transformer blocks x 2 attentions x 4 projections, named as in real SD1.5 files.
    assert len(modules) == 128
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules


def test_kohya_header_carries_training_and_modelspec_keys(trained_lora: Any) -> None:
    with safe_open(str(trained_lora.result.kohya_path), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["modelspec.trigger_phrase"] == "zxq"
    assert "zxq" in meta["ss_training_comment"]
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == meta["ss_output_name"] == "zxq_style"
    assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 16
    assert meta["ss_max_train_steps"] == "100" and meta["ss_resolution"] == "(64, 64)"
    assert float(meta["ss_learning_rate"]) == 5e-3
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["atelier.dataset_hash"] == "d" * 64
    assert meta["atelier.base_model_hash"] == "0" * 64
    assert json.loads(meta["atelier.config"])["trigger"] == "zxq"
    assert meta["ss_num_train_images"] == "10"  # 12 minus 2 held out


def test_kohya_and_diffusers_files_give_the_same_image(
    trained_lora: Any, tiny_builders: Builders
) -> None:
    res = trained_lora.result
    base = _image(tiny_builders["sd15"](0))
    via_kohya = tiny_builders["sd15"](0)
    via_kohya.load_lora_weights(str(res.kohya_path), adapter_name="from_kohya")
    via_diffusers = tiny_builders["sd15"](0)
    via_diffusers.load_lora_weights(str(res.diffusers_path), adapter_name="from_diffusers")
    a, b = _image(via_kohya), _image(via_diffusers)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - base).max() > 1e-2  # and the LoRA does change the image


def test_report_files(trained_lora: Any) -> None:
    res = trained_lora.result
    report = res.report
    with Image.open(report.loss_curve) as curve:
        assert curve.format == "PNG" and curve.size == (700, 400)
    with Image.open(report.grid) as grid:
        # 2 prompts x 2 seeds columns of 64 px, two rows (base, trained).
        assert grid.format == "PNG" and grid.width > 4 * 64 and grid.height > 2 * 64
        px = np.asarray(grid.convert("RGB"), dtype=np.int16)
    top, bottom = px[16:80, 60:124], px[84:148, 60:124]
    assert np.abs(top - bottom).max() > 0  # base and trained differ on the same seed
    data = json.loads(report.json.read_text())
    assert data["config"]["rank"] == 8 and data["config"]["trigger"] == "zxq"
    assert data["base_val_loss"] == pytest.approx(res.base_val_loss)
    assert data["val_loss"] == pytest.approx(res.val_loss)
    assert len(data["loss_history"]) == 100
    assert data["sample_prompts"] == ["zxq", "zxq, a red cat"]
    assert data["val_images"] == 2
    # Checkpoint-time samples were written (step 50; the final step goes into the grid).
    assert [p.parent.name for p in res.sample_images] == ["step-000050"] * 4
