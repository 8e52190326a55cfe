"""FLUX.2 [klein] on its tiny model: it builds in code, generates, trains a LoRA with flow
matching, and exports files whose every key loads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures",)  # shared session fixtures (tests/runner_fixtures.py)
pytestmark = pytest.mark.runner

# Black Forest Labs' FLUX.2 module names as kohya-style keys: the layout ComfyUI's
# comfy/lora.py maps (`lora_unet_` + a diffusion_model weight name, dots as underscores)
# and InvokeAI's kohya-FLUX detector requires of every key.
BFL_KEY = re.compile(
    r"^lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2)"
    r"|single_blocks_\d+_linear[12])\.(lora_down\.weight|lora_up\.weight|alpha)$"
)


@pytest.fixture(scope="module")
def family(tiny_builders: Any) -> Any:  # tiny_builders: diffusers imported once, 1 thread
    from gpu_runner.families import get_family

    return get_family("flux2-klein")


@pytest.fixture(scope="module")
def trained(family: Any, demo_items: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gpu_runner.training.config import LoraConfig
    from gpu_runner.training.loop import train

    config = LoraConfig(
        family="flux2-klein", trigger="zxq", steps=12, rank=4, alpha=4, learning_rate=5e-3,
        resolution=64, batch_size=4, min_snr_gamma=None, validate_every=6,
        checkpoint_every=6, sample_steps=2, sample_seeds=[1],
        target_modules=list(family.lora_targets), output_name="zxq",
        base_model_name="tiny-flux2-klein",
    )  # fmt: skip
    root = tmp_path_factory.mktemp("flux2")
    pipe = family.tiny_builders["tiny-flux2-klein"](0)
    return train(config, demo_items, pipe, root / "out", checkpoint_dir=root / "ckpt")


def _image(pipe: Any, seed: int) -> np.ndarray:
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt="a red cat", height=64, width=64, num_inference_steps=2, generator=g,
               output_type="np", max_sequence_length=32)  # fmt: skip
    return out.images[0]


def test_tiny_builds_and_generates_deterministically(family: Any) -> None:
    pipe = family.tiny_builders["tiny-flux2-klein"](0)
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert {
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
    } <= names
    image = _image(pipe, 1)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, _image(pipe, 1))


def test_lora_trains_with_flow_matching_and_names_the_family(trained: Any) -> None:
    from gpu_runner.training.export import read_safetensors_metadata

    assert len(trained.loss_history) == 12 and np.isfinite(trained.loss_history).all()
    meta = read_safetensors_metadata(trained.kohya_path)
    assert meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    # modelspec's prediction types are SD's (epsilon / v): a flow model writes none.
    assert "modelspec.prediction_type" not in meta


def test_every_kohya_key_maps_onto_the_model(family: Any, trained: Any) -> None:
    """Rule followed: ComfyUI's comfy/lora.py maps `lora_unet_<BFL key>` onto the BFL
    weight of that name; the BFL <-> diffusers table is the one diffusers' own
    `_convert_kohya_flux2_lora_to_diffusers` applies (q/k/v fused in BFL's qkv). Every key
    must have the BFL form, the converter must leave none behind, and the converted LoRA
    must change the tiny transformer exactly as the diffusers-format export does."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers
    from safetensors.torch import load_file

    kohya = load_file(trained.kohya_path)
    assert kohya and all(BFL_KEY.match(k) for k in kohya), sorted(kohya)
    left = dict(kohya)
    converted = _convert_kohya_flux2_lora_to_diffusers(left)
    assert left == {}, f"keys not loaded: {sorted(left)}"
    assert converted

    def output(lora: Path | dict[str, Any] | None) -> torch.Tensor:
        pipe = family.tiny_builders["tiny-flux2-klein"](0)
        if lora is not None:
            pipe.load_lora_weights(lora, adapter_name="atelier_check")
        cond = family.encode_text(pipe, ["a red cat"], torch.device("cpu"))
        noisy = torch.randn((1, 128, 4, 4), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            return family.predict(pipe.transformer, noisy, torch.tensor([500.0]), cond, None)

    base, via_kohya = output(None), output(dict(kohya))
    via_diffusers = output(Path(trained.diffusers_path))
    assert not torch.allclose(base, via_kohya)
    torch.testing.assert_close(via_kohya, via_diffusers, rtol=1e-4, atol=1e-5)


def test_import_detects_both_exported_layouts_as_flux2_by_their_keys(
    trained: Any, tmp_path: Path
) -> None:
    """With headers and by structure alone (headers stripped). Without the FLUX.2 rules a
    real file's `transformer.transformer_blocks.1` reads as SDXL's depth, the tiny one's as
    no family at all."""
    from safetensors.torch import load_file, save_file

    from gpu_runner.lora_import import inspect_adapter_file

    for source in (trained.kohya_path, Path(trained.diffusers_path)):
        bare = tmp_path / f"bare_{Path(source).name}"
        save_file(load_file(source), bare)  # no metadata
        for path in (Path(source), bare):
            info = inspect_adapter_file(path, with_hashes=False)
            assert (info.kind, info.family) == ("lora", "flux2-klein"), path
