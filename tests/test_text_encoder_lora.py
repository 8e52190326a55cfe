"""A LoRA on the SD families' CLIP text encoders too (`/style train text_encoder=on`).

The files' text-encoder keys are checked against ComfyUI's rule for them, restated here in
our words from comfy/lora.py `model_lora_keys_clip`: for each encoder layer `b` and each of
the six CLIP linears in its LORA_CLIP_MAP (self_attn q/k/v/out_proj, mlp fc1/fc2), the LoRA
key `lora_te_text_model_encoder_layers_{b}_{module with _}` patches that layer's weight of
the (only) CLIP; with two CLIPs (SDXL) `lora_te1_` patches CLIP-L and `lora_te2_` CLIP-G.
Any other key is reported "lora key not loaded" and ignored. diffusers' own loader
(`load_lora_weights`, which Atelier and InvokeAI's diffusers path use) reads the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

pytest_plugins = ("runner_fixtures", "bot_fixtures")

_CLIP_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "mlp.fc1", "mlp.fc2",
)  # fmt: skip
# The kohya prefix ComfyUI maps to each of the pipeline's text encoders.
_PREFIXES = {"sd15": {"lora_te_": "text_encoder"},
             "sdxl": {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}}  # fmt: skip


def _comfy_clip_map(pipe: Any, family: str) -> dict[str, tuple[str, Any]]:
    """kohya key -> (encoder, weight) for every CLIP linear ComfyUI would patch."""
    found = {}
    for prefix, attr in _PREFIXES[family].items():
        # ComfyUI reads the checkpoint's names (`text_model.encoder.layers...`); transformers
        # 5 builds CLIPTextModel without that `text_model` level.
        encoder = getattr(pipe, attr)
        model = getattr(encoder, "text_model", encoder)
        for b in range(32):
            for module in _CLIP_LINEARS:
                try:
                    layer = model.get_submodule(f"encoder.layers.{b}.{module}")
                except AttributeError:
                    continue
                key = f"{prefix}text_model_encoder_layers_{b}_{module.replace('.', '_')}"
                found[key] = (attr, layer.weight)
    return found


def _config(fast: dict[str, Any], family: str = "sd15", steps: int = 4, every: int = 4,
            **settings: Any) -> Any:  # fmt: skip
    """A rank-4 LoRA with its text-encoder LoRA, trained `steps` at the tiny models' pace."""
    from gpu_runner.training.config import make_config

    values = {**fast, "steps": steps, "checkpoint_every": every, "validate_every": every,
              "sample_seeds": [1], **settings}  # fmt: skip
    return make_config("lora", family, "style", trigger="zxq", rank=4, alpha=4,
                       train_text_encoder=True, **values)  # fmt: skip


def _image(pipe: Any, prompt: str = "zxq, blue and red stripes") -> np.ndarray:
    import torch

    g = torch.Generator("cpu").manual_seed(3)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="np").images[0]


def _embedding(pipe: Any, prompt: str = "zxq, blue and red stripes") -> Any:
    import torch

    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.mark.runner
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_text_encoder_lora_trains_and_loads_in_comfyui_and_diffusers(
    family: str, tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from gpu_runner.training import loop

    pipe = tiny_builders[family](0)
    base_text = _embedding(pipe)
    cfg = _config(fast, family, steps=6, every=6)
    result = loop.train(cfg, demo_items, pipe, tmp_path / "o", checkpoint_dir=tmp_path / "c")

    # The run hands the pipeline back as it came: the text encoder reads as the base's.
    torch.testing.assert_close(_embedding(pipe), base_text)

    tensors = load_file(str(result.kohya_path))
    te_keys = {k.split(".")[0] for k in tensors if k.startswith("lora_te")}
    comfy = _comfy_clip_map(pipe, family)
    # Every CLIP linear of every encoder is trained and every key is one ComfyUI patches...
    assert te_keys == set(comfy)
    for key in te_keys:
        up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
        assert (up @ down).shape == comfy[key][1].shape, key  # ...with a delta of its shape
        assert float(tensors[f"{key}.alpha"]) == 4.0
    # lora_up starts at zero: the encoder's LoRA really learnt.
    assert max(float(tensors[f"{k}.lora_up.weight"].abs().max()) for k in te_keys) > 0
    with safe_open(str(result.kohya_path), "pt") as f:
        assert f.metadata()["ss_text_encoder_lr"] == str(cfg.learning_rate / 2)
    # InvokeAI's probe (backend/model_manager/util/model_util.py lora_token_vector_length)
    # tells SD1/SD2/SDXL by a width read from whichever key it meets first: a UNet attn2
    # to_k/to_v lora_down's input width, or a text key's with `_self_attn_` (te1 + te2
    # widths added). Both must give the UNet's context width, whatever the key order.
    context = pipe.unet.config.cross_attention_dim
    widths: dict[str, int] = {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_down.weight") and "_self_attn_" in key:
            widths.setdefault(key.split("_text_model")[0], int(tensor.shape[1]))
    te_width = widths.get("lora_te", 0) + widths.get("lora_te1", 0) + widths.get("lora_te2", 0)
    unet_width = next(int(t.shape[1]) for k, t in tensors.items()
                      if "_attn2_to_k." in k and k.endswith(".lora_down.weight"))  # fmt: skip
    assert te_width == unet_width == context
    # The diffusers file's text keys are the ones ComfyUI maps for "diffusers lora" too:
    # `<encoder attribute>.text_model.encoder.layers.{b}.{module}` with lora_A / lora_B.
    want = {
        f"{attr}.text_model.encoder.layers.{key.split('_layers_')[1].split('_', 1)[0]}."
        + next(m for m in _CLIP_LINEARS if key.endswith(m.replace(".", "_")))
        for key, (attr, _) in comfy.items()
    }
    diffusers_keys = load_file(str(result.diffusers_path))
    got = {k.split(".lora_")[0] for k in diffusers_keys if k.startswith("text_encoder")}
    assert got == want

    # diffusers' loader reads both files into the text encoder(s) and they render alike;
    # without the text-encoder keys the same file draws another image.
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("lora_te")}, str(unet_only))
    images = {}
    for name, source in {"kohya": result.kohya_path, "diffusers": result.diffusers_path,
                         "unet only": unet_only}.items():  # fmt: skip
        fresh = tiny_builders[family](0)
        fresh.load_lora_weights(str(source), adapter_name="loaded")
        if name != "unet only":
            for attr in _PREFIXES[family].values():
                layers = {n.split(".lora_")[0] for n, _ in getattr(fresh, attr).named_parameters()
                          if "lora_A" in n}  # fmt: skip
                assert len(layers) == sum(1 for a, _ in comfy.values() if a == attr), name
            assert not torch.allclose(_embedding(fresh), base_text)
        images[name] = _image(fresh)
    np.testing.assert_allclose(images["kohya"], images["diffusers"], atol=1e-4)
    assert np.abs(images["kohya"] - images["unet only"]).max() > 1e-3


@pytest.mark.runner
def test_the_adapter_owner_serves_a_text_encoder_style_and_the_plain_model(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    import torch

    from gpu_runner.adapter_state import AdapterState
    from gpu_runner.training import loop

    cfg = _config(fast)
    result = loop.train(
        cfg, demo_items, tiny_builders["sd15"](0), tmp_path / "o", checkpoint_dir=tmp_path / "c"
    )
    warm = tiny_builders["sd15"](0)
    base_image, base_text = _image(warm), _embedding(warm)
    adapters = AdapterState(warm)
    adapters.ensure("zxq", result.diffusers_path, keep=4)
    adapters.show([("zxq", 1.0)])
    styled = _image(warm)
    assert not torch.allclose(_embedding(warm), base_text)  # the style's text encoder
    adapters.show(())
    torch.testing.assert_close(_embedding(warm), base_text)
    np.testing.assert_allclose(_image(warm), base_image, atol=1e-6)
    assert np.abs(styled - base_image).max() > 1e-3


@pytest.mark.runner
def test_a_resumed_text_encoder_run_ends_where_an_unbroken_one_does(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from gpu_runner.training import loop

    cfg = _config(fast, every=2)
    whole = loop.train(
        cfg, demo_items, tiny_builders["sd15"](0), tmp_path / "a", checkpoint_dir=tmp_path / "ca"
    )
    calls = iter(range(100))
    stopped = loop.train(
        cfg, demo_items, tiny_builders["sd15"](0), tmp_path / "b", checkpoint_dir=tmp_path / "cb",
        should_stop=lambda: next(calls) >= 2,
    )  # fmt: skip
    assert stopped.stopped and stopped.final_step == 2
    resumed = loop.train(
        cfg, demo_items, tiny_builders["sd15"](0), tmp_path / "b", checkpoint_dir=tmp_path / "cb"
    )
    assert resumed.resumed_from == 2
    want, got = load_file(str(whole.kohya_path)), load_file(str(resumed.kohya_path))
    te = [k for k in want if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te and all(float((want[k] - got[k]).abs().max()) < 1e-6 for k in te)


def test_chat_asks_for_a_text_encoder_lora_where_the_family_has_one(rig: Any) -> None:
    from bot_fixtures import approved_style

    from storage.models import TrainingRun

    approved_style(rig)
    assert "Text_encoder must be one of" in rig.text(
        "style train", {"name": "ink", "text_encoder": "maybe"}
    )
    refused = rig.text("style train", {"name": "ink", "text_encoder": "on", "method": "ti"})
    assert "text_encoder applies to LoRA and DoRA only" in refused
    assert rig.jobs() == []
    assert "Training **ink**" in rig.text("style train", {"name": "ink", "text_encoder": "on"})
    with rig.db.session() as s:
        (run,) = s.scalars(select(TrainingRun))
    assert run.params["train_text_encoder"] is True
    rig.clock.advance(60)  # past the per-person command rate limit
    approved_style(rig, "fx", "fxs", base="tiny-flux1")
    refused = rig.text("style train", {"name": "fx", "text_encoder": "on"})
    assert "FLUX.1 has no text-encoder LoRA (SD1.5 and SDXL have one)" in refused
    assert "leave text_encoder out" in refused


@pytest.mark.runner
@pytest.mark.parametrize("keeper", ["prior_preservation", "output_preservation"])
def test_the_trigger_keepers_train_the_text_encoder_lora_too(
    keeper: str, tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    # Both losses read the plain captions through the text encoder being trained: with it
    # frozen they used the base's cached reading, which would leave its LoRA untouched there.
    from gpu_runner.training import loop

    cfg = _config(fast, steps=2, every=2, caption_dropout=0.0, **{keeper: 1.0})
    pipe = tiny_builders["sd15"](0)
    seen: list[bool] = []
    encode = loop.encode_text

    def watch(pipe: Any, captions: list[str], device: Any, grad: bool = False) -> Any:
        seen.append(grad and not any("zxq" in c for c in captions))
        return encode(pipe, captions, device, grad=grad)

    loop.encode_text = watch  # type: ignore[assignment]
    try:
        result = loop.train(cfg, demo_items, pipe, tmp_path / "o", checkpoint_dir=tmp_path / "c")
    finally:
        loop.encode_text = encode  # type: ignore[assignment]
    assert result.final_step == 2 and result.kohya_path is not None
    assert any(seen)  # the plain captions went through the trained encoder, with gradients


@pytest.mark.runner
def test_a_generation_lent_the_pipeline_mid_run_reads_the_base_text_encoder(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    import torch

    from gpu_runner.adapter_state import AdapterState
    from gpu_runner.training import loop

    pipe = tiny_builders["sd15"](0)
    base_text = _embedding(pipe)
    trainer = loop._Trainer(
        _config(fast), demo_items, pipe, tmp_path / "o", tmp_path / "c", "cpu", AdapterState(pipe)
    )
    try:
        trainer._setup()
        for _ in range(3):
            trainer.train_step()
        trained_text = _embedding(pipe)
        assert not torch.allclose(trained_text, base_text)  # the run's own text encoder
        with trainer.paused():  # what a generation served between steps sees
            torch.testing.assert_close(_embedding(pipe), base_text)
        torch.testing.assert_close(_embedding(pipe), trained_text)  # and training goes on
        assert all(p.requires_grad for p in trainer.trainable.values())
    finally:
        trainer.cleanup()
