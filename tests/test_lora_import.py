"""Reading adapter files before anything loads them: pickles refused, headers checked, the
kind and family read (what the generator checks a style's file with)."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.lora_import import (
    LoraImportError,
    file_sha256,
    inspect_adapter_file,
    read_safetensors_header,
)

pytest_plugins = ("generation_fixtures",)
pytestmark = pytest.mark.runner


def _save(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


# --- pickles and broken files ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_suffixes_are_refused_with_reason(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"style{suffix}"
    path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [1.0]}))
    with pytest.raises(LoraImportError, match="can run arbitrary code"):
        inspect_adapter_file(path)


def test_torch_save_zip_named_safetensors_is_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "sneaky.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(LoraImportError, match=r"named \.safetensors but it is a zip archive"):
        inspect_adapter_file(path)


def test_raw_pickle_named_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sneaky2.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(LoraImportError, match="it is a Python pickle"):
        inspect_adapter_file(path)


def test_other_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "style.txt"
    path.write_text("hello")
    with pytest.raises(LoraImportError, match=r"only \.safetensors"):
        inspect_adapter_file(path)


def test_oversized_header_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(LoraImportError, match="header length"):
        read_safetensors_header(path)


def test_truncated_file_is_refused(tmp_path: Path, sd15_lora: Path) -> None:
    data = sd15_lora.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraImportError, match="truncated or corrupt"):
        read_safetensors_header(path)


def test_header_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(LoraImportError, match="not valid JSON"):
        read_safetensors_header(path)


def test_full_checkpoint_is_not_a_lora(tmp_path: Path) -> None:
    import torch

    path = _save(
        tmp_path / "model.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(2)}
    )
    with pytest.raises(LoraImportError, match="full model checkpoint"):
        inspect_adapter_file(path)


def test_lycoris_loha_is_refused(tmp_path: Path) -> None:
    import torch

    path = _save(
        tmp_path / "loha.safetensors",
        {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 2)},
    )
    with pytest.raises(LoraImportError, match="LoHa"):
        inspect_adapter_file(path)


# --- kinds and families --------------------------------------------------------------------


def test_a_diffusers_lora_is_read_with_its_family_and_hash(sd15_lora: Path) -> None:
    info = inspect_adapter_file(sd15_lora)
    assert (info.kind, info.family) == ("lora", "sd15")
    assert info.sha256 == file_sha256(sd15_lora)
    assert inspect_adapter_file(sd15_lora, with_hashes=False).sha256 == ""


def test_a_kohya_lora_is_read_with_its_family(tmp_path: Path, sd15_lora: Path) -> None:
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file

    kohya = convert_state_dict_to_kohya(load_file(str(sd15_lora)))
    assert all(k.startswith("lora_unet_") for k in kohya)
    path = _save(tmp_path / "kohya.safetensors", kohya, {"ss_network_dim": "4"})
    assert _kind_and_family(path) == ("lora", "sd15")


def test_an_sdxl_lora_is_told_from_an_sd15_one(sdxl_lora: Path) -> None:
    assert _kind_and_family(sdxl_lora) == ("lora", "sdxl")


def test_the_text_width_a_lora_reads_names_its_family(tmp_path: Path, sd15_lora: Path) -> None:
    """Same layer names as tiny-sd15, but cross-attention reading 768-wide text (real SD1.5)
    or 1024-wide (SD2)."""
    import torch
    from safetensors.torch import load_file

    for width, family in ((768, "sd15"), (1024, "sd2")):
        state = load_file(str(sd15_lora))
        for key in list(state):
            if "attn2.to_k.lora_A" in key or "attn2.to_v.lora_A" in key:
                state[key] = torch.zeros(state[key].shape[0], width)
        path = _save(tmp_path / f"text_{width}.safetensors", state)
        assert _kind_and_family(path) == ("lora", family)


def test_embeddings_are_told_from_loras(tmp_path: Path) -> None:
    import torch

    sd15 = _save(tmp_path / "emb.safetensors", {"emb_params": torch.randn(2, 32)})
    assert _kind_and_family(sd15) == ("embedding", None)
    both = {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}
    assert _kind_and_family(_save(tmp_path / "xl.safetensors", both)) == ("embedding", "sdxl")


def _kind_and_family(path: Path) -> tuple[str, str | None]:
    info = inspect_adapter_file(path, with_hashes=False)
    return info.kind, info.family


def test_lora_without_lora_layers_is_refused(tmp_path: Path) -> None:
    import torch

    path = _save(
        tmp_path / "weird.safetensors", {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}
    )
    with pytest.raises(LoraImportError, match="no LoRA layers"):
        inspect_adapter_file(path)
