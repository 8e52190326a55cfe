"""Session fixtures and helpers shared by the generation-side tests.

diffusers is imported once per session (it costs ~7 s); pipelines are built once and
shared. Tests that change a pipeline (adapters) use their own Generator/cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="session")
def cpu_choice() -> Any:
    import torch

    from gpu_runner.devices import DeviceChoice

    return DeviceChoice(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_sd15() -> Any:
    """A read-only tiny SD1.5 pipeline (do not load adapters into it)."""
    from gpu_runner.tiny_models import build_tiny_sd15_pipeline

    return build_tiny_sd15_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl() -> Any:
    from gpu_runner.tiny_models import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def generator(cpu_choice: Any) -> Any:
    """A Generator on tiny-sd15 and tiny-sdxl, shared by the session (adapters switch per
    request, so tests do not disturb each other)."""
    from gpu_runner.generation import Generator
    from gpu_runner.pipelines import BaseModelSpec, PipelineCache

    specs = [BaseModelSpec("tiny-sd15", "tiny-sd15"), BaseModelSpec("tiny-sdxl", "tiny-sdxl")]
    return Generator(PipelineCache(specs, cpu_choice, budget_bytes=1 << 30))


@pytest.fixture(scope="session")
def embedding_file(lora_dir: Path) -> Path:
    """A two-vector textual-inversion embedding for tiny-sd15 (A1111's `emb_params`)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(4)
    path = lora_dir / "zqxstyle.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=gen) * 2}, str(path))
    return path


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="session")
def sd15_lora(lora_dir: Path) -> Path:
    """A diffusers-format LoRA for tiny-sd15 with visibly non-zero weights."""
    from gpu_runner.tiny_models import build_tiny_sd15_pipeline

    return make_lora(build_tiny_sd15_pipeline(seed=0), lora_dir / "inkwash.safetensors", seed=1)


@pytest.fixture(scope="session")
def sd15_lora_b(lora_dir: Path) -> Path:
    from gpu_runner.tiny_models import build_tiny_sd15_pipeline

    return make_lora(build_tiny_sd15_pipeline(seed=0), lora_dir / "neon.safetensors", seed=2)


@pytest.fixture(scope="session")
def sdxl_lora(lora_dir: Path) -> Path:
    from gpu_runner.tiny_models import build_tiny_sdxl_pipeline

    return make_lora(build_tiny_sdxl_pipeline(seed=0), lora_dir / "xl_style.safetensors", seed=3)


@pytest.fixture(scope="session")
def sd15_single_file(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd15: Any
) -> Iterator[tuple[Path, Path]]:
    """(checkpoint.safetensors in the original SD layout, diffusers config folder)."""
    root = tmp_path_factory.mktemp("single")
    config = root / "config"
    tiny_sd15.save_pretrained(config)
    ckpt = root / "tiny.safetensors"
    save_ldm_checkpoint(tiny_sd15, ckpt)
    yield ckpt, config


def make_lora(pipe: Any, path: Path, seed: int, rank: int = 4, scale: float = 0.15) -> Path:
    """Attach a peft LoRA to the UNet, fill it with seeded noise, save it diffusers-style."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe.unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True),
        adapter_name="atelier_make",
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name and "atelier_make" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    state = get_peft_model_state_dict(pipe.unet, adapter_name="atelier_make")
    type(pipe).save_lora_weights(
        save_directory=str(path.parent), unet_lora_layers=state, weight_name=path.name
    )
    pipe.unet.delete_adapters("atelier_make")
    return path


# --- diffusers -> original (LDM) single-file layout ----------------------------------------
# The inverse of diffusers' single-file converters, for SD1.x layouts (4 blocks, 2 layers
# per block), after diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py.


def _unet_layer_map() -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []  # (ldm, diffusers)
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append(
                    (f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
                )
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            pairs.append(
                (f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.")
            )
            pairs.append(
                (f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0.")
            )
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def _unet_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    layers = _unet_layer_map()
    for key, tensor in state.items():
        new = key
        for hf, ldm in _UNET_TOP.items():
            if new.startswith(hf):
                new = ldm + new[len(hf) :]
        if "resnets" in new:
            for ldm, hf in _UNET_RESNET:
                new = new.replace(hf, ldm)
        for ldm, hf in layers:
            new = new.replace(hf, ldm)
        out["model.diffusion_model." + new] = tensor
    return out


def _vae_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    pairs: list[tuple[str, str]] = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(4):
        for j in range(2):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            pairs.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v.")]
    attn.append(("proj_out.", "to_out.0."))
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        new = key
        if "attentions" in new:
            for ldm, hf in attn:
                new = new.replace(hf, ldm)
        for ldm, hf in pairs:
            new = new.replace(hf, ldm)
        # LDM's VAE attention projections are 1x1 convolutions.
        if "attn_1." in new and new.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out["first_stage_model." + new] = tensor
    return out


def save_ldm_checkpoint(pipe: Any, path: Path) -> Path:
    """Write a tiny SD1.x pipeline as one original-layout `.safetensors` checkpoint."""
    from safetensors.torch import save_file

    state: dict[str, Any] = {}
    state.update(_unet_to_ldm(pipe.unet.state_dict()))
    state.update(_vae_to_ldm(pipe.vae.state_dict()))
    for key, tensor in pipe.text_encoder.state_dict().items():
        # transformers 5 saves CLIP without `text_model.`; single-file loading expects it.
        inner = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + inner] = tensor
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
