"""Exported files (kohya + diffusers LoRA) and the training report, from one shared run.

Header checks re-state, in our own words, how the tools read these files: kohya-ss/sd-scripts
(library/train_util.py precalculate_safetensors_hashes, networks/lora.py save_weights,
library/sai_model_spec.py) and AUTOMATIC1111 (modules/hashes.py addnet_hash_safetensors,
extensions-builtin/Lora/network.py + networks.py: how a LoRA is found by name and by hash).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures", "generation_fixtures")
pytestmark = pytest.mark.runner
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save, save_file  # noqa: E402

from gpu_runner.png_metadata import A1111Parameters, LoraRef, format_parameters  # noqa: E402
from gpu_runner.training.export import (  # noqa: E402
    a1111_lora_hash,
    build_metadata,
    export_kohya,
    lora_file_stem,
)

Builders = dict[str, Callable[..., Any]]


def _image(pipe: Any, prompt: str = "zxq, blue and red stripes", seed: int = 4) -> np.ndarray:
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="np").images[0]


def _noise_prediction(pipe: Any, prompt: str = "zxq, blue and red stripes") -> np.ndarray:
    unet, tokenizer = pipe.unet, pipe.tokenizer
    size, channels = unet.config.sample_size, unet.config.in_channels
    latents = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(4))
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return unet(latents, 500, encoder_hidden_states=text).sample.numpy()


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
    assert meta["modelspec.sai_model_spec"] == "1.0.1"  # kohya's sai_model_spec.py today
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == meta["ss_output_name"] == "zxq_style"
    assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 16
    assert meta["ss_max_train_steps"] == "100" and meta["ss_resolution"] == "(64, 64)"
    assert float(meta["ss_learning_rate"]) == 5e-3
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["atelier.dataset_hash"] == "d" * 64
    assert meta["atelier.base_model_hash"] == "0" * 64
    assert json.loads(meta["atelier.config"])["trigger"] == "zxq"
    assert meta["ss_num_train_images"] == "12"  # a small set: none held out


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


def test_atelier_renders_a_style_at_the_strength_it_was_trained(
    trained_lora: Any, tiny_builders: Builders, generator: Any
) -> None:
    # alpha 16 / rank 8: the scale lives in the diffusers file's header, which a state dict
    # handed over in memory loses (Atelier once rendered such styles at alpha/rank = 1).
    from gpu_runner.generation import GenerationRequest
    from gpu_runner.prompts import AdapterInfo, AdapterUse

    res = trained_lora.result
    assert trained_lora.config.alpha != trained_lora.config.rank
    style = AdapterInfo(
        name="zxq_style", path=str(res.kohya_path), trigger="zxq",
        render_path=str(res.diffusers_path),
    )  # fmt: skip
    prompt = "zxq, blue and red stripes"
    png = generator.generate(
        GenerationRequest(prompt, seed=4, steps=2, cfg=7.0, width=64, height=64,
                          sampler="Euler", adapters=(AdapterUse(style),))
    ).images[0].png  # fmt: skip
    ours = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    from gpu_runner.samplers import make_scheduler

    reference = tiny_builders["sd15"](0)
    reference.load_lora_weights(str(res.diffusers_path), adapter_name="reference")
    reference.scheduler = make_scheduler(reference.scheduler.config, "Euler")
    g = torch.Generator("cpu").manual_seed(4)
    theirs = reference(prompt, num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                       generator=g).images[0]  # fmt: skip
    assert np.abs(ours - np.asarray(theirs).astype(int)).max() <= 1


def test_report_files(trained_lora: Any) -> None:
    res = trained_lora.result
    report = res.report
    with Image.open(report.loss_curve) as curve:
        assert curve.format == "PNG" and curve.size == (700, 400)
    with Image.open(report.grid) as grid:
        # 2 prompts, with and without the trigger, x 2 seeds: columns of 64 px, two rows
        # (base, trained).
        assert grid.format == "PNG" and grid.width > 8 * 64 and grid.height > 2 * 64
        px = np.asarray(grid.convert("RGB"), dtype=np.int16)
    top, bottom = px[16:80, 76:140], px[84:148, 76:140]
    assert np.abs(top - bottom).max() > 0  # base and trained differ on the same seed
    data = json.loads(report.json.read_text())
    assert data["config"]["rank"] == 8 and data["config"]["trigger"] == "zxq"
    assert data["base_val_loss"] == pytest.approx(res.base_val_loss)
    assert data["val_loss"] == pytest.approx(res.val_loss)
    assert len(data["loss_history"]) == 100
    # Each sample prompt with the trigger, then without it, so a leak shows in the samples.
    assert data["sample_prompts"] == ["zxq", "zxq, a red cat", "", "a red cat"]
    assert data["val_images"] == 12 and data["validation"].startswith("the training images")
    # Checkpoint-time samples were written (step 50; the final step goes into the grid).
    assert [p.parent.name for p in res.sample_images] == ["step-000050"] * 8
    stems = [p.stem for p in res.sample_images]
    assert stems[4:6] == ["p0-no-trigger-seed1", "p0-no-trigger-seed2"]


# --- what A1111 and kohya read from the header -----------------------------------------------


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _a1111_addnet_hash(path: Path) -> str:
    """A1111/kohya addnet hash: sha256 of everything after the 8-byte length and the header."""
    n, _ = _header(path)
    return hashlib.sha256(path.read_bytes()[8 + n :]).hexdigest()


def _kohya_legacy_hash(path: Path) -> str:
    """kohya's sshs_legacy_hash: the file re-serialized with only its ss_* metadata, then
    sha256 of the 64 KiB at offset 1 MiB, 8 hex digits."""
    with safe_open(str(path), "pt") as f:
        ss_only = {k: v for k, v in f.metadata().items() if k.startswith("ss_")}
    blob = save(load_file(path), metadata=ss_only)
    return hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def test_kohya_header_carries_the_hashes_a1111_and_kohya_compute(trained_lora: Any) -> None:
    path = Path(trained_lora.result.kohya_path)
    _, header = _header(path)
    meta = header["__metadata__"]
    assert meta["sshs_model_hash"] == _a1111_addnet_hash(path)
    assert meta["sshs_legacy_hash"] == _kohya_legacy_hash(path)
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]  # ModelSpec's form
    assert a1111_lora_hash(path) == meta["sshs_model_hash"]


def test_hashes_follow_kohya_on_a_file_over_one_mib(tmp_path: Path) -> None:
    # Big enough that the legacy window (1 MiB + 64 KiB) holds tensor data, and with a long
    # non-ss_ key so the written header differs from kohya's ss_-only serialization.
    gen = torch.Generator().manual_seed(0)
    state = {
        "down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(8, 40_000, generator=gen),
        "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(320, 8, generator=gen),
    }
    metadata = {"ss_output_name": "big", "ss_network_dim": "8", "atelier.config": "x" * 5000}
    path = export_kohya(tmp_path / "big.safetensors", state, 8.0, metadata)
    meta = _header(path)[1]["__metadata__"]
    assert path.stat().st_size > 0x110000
    assert meta["sshs_model_hash"] == _a1111_addnet_hash(path)
    assert meta["sshs_legacy_hash"] == _kohya_legacy_hash(path)
    raw_window = path.read_bytes()[0x100000:0x110000]
    assert meta["sshs_legacy_hash"] != hashlib.sha256(raw_window).hexdigest()[:8]
    assert meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]


def test_a1111_hashes_a_file_without_sshs_keys_by_its_tensor_data(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.arange(6.0)}, plain, metadata={"ss_output_name": "plain"})
    assert a1111_lora_hash(plain) == _a1111_addnet_hash(plain)


def test_fresh_a1111_finds_the_lora_from_a_pasted_prompt(trained_lora: Any, tmp_path: Path) -> None:
    """A1111's Lora folder on a fresh install: each file is known by its stem and by its
    ss_output_name, and by the first 12 hex digits of its header's sshs_model_hash (no hash is
    computed until the file is used). The PNG's tag and "Lora hashes" must both resolve."""
    exported = Path(trained_lora.result.kohya_path)
    name = lora_file_stem(trained_lora.config.output_name)
    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    shutil.copy(exported, folder / exported.name)

    by_name: dict[str, Path] = {}
    by_hash: dict[str, Path] = {}
    for file in folder.glob("*.safetensors"):
        meta = _header(file)[1].get("__metadata__", {})
        by_name[file.stem] = by_name[meta.get("ss_output_name", file.stem)] = file
        if meta.get("sshs_model_hash"):
            by_hash[meta["sshs_model_hash"][:12]] = file

    infotext = format_parameters(
        A1111Parameters(
            prompt="zxq, a red cat", negative_prompt="", steps=20, sampler="Euler a", cfg=7,
            seed=1, width=64, height=64,
            loras=(LoraRef(name, 0.8, a1111_lora_hash(exported)),),
        )
    )  # fmt: skip
    tag_name = infotext.split("<lora:", 1)[1].split(":", 1)[0]
    hashes = infotext.split('Lora hashes: "', 1)[1].split('"', 1)[0]
    hash_name, short = (part.strip() for part in hashes.split(":", 1))
    assert by_name[tag_name] == by_hash[short] == folder / exported.name
    assert hash_name == tag_name  # A1111 pairs the two by this name
    assert exported.stem == name  # one name: file, ss_output_name and tag


def test_export_refuses_a_file_name_other_than_the_output_name(tmp_path: Path) -> None:
    state = {"mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(2, 4)}
    state["mid_block.attentions.0.proj_in.lora_B.weight"] = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"must be named zxq\.safetensors"):
        export_kohya(tmp_path / "ink.safetensors", state, 2.0, {"ss_output_name": "zxq"})


def test_file_stem_keeps_every_valid_trigger_and_fixes_the_rest() -> None:
    from bot.core.arguments import trigger_word

    # The bot names the download `<trigger>.safetensors`: the stem must be that same name.
    for raw in ["zxq", "Ink_Wash-2", "_ink_", "ñandú", "墨style"]:
        trigger = trigger_word(raw)
        assert lora_file_stem(trigger) == trigger
    assert lora_file_stem("ink wash:2, <v>") == "ink_wash_2___v_"
    assert lora_file_stem("../etc") == "___etc"
    with pytest.raises(ValueError, match="no usable LoRA file name"):
        lora_file_stem(" :: ")


def test_modelspec_keys_follow_kohya(trained_lora: Any) -> None:
    with safe_open(str(trained_lora.result.kohya_path), "pt") as f:
        meta = f.metadata()
    # kohya's BASE_METADATA "MUST" keys.
    for key in ("sai_model_spec", "architecture", "implementation", "title", "resolution"):
        assert meta[f"modelspec.{key}"], key
    assert meta["modelspec.implementation"] == "diffusers"  # kohya: SD1.x LoRA -> diffusers
    assert meta["modelspec.resolution"] == "64x64"
    assert datetime.fromisoformat(meta["modelspec.date"]).tzinfo is not None


@pytest.mark.parametrize(("scheduler", "spec"), [("epsilon", "epsilon"), ("v_prediction", "v")])
def test_prediction_type_is_written_as_modelspec_names_it(
    trained_lora: Any, scheduler: str, spec: str
) -> None:
    now = datetime.now().astimezone()
    meta = build_metadata(
        trained_lora.config, num_train_images=1, captions=["zxq"], started_at=now,
        finished_at=now, steps_done=1, prediction_type=scheduler,
    )  # fmt: skip
    assert meta["modelspec.prediction_type"] == spec


def test_locon_files_load_every_layer_and_predict_as_trained(
    tiny_builders: Builders, tmp_path: Path
) -> None:
    # LoCon targets (conv, ff, proj beside attention), as toy-sd15 trains: diffusers' loader
    # once dropped every attention layer of such a file without a word.
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from gpu_runner.training.export import export_diffusers

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
               "ff.net.2", "conv1", "conv2"]  # fmt: skip
    trained = tiny_builders["sd15"](0)
    config = LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights="gaussian")
    trained.unet.add_adapter(config, adapter_name="style")
    torch.manual_seed(1)
    for name, param in trained.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    state = get_peft_model_state_dict(trained.unet, adapter_name="style")
    layers = {k.split(".lora_")[0] for k in state}
    assert any(".attn2." in m for m in layers) and any(".conv1" in m for m in layers)
    kohya = export_kohya(tmp_path / "style.safetensors", state, 2.0, {})
    diffusers_file = export_diffusers(
        tmp_path / "diffusers", StableDiffusionPipeline, state, config.to_dict()
    )
    want = _noise_prediction(trained)
    for source in (kohya, diffusers_file):
        fresh = tiny_builders["sd15"](0)
        fresh.load_lora_weights(str(source), adapter_name="loaded")
        loaded = {n.split(".lora_")[0] for n, _ in fresh.unet.named_parameters() if "lora_" in n}
        assert loaded == layers, (source.name, sorted(layers - loaded)[:5])
        # One UNet step, not a decoded image: the random tiny VAE magnified float rounding
        # (7e-7 here) to 4e-3 in pixels on CI. Measured: one dropped attention layer moves
        # this prediction by 1.5e-2, a 1% scale error by 2.9e-2.
        np.testing.assert_allclose(_noise_prediction(fresh), want, atol=1e-4, err_msg=source.name)
