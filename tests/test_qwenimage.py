"""Qwen-Image on its tiny model: it builds in code, generates with true CFG, trains LoRA and
DoRA with flow matching, resumes after a crash, and exports files that ComfyUI, InvokeAI
and diffusers load whole."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures",)  # shared session fixtures (tests/runner_fixtures.py)
pytestmark = pytest.mark.runner

TINY = "tiny-qwenimage"
# How the three loaders name a LoRA layer's tensors (kohya, peft/diffusers, DoRA).
LAYER_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale", ".lora_A.weight",
    ".lora_B.weight",
)  # fmt: skip
# InvokeAI's kohya Qwen-Image table (invokeai/backend/patches/lora_conversions/
# qwen_image_lora_conversion_utils.py): the block modules it applies; it skips any other
# `lora_unet_transformer_blocks_N_<name>` layer without a word.
INVOKEAI_KOHYA_MODULES = {
    "attn_to_q", "attn_to_k", "attn_to_v", "attn_to_out_0", "attn_add_q_proj",
    "attn_add_k_proj", "attn_add_v_proj", "attn_to_add_out", "img_mlp_net_0_proj",
    "img_mlp_net_2", "img_mod_1", "txt_mlp_net_0_proj", "txt_mlp_net_2", "txt_mod_1",
}  # fmt: skip


@pytest.fixture(scope="module")
def family(tiny_builders: Any) -> Any:  # tiny_builders: diffusers imported once, 1 thread
    from gpu_runner.families import get_family

    return get_family("qwenimage")


@pytest.fixture(scope="module")
def build(family: Any) -> Any:
    builder = family.tiny_builders[TINY]
    builder(0)  # the first build imports the pipeline's modules
    return builder


def _config(family: Any, method: str = "lora", **kw: Any) -> Any:
    from gpu_runner.training.config import DoraConfig, LoraConfig

    cls = DoraConfig if method == "dora" else LoraConfig
    values: dict[str, Any] = {
        "family": "qwenimage", "trigger": "zxq", "steps": 12, "rank": 4, "alpha": 4,
        "learning_rate": 5e-3, "resolution": 64, "batch_size": 4, "min_snr_gamma": None,
        "validate_every": 6, "checkpoint_every": 6, "sample_steps": 2, "sample_seeds": [1],
        # Dropout puts the empty caption beside longer ones: padded, masked text.
        "caption_dropout": 0.3, "target_modules": list(family.lora_targets),
        "output_name": "zxq", "base_model_name": TINY, **kw,
    }  # fmt: skip
    return cls(**values)


@pytest.fixture(scope="module")
def trained(
    family: Any, build: Any, demo_items: Any, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    from gpu_runner.training.loop import train

    root = tmp_path_factory.mktemp("qwen")
    return train(_config(family), demo_items, build(0), root / "out", checkpoint_dir=root / "c")


@pytest.fixture(scope="module")
def dora(family: Any, build: Any, demo_items: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gpu_runner.training.loop import train

    root = tmp_path_factory.mktemp("qwen_dora")
    cfg = _config(family, "dora", steps=4, validate_every=4, checkpoint_every=4)
    return train(cfg, demo_items, build(0), root / "out", checkpoint_dir=root / "c")


def _image(pipe: Any, seed: int, **kw: Any) -> np.ndarray:
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        prompt="a red cat", height=64, width=64, num_inference_steps=2, generator=g,
        output_type="np", **kw,
    )  # fmt: skip
    return out.images[0]


def _predict(family: Any, pipe: Any, cond: Any, noisy: Any) -> Any:
    import torch

    with torch.no_grad():
        t = torch.full((noisy.shape[0],), 500.0)
        return family.predict(pipe.transformer, noisy, t, cond, None)


def _prediction(family: Any, pipe: Any, prompts: list[str], noisy: Any = None) -> Any:
    import torch

    cond = family.encode_text(pipe, prompts, torch.device("cpu"))
    if noisy is None:
        noisy = torch.randn((len(prompts), 16, 8, 8), generator=torch.Generator().manual_seed(3))
    return _predict(family, pipe, cond, noisy)


def test_tiny_builds_and_generates_deterministically_with_true_cfg(build: Any) -> None:
    pipe = build(0)
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert {
        "transformer_blocks.1.attn.add_q_proj",
        "transformer_blocks.1.img_mlp.net.0.proj",
        "transformer_blocks.1.txt_mod.1",
    } <= names
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    image = _image(pipe, 1)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, _image(pipe, 1))
    # The pipeline's CFG is true_cfg_scale with a negative prompt (the family's call).
    guided = _image(pipe, 1, negative_prompt=[""], true_cfg_scale=4.0)
    assert not np.array_equal(image, guided)


def test_padded_prompts_predict_as_each_prompt_alone(family: Any, build: Any) -> None:
    """A batch of prompts of different lengths is padded, with a mask; the denoiser must give
    each the prediction it gets alone (attending to the padding would change it)."""
    import torch

    pipe = build(0)
    prompts = ["a cat", "a very much longer prompt about a harbour at dusk"]
    cond = family.encode_text(pipe, prompts, torch.device("cpu"))
    assert cond.token_mask is not None and not bool(cond.token_mask.all())
    noisy = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(3))
    both = _prediction(family, pipe, prompts, noisy)
    for i, prompt in enumerate(prompts):
        alone = _prediction(family, pipe, [prompt], noisy[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_caption_dropout_swaps_in_the_empty_prompt_whatever_its_length(
    family: Any, build: Any
) -> None:
    """Cached captions (padded to the longest) and the empty caption (shorter) meet in one
    batch: each row must predict as its own text alone."""
    import torch

    pipe = build(0)
    cpu = torch.device("cpu")
    long = "a much longer caption about a harbour at dusk"
    captions = family.encode_text(pipe, ["a cat", long], cpu)
    empty = family.encode_text(pipe, [""], cpu)
    assert empty.hidden.shape[1] < captions.hidden.shape[1]
    mixed = captions.where(torch.tensor([True, False]), empty)
    noisy = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(4))
    got = _predict(family, pipe, mixed, noisy)
    torch.testing.assert_close(got[:1], _predict(family, pipe, empty, noisy[:1]))
    alone = family.encode_text(pipe, [long], cpu)
    torch.testing.assert_close(got[1:], _predict(family, pipe, alone, noisy[1:]))


def test_lora_trains_with_flow_matching_and_names_the_family(trained: Any) -> None:
    from gpu_runner.training.export import read_safetensors_metadata

    assert len(trained.loss_history) == 12 and np.isfinite(trained.loss_history).all()
    assert trained.val_loss is not None and trained.val_loss < trained.base_val_loss
    meta = read_safetensors_metadata(trained.kohya_path)
    # kohya-ss/musubi-tuner's sai_model_spec for Qwen-Image, ai-toolkit's base version.
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert meta["modelspec.implementation"] == "https://github.com/QwenLM/Qwen-Image"
    assert meta["ss_base_model_version"] == "qwen_image"
    assert meta["modelspec.trigger_phrase"] == "zxq"
    assert meta["ss_sd_model_name"] == TINY
    # modelspec's prediction types are SD's (epsilon / v): a flow model writes none.
    assert "modelspec.prediction_type" not in meta


def _comfyui_key_map(transformer: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """ComfyUI's comfy/lora.py `model_lora_keys_unet` for a QwenImage model, in our words.
    ComfyUI holds the transformer as `diffusion_model.<name>.weight` under diffusers' module
    names (comfy/ldm/qwen_image/model.py uses the same ones). Its generic rule maps
    `lora_unet_<name, dots as underscores>` and `diffusion_model.<name>`, its QwenImage rule
    `<name>` and `transformer.<name>`, onto that weight."""
    out = {}
    for key, weight in transformer.state_dict().items():
        if not key.endswith(".weight"):
            continue
        name = key.removesuffix(".weight")
        target = (f"diffusion_model.{key}", tuple(weight.shape))
        kohya = f"lora_unet_{name.replace('.', '_')}"
        for alias in (kohya, f"diffusion_model.{name}", name, f"transformer.{name}"):
            out[alias] = target
    return out


def _layers(keys: list[str]) -> dict[str, list[str]]:
    layers: dict[str, list[str]] = {}
    for key in keys:
        suffix = next((s for s in LAYER_SUFFIXES if key.endswith(s)), None)
        layers.setdefault(key.removesuffix(suffix) if suffix else key, []).append(key)
    return layers


# ComfyUI reads DoRA from kohya's `dora_scale`; the DoRA diffusers file is for diffusers.
FILES = [("trained", "kohya"), ("trained", "diffusers"), ("dora", "kohya")]


@pytest.mark.parametrize(("run", "layout"), FILES)
def test_every_exported_key_loads_in_comfyui(
    run: str, layout: str, build: Any, request: pytest.FixtureRequest
) -> None:
    """Every layer of both files maps onto a weight of the model with the right shapes: 0
    keys left for ComfyUI's "lora key not loaded"."""
    from safetensors.torch import load_file

    result = request.getfixturevalue(run)
    path = result.kohya_path if layout == "kohya" else Path(result.diffusers_path)
    tensors = load_file(path)
    key_map = _comfyui_key_map(build(0).transformer)
    left = [k for layer, ks in _layers(list(tensors)).items() if layer not in key_map for k in ks]
    assert tensors and left == [], f"lora key not loaded: {left}"
    for layer, keys in _layers(list(tensors)).items():
        _, (out_features, in_features) = key_map[layer]
        for key in keys:
            shape = tuple(tensors[key].shape)
            if key.endswith((".lora_down.weight", ".lora_A.weight")):
                assert shape[1] == in_features, key
            elif key.endswith((".lora_up.weight", ".lora_B.weight")):
                assert shape[0] == out_features, key
            elif key.endswith(".dora_scale"):
                assert shape == (out_features, 1), key  # ComfyUI's output-axis DoRA layout
    if run == "dora" and layout == "kohya":
        assert any(k.endswith(".dora_scale") for k in tensors)


def _invokeai_says_qwen_image_lora(keys: list[str]) -> bool:
    """InvokeAI's Qwen-Image LoRA probe (configs/lora.py LoRA_LyCORIS_QwenImage_Config), in
    our words: a key on the double-stream blocks (`transformer_blocks.`, `transformer.
    transformer_blocks.` or kohya's `lora_unet_transformer_blocks_`), a LoRA weight suffix,
    and nothing of Z-Image (`diffusion_model.layers.`), FLUX's single-stream or BFL blocks, or
    Krea-2's text fusion. The SD probes claim no file without the `attn2_to_k`/`self_attn`
    keys they measure the text width on."""
    blocks = (
        "transformer_blocks.",
        "transformer.transformer_blocks.",
        "lora_unet_transformer_blocks_",
    )
    qwen = any(k.startswith(blocks) for k in keys)
    lora = any(
        k.endswith(("lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight"))
        for k in keys
    )
    others = (
        "diffusion_model.layers.", "double_blocks.", "single_blocks.",
        "single_transformer_blocks.", "transformer.single_transformer_blocks.",
        "lora_unet_double_blocks_", "lora_unet_single_blocks_",
        "lora_unet_single_transformer_blocks_",
    )  # fmt: skip
    foreign = any(k.startswith(others) for k in keys)
    krea2 = any(m in k for m in ("text_fusion", "txtfusion", "time_mod_proj") for k in keys)
    sd = any(("_attn2_to_k." in k or "_self_attn_" in k) for k in keys)
    return qwen and lora and not (foreign or krea2 or sd)


@pytest.mark.parametrize(("run", "layout"), FILES)
def test_invokeai_classifies_the_file_as_a_qwen_image_lora_and_applies_every_layer(
    run: str, layout: str, build: Any, request: pytest.FixtureRequest
) -> None:
    from safetensors.torch import load_file

    result = request.getfixturevalue(run)
    path = result.kohya_path if layout == "kohya" else Path(result.diffusers_path)
    keys = list(load_file(path))
    assert _invokeai_says_qwen_image_lora(keys)
    names = {n for n, _ in build(0).transformer.named_modules()}
    for layer in _layers(keys):
        if layout == "kohya":
            # InvokeAI's kohya converter: `lora_unet_transformer_blocks_N_<module>`, the
            # module from its table (an unknown one is skipped, silently).
            match = re.fullmatch(r"lora_unet_transformer_blocks_(\d+)_(\w+)", layer)
            assert match and match.group(2) in INVOKEAI_KOHYA_MODULES, layer
        else:
            # Its diffusers path strips `transformer.` and patches that module path.
            assert layer.removeprefix("transformer.") in names, layer


def test_diffusers_reads_the_kohya_file_as_the_diffusers_file(
    family: Any, build: Any, trained: Any
) -> None:
    """diffusers' `_convert_non_diffusers_qwen_lora_to_diffusers` (what QwenImagePipeline's
    load_lora_weights runs on kohya keys) must leave no key behind, and the converted LoRA
    must change the transformer exactly as the diffusers-format export does."""
    import torch
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_qwen_lora_to_diffusers,
    )
    from safetensors.torch import load_file

    kohya = load_file(trained.kohya_path)
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(dict(kohya))  # raises on leftovers
    assert len(converted) == 2 * len(_layers(list(kohya)))

    def output(lora: Path | dict[str, Any] | None) -> torch.Tensor:
        pipe = build(0)
        if lora is not None:
            pipe.load_lora_weights(lora, adapter_name="atelier_check")
        return _prediction(family, pipe, ["a red cat"])

    base, via_kohya = output(None), output(dict(kohya))
    via_diffusers = output(Path(trained.diffusers_path))
    assert not torch.allclose(base, via_kohya)
    torch.testing.assert_close(via_kohya, via_diffusers, rtol=1e-4, atol=1e-5)


def test_dora_file_loads_in_diffusers_and_changes_the_model(
    family: Any, build: Any, dora: Any
) -> None:
    import torch

    pipe = build(0)
    base = _prediction(family, pipe, ["a red cat"])
    pipe.load_lora_weights(Path(dora.diffusers_path), adapter_name="atelier_check")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert "atelier_check" in layer.lora_magnitude_vector  # peft's DoRA, from the header
    assert not torch.allclose(base, _prediction(family, pipe, ["a red cat"]))


def test_a_crashed_run_resumes_from_its_checkpoint_to_the_same_weights(
    family: Any, build: Any, demo_items: Any, trained: Any, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    from gpu_runner.training.loop import train

    def crash(step: int, total: int, loss: float, extras: dict[str, Any]) -> None:
        if step == 8:
            raise RuntimeError("runner killed")

    cfg = _config(family)
    with pytest.raises(RuntimeError, match="runner killed"):
        train(
            cfg, demo_items, build(0), tmp_path / "o", checkpoint_dir=tmp_path / "c",
            progress=crash,
        )  # fmt: skip
    resumed = train(cfg, demo_items, build(0), tmp_path / "o", checkpoint_dir=tmp_path / "c")
    assert resumed.resumed_from == 6 and resumed.final_step == 12
    assert resumed.loss_history == trained.loss_history
    a, b = load_file(trained.kohya_path), load_file(resumed.kohya_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_detects_both_exported_layouts_as_qwen_image_by_their_keys(
    trained: Any, dora: Any, tmp_path: Path
) -> None:
    """With headers and by structure alone (headers stripped). Without the Qwen-Image rule
    the diffusers file's `transformer_blocks.1` reads as SDXL's transformer depth."""
    from safetensors.torch import load_file, save_file

    from gpu_runner.lora_import import inspect_adapter_file

    for source in (trained.kohya_path, Path(trained.diffusers_path), dora.kohya_path):
        bare = tmp_path / f"bare_{Path(source).parent.name}_{Path(source).name}"
        save_file(load_file(source), bare)  # no metadata
        for path in (Path(source), bare):
            info = inspect_adapter_file(path, with_hashes=False)
            assert (info.kind, info.family) == ("lora", "qwenimage"), path


def test_a_prompt_past_the_encoder_s_512_tokens_is_refused_with_the_count(
    family: Any, build: Any
) -> None:
    """Counted as the pipeline's embeddings come out (template in, its start dropped): the
    longest prompt that fits gives exactly 512 embedding tokens, one byte more is refused."""
    import torch

    from gpu_runner.prompts import InvalidRequestError

    pipe = build(0)

    def embedded(text: str) -> int:
        hidden, _ = pipe.encode_prompt(text, device=torch.device("cpu"), max_sequence_length=1024)
        return int(hidden.shape[1])

    fits = "x" * (600 - (embedded("x" * 600) - 512))  # a byte-level tokenizer: 1 x, 1 token
    assert embedded(fits) == 512
    family.check_prompt_length(pipe, fits, "prompt")
    with pytest.raises(InvalidRequestError, match=r"is 513 tokens long .* at most 512"):
        family.check_prompt_length(pipe, fits + "x", "prompt")


def test_only_euler_samples_qwen_image(family: Any, build: Any) -> None:
    from gpu_runner.prompts import InvalidRequestError

    config = build(0).scheduler.config
    assert family.make_scheduler(config, "Euler").config.shift_terminal == 0.02
    with pytest.raises(InvalidRequestError, match="Euler"):
        family.make_scheduler(config, "DPM++ 2M Karras")


def test_imagine_sizes_keep_the_native_area_on_qwen_image_s_16_px_grid() -> None:
    from storage.families import ASPECT_RATIOS, aspect_size, generation_defaults

    qwen = {"qwen": {"source": "/m/qwen-image", "family": "qwenimage"}}
    native = generation_defaults("qwen", qwen)
    assert (native.width, native.height, native.steps, native.cfg) == (1328, 1328, 50, 4.0)
    assert aspect_size("qwen", qwen, (1, 1)) == (1328, 1328)  # 1344 on SDXL's 64 px grid
    for ratio in ASPECT_RATIOS:
        width, height = aspect_size("qwen", qwen, ratio)
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width * height / 1328**2 - 1) < 0.03, ratio
    assert aspect_size("tiny-qwenimage", {}, (1, 1)) == (64, 64)
