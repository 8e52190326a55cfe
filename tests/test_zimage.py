"""Z-Image on its tiny model: it builds in code, generates, trains a LoRA (and a DoRA) with
flow matching, and exports files whose every key loads in ComfyUI, InvokeAI and diffusers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures",)  # shared session fixtures (tests/runner_fixtures.py)
pytestmark = pytest.mark.runner

BASE = "tiny-zimage"
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")


def _config(family: Any, method: str, steps: int, **kw: Any) -> Any:
    from gpu_runner.training.config import DoraConfig, LoraConfig

    cls = DoraConfig if method == "dora" else LoraConfig
    return cls(
        family="zimage", trigger="zxq", steps=steps, rank=4, alpha=2, learning_rate=5e-3,
        resolution=64, batch_size=4, min_snr_gamma=None, sample_steps=2, sample_seeds=[1],
        target_modules=list(family.lora_targets), output_name="zxq", base_model_name=BASE,
        **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def family(tiny_builders: Any) -> Any:  # tiny_builders: diffusers imported once, 1 thread
    from gpu_runner.families import get_family

    return get_family("zimage")


@pytest.fixture(scope="module")
def trained(family: Any, demo_items: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """12 LoRA steps, with caption dropout so captions of different lengths mix in a batch."""
    from gpu_runner.training.loop import train

    config = _config(family, "lora", 12, validate_every=6, checkpoint_every=6, caption_dropout=0.3)
    root = tmp_path_factory.mktemp("zimage")
    pipe = family.tiny_builders[BASE](0)
    return train(config, demo_items, pipe, root / "out", checkpoint_dir=root / "ckpt")


def _image(pipe: Any, seed: int) -> np.ndarray:
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        prompt="a red cat", negative_prompt="blurry", height=64, width=64,
        num_inference_steps=2, generator=g, output_type="np", max_sequence_length=32,
    )  # fmt: skip
    return out.images[0]


def _predict(family: Any, pipe: Any, transformer: Any = None) -> Any:
    import torch

    cond = family.encode_text(pipe, ["a red cat", "zxq"], torch.device("cpu"))
    noisy = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t = torch.tensor([500.0, 800.0])
        return family.predict(transformer or pipe.transformer, noisy, t, cond, None)


def test_tiny_builds_and_generates_deterministically(family: Any) -> None:
    pipe = family.tiny_builders[BASE](0)
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert {
        "layers.1.attention.to_q",
        "noise_refiner.0.feed_forward.w2",
        "context_refiner.0.attention.to_out.0",
        "layers.0.adaLN_modulation.0",
    } <= names
    image = _image(pipe, 1)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, _image(pipe, 1))


def test_training_sees_what_the_pipeline_feeds_its_transformer(family: Any) -> None:
    """The family's prediction is the pipeline's own transformer call: captions at their own
    lengths (a short and a long one side by side), time as 1 - t/1000, output negated."""
    import torch

    pipe = family.tiny_builders[BASE](0)
    cond = family.encode_text(pipe, ["a", "a much longer caption"], torch.device("cpu"))
    assert (
        cond.token_mask is not None
        and cond.token_mask.sum(1).tolist()[0] < cond.token_mask.sum(1).tolist()[1]
    )
    embeds, _ = pipe.encode_prompt(
        ["a", "a much longer caption"], do_classifier_free_guidance=False
    )
    noisy = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        ours = family.predict(pipe.transformer, noisy, t, cond, None)
        for i in range(2):
            theirs = pipe.transformer(
                [noisy[i].unsqueeze(1)], (1000 - t[i : i + 1]) / 1000, [embeds[i]],
                return_dict=False,
            )[0][0]  # fmt: skip
            torch.testing.assert_close(ours[i], -theirs.squeeze(1))


def test_lora_trains_with_flow_matching_and_names_the_family(trained: Any) -> None:
    from gpu_runner.training.export import read_safetensors_metadata

    assert len(trained.loss_history) == 12 and np.isfinite(trained.loss_history).all()
    meta = read_safetensors_metadata(trained.kohya_path)
    # musubi-tuner's sai_model_spec.py ids for Z-Image.
    assert meta["modelspec.architecture"] == "Z-Image/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Tongyi-MAI/Z-Image"
    assert meta["modelspec.trigger_phrase"] == "zxq"
    # modelspec's prediction types are SD's (epsilon / v): a flow model writes none.
    assert "modelspec.prediction_type" not in meta


# --- ComfyUI ---------------------------------------------------------------------------------
# ComfyUI runs Z-Image as its Lumina 2 model with the original (native) weight names. Its
# LoRA key map for that model (comfy/lora.py model_lora_keys_unet, built from comfy/utils.py
# z_image_to_diffusers) takes `diffusion_model.<diffusers module>` and patches the native
# weight it names: to_q, to_k and to_v are the three `dim`-row slices (in that order) of the
# native fused `attention.qkv`, `attention.to_out.0` is `attention.out`, feed_forward and
# adaLN_modulation keep their names, and `all_final_layer.2-1.` / `all_x_embedder.2-1.` are
# `final_layer.` / `x_embedder.`. A patch is `up @ down * alpha / rank` added to the weight;
# with a `dora_scale` of the weight's rows, comfy/weight_adapter/base.py weight_decompose then
# scales each row by dora_scale / (the row's norm in the unpatched weight + float32 eps).
def _native_name(diffusers_key: str) -> str:
    key = diffusers_key
    for ours, native in (
        (".attention.to_out.0.", ".attention.out."),
        (".attention.norm_q.", ".attention.q_norm."),
        (".attention.norm_k.", ".attention.k_norm."),
        ("all_final_layer.2-1.", "final_layer."),
        ("all_x_embedder.2-1.", "x_embedder."),
    ):
        key = key.replace(ours, native)
    return key


_QKV = re.compile(r"^(.*)\.attention\.to_([qkv])\.weight$")


def _comfy_native_state(transformer: Any) -> dict[str, Any]:
    """The tiny model's weights in ComfyUI's native layout (q, k, v fused)."""
    import torch

    native: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in transformer.state_dict().items():
        m = _QKV.match(key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = value.clone()
        else:
            native[_native_name(key)] = value.clone()
    for block, qkv in parts.items():
        native[f"{block}.attention.qkv.weight"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return native


def _comfy_target(module: str, dim: int) -> tuple[str, slice]:
    m = _QKV.match(f"{module}.weight")
    if m:
        i = "qkv".index(m.group(2))
        return f"{m.group(1)}.attention.qkv.weight", slice(i * dim, (i + 1) * dim)
    return _native_name(f"{module}.weight"), slice(None)


def _comfy_apply(native: dict[str, Any], lora: dict[str, Any], dim: int) -> set[str]:
    """Patch `native` with `lora` as ComfyUI does; returns the keys it loaded."""
    import torch

    from gpu_runner.families.zimage import KEY_PREFIX, mapped_module

    loaded: set[str] = set()
    modules = {k.removesuffix(".lora_down.weight") for k in lora if k.endswith(".lora_down.weight")}
    for name in sorted(modules):
        module = name.removeprefix(KEY_PREFIX)
        assert name.startswith(KEY_PREFIX) and mapped_module(module), name
        target, rows = _comfy_target(module, dim)
        assert target in native, f"{name} -> {target}: no such native weight"
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        alpha = float(lora[f"{name}.alpha"])
        weight = native[target][rows]
        patched = weight + up @ down * (alpha / down.shape[0])
        scale = lora.get(f"{name}.dora_scale")
        if scale is not None:
            assert scale.shape == (weight.shape[0], 1), name  # the output axis
            norms = weight.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
            patched = patched * (scale / norms)
            loaded.add(f"{name}.dora_scale")
        native[target][rows] = patched
        loaded |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    return loaded


def _comfy_render(family: Any, lora: dict[str, Any]) -> Any:
    """The tiny transformer as ComfyUI patches it with `lora` (asserting every key loads),
    brought back to diffusers' names by diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import (
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    from gpu_runner.families.tiny_zimage import DIM

    base = family.tiny_builders[BASE](0).transformer
    # ComfyUI's slices assume q, k and v each `dim` rows (every head has its own k and v).
    for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
        for proj in ("to_q", "to_k", "to_v"):
            assert base.get_submodule(f"{block}.attention.{proj}").out_features == DIM
    native = _comfy_native_state(base)
    loaded = _comfy_apply(native, lora, DIM)
    assert set(lora) - loaded == set(), "lora key not loaded"
    base.load_state_dict(convert_z_image_transformer_checkpoint_to_diffusers(native))
    return base


def _diffusers_render(family: Any, path: Path) -> Any:
    pipe = family.tiny_builders[BASE](0)
    pipe.load_lora_weights(str(path), adapter_name="atelier_check")
    return pipe


def test_every_exported_key_loads_in_comfyui_as_diffusers_loads_it(
    family: Any, trained: Any
) -> None:
    """Every key is one ComfyUI's Z-Image map takes (0 left unloaded), and the native model it
    patches, brought back to diffusers' names by diffusers' own single-file converter,
    computes what the diffusers-format export computes."""
    import torch
    from safetensors.torch import load_file

    lora = load_file(trained.kohya_path)
    assert lora and all(k.endswith(LORA_SUFFIXES) for k in lora), sorted(lora)
    patched = _comfy_render(family, lora)
    reference = _diffusers_render(family, Path(trained.diffusers_path))
    base = family.tiny_builders[BASE](0)
    via_diffusers = _predict(family, reference)
    assert not torch.allclose(_predict(family, base), via_diffusers)
    torch.testing.assert_close(_predict(family, base, patched), via_diffusers, rtol=1e-4, atol=1e-5)


def test_invokeai_probes_the_file_as_a_zimage_lora_and_finds_every_layer(
    family: Any, trained: Any
) -> None:
    """Rules restated from InvokeAI (model_manager/configs/lora.py LoRA_LyCORIS_ZImage_Config,
    patches/lora_conversions/z_image_lora_conversion_utils.py): a file is a Z-Image LoRA when
    a key starts with `diffusion_model.layers.` and keys end in LoRA suffixes, and it is
    not taken for Qwen-Image (`transformer_blocks.`) or FLUX (`double_blocks.`,
    `single_blocks.`); keys group into layers by their suffix, the prefix is stripped, and
    each layer patches that module of diffusers' ZImageTransformer2DModel."""
    from safetensors.torch import load_file

    lora = load_file(trained.kohya_path)
    keys = list(lora)
    assert any(k.startswith("diffusion_model.layers.") for k in keys)
    assert not any(
        k.startswith(("transformer_blocks.", "transformer.transformer_blocks.", "double_blocks.",
                      "single_blocks."))
        for k in keys
    )  # fmt: skip
    layers: dict[str, dict[str, Any]] = {}
    for key, value in lora.items():
        suffix = next(s for s in LORA_SUFFIXES if key.endswith(s))
        layers.setdefault(key.removesuffix(suffix), {})[suffix] = value
    transformer = family.tiny_builders[BASE](0).transformer
    for name, parts in layers.items():
        module = transformer.get_submodule(name.removeprefix("diffusion_model."))
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        assert (up.shape[0], down.shape[1]) == (module.out_features, module.in_features), name


def test_diffusers_converts_every_key_and_renders_as_its_own_format(
    family: Any, trained: Any
) -> None:
    """diffusers' Z-Image converter (_convert_non_diffusers_z_image_lora_to_diffusers) raises
    on any key it leaves; loaded, the file changes the transformer exactly as the
    diffusers-format export does."""
    import torch
    from diffusers import ZImagePipeline
    from safetensors.torch import load_file

    kohya = load_file(trained.kohya_path)
    converted = ZImagePipeline.lora_state_dict(dict(kohya))
    assert len(converted) == 2 * sum(k.endswith(".alpha") for k in kohya)

    def output(lora: str | dict[str, Any]) -> torch.Tensor:
        pipe = family.tiny_builders[BASE](0)
        pipe.load_lora_weights(lora, adapter_name="atelier_check")
        return _predict(family, pipe)

    torch.testing.assert_close(
        output(dict(kohya)), output(str(trained.diffusers_path)), rtol=1e-4, atol=1e-5
    )


def test_dora_renders_in_comfyui_as_peft_trained_it(
    family: Any, demo_items: Any, tmp_path: Path
) -> None:
    """DoRA (peft supports it on every Linear Z-Image has): each layer's magnitude goes out as
    a `dora_scale` on the output axis, and ComfyUI's rule renders what the diffusers-format
    file (which carries peft's DoRA itself) renders."""
    import torch
    from safetensors.torch import load_file

    from gpu_runner.training.loop import train

    result = train(
        _config(family, "dora", 3), demo_items, family.tiny_builders[BASE](0),
        tmp_path / "out", checkpoint_dir=tmp_path / "ckpt",
    )  # fmt: skip
    kohya = load_file(result.kohya_path)
    scales = {k.removesuffix(".dora_scale") for k in kohya if k.endswith(".dora_scale")}
    downs = {k.removesuffix(".lora_down.weight") for k in kohya if k.endswith(".lora_down.weight")}
    assert scales and scales == downs
    reference = _diffusers_render(family, Path(result.diffusers_path))
    assert any("lora_magnitude_vector" in n for n, _ in reference.transformer.named_parameters())
    patched = _comfy_render(family, kohya)
    torch.testing.assert_close(
        _predict(family, reference, patched), _predict(family, reference), rtol=1e-4, atol=1e-5
    )


def test_import_detects_both_exported_layouts_as_zimage_by_their_keys(
    trained: Any, tmp_path: Path
) -> None:
    """With headers and by structure alone (headers stripped)."""
    from safetensors.torch import load_file, save_file

    from gpu_runner.lora_import import inspect_adapter_file

    for source in (trained.kohya_path, Path(trained.diffusers_path)):
        bare = tmp_path / f"bare_{Path(source).name}"
        save_file(load_file(source), bare)  # no metadata
        for path in (Path(source), bare):
            info = inspect_adapter_file(path, with_hashes=False)
            assert (info.kind, info.family) == ("lora", "zimage"), path


def test_other_trainers_zimage_layouts_are_detected_too(tmp_path: Path) -> None:
    """Kohya-style names (`lora_unet_layers_0_attention_to_q`, and the `lora_unet__` some
    trainers write), the original fused `attention.qkv`, and a header alone."""
    import torch
    from safetensors.torch import save_file

    from gpu_runner.lora_import import inspect_adapter_file

    w = torch.zeros(2, 8)
    layouts = {
        "kohya": ({"lora_unet_layers_0_attention_to_q.lora_down.weight": w}, {}),
        "kohya2": ({"lora_unet__noise_refiner_1_feed_forward_w1.lora_down.weight": w}, {}),
        "native": ({"diffusion_model.layers.3.attention.qkv.lora_A.weight": w}, {}),
        "header": ({"some_layer.lora_down.weight": w}, {"modelspec.architecture": "Z-Image/lora"}),
    }
    for name, (tensors, meta) in layouts.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path, metadata=meta)
        assert inspect_adapter_file(path, with_hashes=False).family == "zimage", name


def test_prompts_past_the_text_encoders_reach_are_refused(family: Any) -> None:
    from gpu_runner.prompts import InvalidRequestError

    pipe = family.tiny_builders[BASE](0)
    family.check_prompt_length(pipe, "a" * 400, "prompt")  # byte tokens + the template fit
    with pytest.raises(InvalidRequestError, match=r"Z-Image's text encoder reads at most 512"):
        family.check_prompt_length(pipe, "a" * 600, "prompt")


def test_textual_inversion_is_refused_naming_the_methods_that_work() -> None:
    from gpu_runner.training.config import ConfigError, make_config

    with pytest.raises(
        ConfigError,
        match=r"Z-Image base models cannot train textual inversion; use method=lora or "
        r"method=dora",
    ):
        make_config("textual_inversion", "zimage", "style", trigger="zxq")


def test_memory_estimates_use_zimages_own_figures() -> None:
    from storage.families import memory_needed_mb
    from storage.job_payloads import JobKind

    def need(base: str, family: str, kind: str, **kw: Any) -> int:
        value = memory_needed_mb(
            kind, base, {base: {"source": f"/m/{base}", "family": family}}, **kw
        )
        assert value is not None
        return value

    # Its 10.3 B parameters (6.2 B transformer, 4 B Qwen3) outweigh FLUX.2 [klein] 4B's.
    for kind in (JobKind.GENERATE, JobKind.TRAIN):
        assert need("z", "zimage", kind) > need("k", "flux2-klein", kind)
    assert need("z", "zimage", JobKind.TRAIN, rank=128) > need("z", "zimage", JobKind.TRAIN, rank=8)
    assert need("z", "zimage", JobKind.GENERATE, width=1536, height=1536) > need(
        "z", "zimage", JobKind.GENERATE
    )
    assert memory_needed_mb(JobKind.TRAIN, BASE, {}) is None  # built-in


def test_a_zimage_checkpoint_is_told_by_the_key_diffusers_tells_it_by(family: Any) -> None:
    """A single Z-Image checkpoint in the original names (as ComfyUI holds it) is Z-Image to
    the loader, as it is to diffusers' own single-file detection."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from gpu_runner.pipelines import _family_from_checkpoint_keys

    native = _comfy_native_state(family.tiny_builders[BASE](0).transformer)
    assert infer_diffusers_model_type(native) == "z-image-turbo"
    assert _family_from_checkpoint_keys(list(native)).name == "zimage"
    sd_unet = ["model.diffusion_model.input_blocks.0.0.weight"]
    assert _family_from_checkpoint_keys(sd_unet).name == "sd15"
