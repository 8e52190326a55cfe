"""FLUX.1 [dev] on its tiny model: it builds in code, generates with its guidance embedding,
trains a LoRA (and DoRA) with flow matching, stops and resumes exactly, and exports files
whose every key loads where ComfyUI, InvokeAI and diffusers look for it, and which Atelier's
import tells apart from FLUX.2 [klein] files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures",)  # shared session fixtures (tests/runner_fixtures.py)
pytestmark = pytest.mark.runner

TINY = "tiny-flux1"
D, MLP = 3072, 12288  # the real FLUX.1 [dev] block width and MLP width


@pytest.fixture(scope="module")
def family(tiny_builders: Any) -> Any:  # tiny_builders: diffusers imported once, 1 thread
    from gpu_runner.families import get_family

    return get_family("flux1")


def _config(family: Any, method: str = "lora", **kw: Any) -> Any:
    from gpu_runner.training.config import make_config

    values: dict[str, Any] = {
        "trigger": "zxq", "steps": 12, "rank": 4, "alpha": 4, "learning_rate": 5e-3,
        "resolution": 64, "batch_size": 4, "validate_every": 6, "checkpoint_every": 6,
        "sample_steps": 2, "sample_seeds": [1], "target_modules": list(family.lora_targets),
        "output_name": "zxq", "base_model_name": TINY, "base_model_hash": "b" * 64,
        "dataset_hash": "d" * 64, "caption_dropout": 0.25,  # dropout exercises the RNG too
    }  # fmt: skip
    return make_config(method, "flux1", "style", **{**values, **kw})


@pytest.fixture(scope="module")
def trained(family: Any, demo_items: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gpu_runner.training.loop import train

    root = tmp_path_factory.mktemp("flux1")
    pipe = family.tiny_builders[TINY](0)
    return train(_config(family), demo_items, pipe, root / "out", checkpoint_dir=root / "ckpt")


def _image(pipe: Any, seed: int, guidance: float = 3.5) -> np.ndarray:
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt="a red cat", height=64, width=64, num_inference_steps=2, generator=g,
               guidance_scale=guidance, output_type="np", max_sequence_length=32)  # fmt: skip
    return out.images[0]


def _predict(family: Any, lora: Path | None = None, state: dict[str, Any] | None = None) -> Any:
    """The tiny transformer's prediction on fixed inputs: with a LoRA file loaded by
    diffusers, or with `state` (weights) replacing its own."""
    import torch

    pipe = family.tiny_builders[TINY](0)
    if lora is not None:
        pipe.load_lora_weights(lora, adapter_name="atelier_check")
    if state is not None:
        pipe.transformer.load_state_dict(state)
    cond = family.encode_text(pipe, ["a red cat"], torch.device("cpu"))
    noisy = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return family.predict(pipe.transformer, noisy, torch.tensor([500.0]), cond, None)


# --- the model -----------------------------------------------------------------------------


def test_tiny_builds_fast_and_generates_with_its_guidance_embedding(family: Any) -> None:
    pipe = family.tiny_builders[TINY](0)
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert {
        "transformer_blocks.1.attn.add_q_proj",
        "transformer_blocks.1.norm1.linear",
        "single_transformer_blocks.1.proj_mlp",
        "time_text_embed.guidance_embedder.linear_1",
    } <= names
    image = _image(pipe, 1)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(image, _image(pipe, 1))
    # guidance_scale feeds the distilled model's embedding: another value, another image.
    assert not np.array_equal(image, _image(pipe, 1, guidance=1.0))


def test_prompt_length_is_counted_in_t5_tokens(family: Any) -> None:
    from gpu_runner.prompts import InvalidRequestError

    pipe = family.tiny_builders[TINY](0)
    # Past CLIP's 77 tokens (its pooled summary truncates, as in every FLUX.1 tool) is fine.
    family.check_prompt_length(pipe, "a red cat " * 40, "prompt")
    with pytest.raises(InvalidRequestError, match=r"T5 text encoder reads at most 512"):
        family.check_prompt_length(pipe, "a red cat " * 200, "prompt")


def test_a_saved_folder_loads_as_flux1_and_bfl_checkpoints_are_told_apart(
    family: Any, tmp_path: Path
) -> None:
    import torch

    from gpu_runner.devices import DeviceChoice
    from gpu_runner.pipelines import BaseModelSpec, _family_from_checkpoint_keys, load_pipeline

    pipe = family.tiny_builders[TINY](0)
    pipe.save_pretrained(tmp_path / "model")
    spec = BaseModelSpec.from_config("dev", {"source": str(tmp_path / "model"), "family": "flux1"})
    loaded = load_pipeline(spec, DeviceChoice(device="cpu", dtype=torch.float32))
    assert loaded.family == "flux1" and loaded.model_family is family
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    text = "a red cat in the harbour"
    assert loaded.pipe.tokenizer_2(text).input_ids == pipe.tokenizer_2(text).input_ids
    # Single BFL files: FLUX.1 modulates each block, FLUX.2 shares one modulation; both
    # have `double_blocks.0.img_attn.qkv`.
    qkv = "double_blocks.0.img_attn.qkv.weight"
    flux1 = [qkv, "double_blocks.0.img_mod.lin.weight", "single_blocks.0.modulation.lin.weight"]
    flux2 = [qkv, "double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight"]
    assert _family_from_checkpoint_keys(flux1) is family
    assert _family_from_checkpoint_keys(flux2).name == "flux2-klein"


# --- training ------------------------------------------------------------------------------


def test_lora_trains_with_flow_matching_and_its_header_names_the_family(trained: Any) -> None:
    from gpu_runner.training.export import read_safetensors_metadata

    assert len(trained.loss_history) == 12 and np.isfinite(trained.loss_history).all()
    meta = read_safetensors_metadata(trained.kohya_path)
    # kohya sd-scripts' sai_model_spec / flux_utils values for FLUX.1 [dev].
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.trigger_phrase"] == "zxq"
    assert (meta["atelier.dataset_hash"], meta["atelier.base_model_hash"]) == ("d" * 64, "b" * 64)
    assert "modelspec.prediction_type" not in meta  # SD's epsilon / v: none for flow


def test_a_stopped_run_resumes_to_the_same_weights(
    family: Any, trained: Any, demo_items: Any, tmp_path: Path
) -> None:
    """Pre-emption by a quick generation stops between steps and resumes from the
    checkpoint it leaves, as a restart after a crash does: the same losses and weights."""
    import torch
    from safetensors.torch import load_file

    from gpu_runner.training.loop import train

    seen: list[int] = []
    stopped = train(
        _config(family), demo_items, family.tiny_builders[TINY](0), tmp_path / "out",
        checkpoint_dir=tmp_path / "ckpt", should_stop=lambda: len(seen) >= 4,
        progress=lambda step, total, loss, extras: seen.append(step),
    )  # fmt: skip
    assert stopped.stopped and stopped.final_step == 4
    resumed = train(
        _config(family), demo_items, family.tiny_builders[TINY](0), tmp_path / "out",
        checkpoint_dir=tmp_path / "ckpt",
    )  # fmt: skip
    assert resumed.resumed_from == 4 and resumed.loss_history == trained.loss_history
    a, b = load_file(trained.kohya_path), load_file(resumed.kohya_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dora_trains_and_exports_magnitudes_on_the_fused_layers(
    family: Any, demo_items: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from gpu_runner.training.loop import train

    cfg = _config(family, "dora", steps=2, validate_every=2, checkpoint_every=2)
    result = train(
        cfg, demo_items, family.tiny_builders[TINY](0), tmp_path / "o", checkpoint_dir=tmp_path
    )
    kohya = load_file(result.kohya_path)
    loaded: set[str] = set()
    pipe = family.tiny_builders[TINY](0)
    for name, weight in _comfy_bfl_weights(pipe.transformer).items():
        key = _comfy_kohya_name(name)
        if f"{key}.dora_scale" in kohya:  # one magnitude per output row of the BFL weight
            assert kohya[f"{key}.dora_scale"].shape == (weight.shape[0], 1)
            loaded |= {f"{key}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")}
            loaded.add(f"{key}.dora_scale")
    assert set(kohya) - loaded == set(), "lora key not loaded"
    assert "lora_unet_single_blocks_1_linear1.dora_scale" in kohya


# --- ComfyUI -------------------------------------------------------------------------------
# The rule, in our words, from ComfyUI's comfy/lora.py (model_lora_keys_unet, load_lora)
# and comfy/utils.py (flux_to_diffusers): ComfyUI holds FLUX.1 in Black Forest Labs' layout.
# Every weight `diffusion_model.<bfl>.weight` is reached from the LoRA name `lora_unet_`
# + <bfl> with dots as underscores, whose `.lora_up.weight`, `.lora_down.weight`, `.alpha`
# and `.dora_scale` it reads; any other key is reported "lora key not loaded". In that
# layout a double block stacks each stream's q, k, v rows in `img_attn.qkv` / `txt_attn.qkv`
# and a single block stacks q, k, v and proj_mlp in `linear1`; the rest map one to one.
_COMFY_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_COMFY_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}


def _comfy_layout(transformer: Any) -> dict[str, list[str]]:
    """BFL block weight -> the diffusers weights whose rows it stacks, in order."""
    layout: dict[str, list[str]] = {}
    config = transformer.config
    for blocks, bfl, table, count in (
        ("transformer_blocks", "double_blocks", _COMFY_DOUBLE, config.num_layers),
        ("single_transformer_blocks", "single_blocks", _COMFY_SINGLE, config.num_single_layers),
    ):
        for i in range(count):
            for name, parts in table.items():
                layout[f"diffusion_model.{bfl}.{i}.{name}.weight"] = [
                    f"{blocks}.{i}.{p}.weight" for p in parts
                ]
    return layout


def _comfy_bfl_weights(transformer: Any) -> dict[str, Any]:
    import torch

    state = transformer.state_dict()
    return {
        bfl: torch.cat([state[p] for p in parts])
        for bfl, parts in _comfy_layout(transformer).items()
    }


def _comfy_kohya_name(bfl_weight: str) -> str:
    return "lora_unet_" + bfl_weight.removeprefix("diffusion_model.").removesuffix(
        ".weight"
    ).replace(".", "_")


def test_every_kohya_key_loads_in_comfyui_and_changes_the_model_as_the_diffusers_file(
    family: Any, trained: Any
) -> None:
    import torch
    from safetensors.torch import load_file

    kohya = load_file(trained.kohya_path)
    pipe = family.tiny_builders[TINY](0)
    bfl = _comfy_bfl_weights(pipe.transformer)
    loaded: set[str] = set()
    for weight_key, weight in bfl.items():
        name = _comfy_kohya_name(weight_key)
        if f"{name}.lora_down.weight" not in kohya:
            continue
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        scale = float(kohya[f"{name}.alpha"]) / down.shape[0]
        delta = scale * up @ down
        assert delta.shape == weight.shape, name
        bfl[weight_key] = weight + delta
        loaded |= {f"{name}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert loaded and set(kohya) - loaded == set(), "lora key not loaded"
    # Both streams' and both kinds of block's layers are in the file.
    assert {"lora_unet_double_blocks_1_txt_attn_qkv", "lora_unet_single_blocks_1_linear1"} <= {
        k.split(".")[0] for k in kohya
    }

    # The patched BFL weights cut back into diffusers' layers change the model exactly as
    # diffusers' own load of the diffusers-format file does.
    state = pipe.transformer.state_dict()
    for weight_key, parts in _comfy_layout(pipe.transformer).items():
        rows = [state[p].shape[0] for p in parts]
        for part, value in zip(parts, torch.split(bfl[weight_key], rows), strict=True):
            state[part] = value
    base = _predict(family)
    via_comfy = _predict(family, state=state)
    via_diffusers = _predict(family, lora=Path(trained.diffusers_path))
    assert not torch.allclose(base, via_comfy)
    torch.testing.assert_close(via_comfy, via_diffusers, rtol=1e-4, atol=1e-5)


def test_every_diffusers_key_loads_into_the_transformer(family: Any, trained: Any) -> None:
    """diffusers' FluxPipeline.load_lora_weights takes `transformer.<module>.lora_A/B` keys
    onto peft layers of those modules: every tensor of the file lands, unchanged."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(trained.diffusers_path)
    pipe = family.tiny_builders[TINY](0)
    pipe.load_lora_weights(Path(trained.diffusers_path), adapter_name="atelier_check")
    params = dict(pipe.transformer.named_parameters())
    for key, value in saved.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        param = params[f"{module}.lora_{kind.removesuffix('.weight')}.atelier_check.weight"]
        assert torch.equal(param.detach(), value), key


# --- diffusers' kohya converter, at real width --------------------------------------------


def _real_width_peft_state(family: Any, rank: int = 2) -> dict[str, Any]:
    """LoRA weights for one double and one single block of the real FLUX.1 [dev] (width
    3072): the converter's single-block split sizes are the real model's, so the tiny
    model's `linear1` cannot go through it (diffusers hard-codes 3072 x 3 + 12288)."""
    import torch

    widths = {"ff.net.0.proj": (D, MLP), "ff.net.2": (MLP, D), "proj_mlp": (D, MLP)}
    widths |= {"ff_context.net.0.proj": (D, MLP), "ff_context.net.2": (MLP, D)}
    g = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {}
    for block, targets in (
        ("transformer_blocks.0", [t for t in family.lora_targets if t != "proj_mlp"]),
        ("single_transformer_blocks.0", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
    ):
        for target in targets:
            fan_in, fan_out = widths.get(target, (D, D))
            state[f"{block}.{target}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g)
            state[f"{block}.{target}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g)
    return state


def test_real_width_kohya_file_round_trips_through_diffusers_converter(family: Any) -> None:
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    rank, alpha = 2, 1.0
    peft = _real_width_peft_state(family, rank)
    # The converter raises "Incompatible keys detected" for any key it leaves behind.
    converted = _convert_kohya_flux_lora_to_diffusers(family.kohya_state(peft, alpha))
    modules = {k.removesuffix(".lora_A.weight") for k in peft if k.endswith(".lora_A.weight")}
    assert {k.removesuffix(".lora_A.weight") for k in converted if "lora_A" in k} == {
        f"transformer.{m}" for m in modules
    }
    for module in modules:
        # The same linear map (B A, with alpha / rank folded in), seen through random probes.
        a, b = peft[f"{module}.lora_A.weight"], peft[f"{module}.lora_B.weight"]
        probe = torch.randn(a.shape[1], 4, generator=torch.Generator().manual_seed(1))
        a2 = converted[f"transformer.{module}.lora_A.weight"]
        b2 = converted[f"transformer.{module}.lora_B.weight"]
        torch.testing.assert_close(b2 @ (a2 @ probe), alpha / rank * b @ (a @ probe))


# --- InvokeAI ------------------------------------------------------------------------------
# The rules, in our words, from InvokeAI's model probe (backend/model_manager/configs/lora.py,
# _get_flux_lora_format / _is_flux2_lora_state_dict) and its FLUX format detectors
# (backend/patches/lora_conversions/formats.py and the kohya / diffusers utils there):
# - kohya FLUX format: EVERY key is `lora_unet_<name>_blocks_<n>_` followed by one of
#   img_attn, img_mlp, img_mod, txt_attn, txt_mlp, txt_mod, linear1, linear2, modulation
#   (or a CLIP-L text-encoder key, which Atelier does not write);
# - diffusers FLUX format: every key ends in lora_A.weight / lora_B.weight (no alpha, no
#   DoRA magnitude), and q of single block 0 and add_q of double block 0 are present;
# - such a FLUX LoRA is FLUX.2 rather than FLUX.1 when (diffusers) it has FLUX.2's fused
#   `to_qkv_mlp_proj` or gated `ff.linear_in`, or FLUX.2's text-embedder widths; or (kohya)
#   the first `img_attn_proj` reads another width than FLUX.1's 3072, or, at 3072, the
#   first `img_mlp_0` is not 4 x 3072 wide. The kohya width rule needs real widths.
_INVOKE_KOHYA = re.compile(
    r"lora_unet_\w+_blocks_\d+_(img_attn|img_mlp|img_mod|txt_attn|txt_mlp|txt_mod"
    r"|linear1|linear2|modulation)"
)


def _invokeai_format(keys: list[str]) -> str | None:
    if all(_INVOKE_KOHYA.match(k) for k in keys):
        return "kohya"
    lora_only = all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    layers = ("single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj")
    spot = {f"transformer.{m}.lora_{ab}.weight" for m in layers for ab in "AB"}
    return "diffusers" if lora_only and spot <= set(keys) else None


def _invokeai_is_flux2(shapes: dict[str, tuple[int, ...]]) -> bool:
    # Embedder layers, whose widths InvokeAI reads first, are in no Atelier file.
    assert not any(e in k for k in shapes for e in ("context_embedder", "txt_in", "vector_in"))
    if any("to_qkv_mlp_proj" in k or "ff.linear_in" in k for k in shapes):
        return True
    kohya = {k: v for k, v in shapes.items() if k.startswith("lora_unet_")}
    attn = [v for k, v in kohya.items() if "_img_attn_proj.lora_down." in k]
    if attn and attn[0][1] != D:
        return True
    mlp = [v for k, v in kohya.items() if "_img_mlp_0.lora_up." in k]
    return bool(attn and mlp and mlp[0][0] != 4 * D)


def test_invokeai_classifies_both_files_as_flux1_loras(family: Any, trained: Any) -> None:
    from safetensors.torch import load_file

    diffusers_file = load_file(trained.diffusers_path)
    assert _invokeai_format(list(diffusers_file)) == "diffusers"
    assert not _invokeai_is_flux2({k: tuple(v.shape) for k, v in diffusers_file.items()})
    assert _invokeai_format(list(load_file(trained.kohya_path))) == "kohya"
    # The kohya base rule reads real widths: a real-width export of the same layers.
    kohya = family.kohya_state(_real_width_peft_state(family), 1.0)
    assert _invokeai_format(list(kohya)) == "kohya"
    assert not _invokeai_is_flux2({k: tuple(v.shape) for k, v in kohya.items()})


# --- Atelier's import ----------------------------------------------------------------------


def test_import_detects_both_exported_files_as_flux1_by_their_keys(
    trained: Any, tmp_path: Path
) -> None:
    """With headers and by structure alone (headers stripped): FLUX.1 and FLUX.2 [klein]
    files share BFL's kohya names, so without FLUX.1's rules these read as FLUX.2."""
    from safetensors.torch import load_file, save_file

    from gpu_runner.lora_import import inspect_adapter_file

    for source in (trained.kohya_path, Path(trained.diffusers_path)):
        bare = tmp_path / f"bare_{Path(source).name}"
        save_file(load_file(source), bare)  # no metadata
        for path in (Path(source), bare):
            info = inspect_adapter_file(path, with_hashes=False)
            assert (info.kind, info.family) == ("lora", "flux1"), path


def _kohya(name: str, out: int, inp: int, rank: int = 4) -> dict[str, Any]:
    from gpu_runner.lora_import import TensorInfo

    return {
        f"lora_unet_{name}.lora_down.weight": TensorInfo("BF16", (rank, inp)),
        f"lora_unet_{name}.lora_up.weight": TensorInfo("BF16", (out, rank)),
        f"lora_unet_{name}.alpha": TensorInfo("BF16", ()),
    }


def _attention(blocks: range) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for i in blocks:
        keys |= _kohya(f"double_blocks_{i}_img_attn_qkv", 3 * D, D)
        keys |= _kohya(f"double_blocks_{i}_img_attn_proj", D, D)
    return keys


@pytest.mark.parametrize(
    ("what", "tensors", "meta", "family"),
    [
        # klein 4B is 3072 wide too: its fused single-block projection is 9 x, FLUX.1's 7 x.
        ("klein 4B linear1", _kohya("single_blocks_0_linear1", 9 * D, D), {}, "flux2-klein"),
        ("FLUX.1 linear1", _kohya("single_blocks_0_linear1", 7 * D, D), {}, "flux1"),
        ("klein linear2", _kohya("single_blocks_3_linear2", D, 4 * D), {}, "flux2-klein"),
        ("FLUX.1 linear2", _kohya("single_blocks_3_linear2", D, 5 * D), {}, "flux1"),
        ("klein gated MLP", _kohya("double_blocks_0_img_mlp_0", 6 * D, D), {}, "flux2-klein"),
        ("FLUX.1 MLP", _kohya("double_blocks_0_txt_mlp_2", D, 4 * D), {}, "flux1"),
        ("FLUX.1 modulation", _kohya("double_blocks_2_img_mod_lin", 6 * D, D), {}, "flux1"),
        ("FLUX.2 shared modulation", _kohya("double_stream_modulation_img_lin", 6 * D, D), {},
         "flux2-klein"),
        # Attention alone is the same in both, but FLUX.1 has 19 double blocks, FLUX.2 <= 8.
        ("FLUX.1 deep attention", _attention(range(19)), {}, "flux1"),
        ("shallow attention", _attention(range(5)), {}, None),
        ("shallow attention, kohya header", _attention(range(5)),
         {"modelspec.architecture": "flux-1-dev/lora", "ss_base_model_version": "flux1"}, "flux1"),
        ("shallow attention, musubi header", _attention(range(5)),
         {"modelspec.architecture": "Flux.2-klein-4b/lora"}, "flux2-klein"),
        ("shallow attention, SDXL header", _attention(range(5)),
         {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, None),
    ],
)  # fmt: skip
def test_flux1_and_flux2_kohya_files_are_told_apart(
    what: str, tensors: dict[str, Any], meta: dict[str, str], family: str | None
) -> None:
    from gpu_runner.lora_import import detect_family

    assert detect_family(tensors, meta) == family, what
