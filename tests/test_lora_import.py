"""Importing LoRAs and embeddings someone already has: pickles refused, headers checked,
architecture checked against the loaded pipeline."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.lora_import import (
    LoraImportError,
    addnet_hash,
    file_sha256,
    import_adapter,
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


# --- formats, families and the pipeline check ---------------------------------------------


def test_diffusers_lora_is_accepted_for_its_base(sd15_lora: Path, tiny_sd15: Any) -> None:
    info = import_adapter(sd15_lora, tiny_sd15, "tiny-sd15")
    assert (info.kind, info.format, info.family, info.rank) == ("lora", "diffusers", "sd15", 4)
    assert info.sha256 == file_sha256(sd15_lora)
    assert not info.targets_text_encoder


def test_kohya_lora_is_accepted(tmp_path: Path, sd15_lora: Path, tiny_sd15: Any) -> None:
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file

    kohya = convert_state_dict_to_kohya(load_file(str(sd15_lora)))
    assert all(k.startswith("lora_unet_") for k in kohya)
    path = _save(tmp_path / "kohya.safetensors", kohya, {"ss_network_dim": "4"})
    info = import_adapter(path, tiny_sd15, "tiny-sd15")
    assert (info.format, info.family) == ("kohya", "sd15")
    assert info.metadata["ss_network_dim"] == "4"


def test_sdxl_lora_is_refused_for_sd15_base(sdxl_lora: Path, tiny_sd15: Any) -> None:
    with pytest.raises(LoraImportError) as err:
        import_adapter(sdxl_lora, tiny_sd15, "tiny-sd15")
    message = str(err.value)
    assert "was made for SDXL" in message
    assert "base model 'tiny-sd15' is SD1.5" in message
    assert "\n" not in message


def test_sdxl_lora_is_accepted_for_sdxl_base(sdxl_lora: Path, tiny_sdxl: Any) -> None:
    info = import_adapter(sdxl_lora, tiny_sdxl, "tiny-sdxl")
    assert info.family == "sdxl"


def test_sd15_lora_is_refused_for_sdxl_base(sd15_lora: Path, tiny_sdxl: Any) -> None:
    with pytest.raises(LoraImportError, match=r"was made for SD1\.5.*'tiny-sdxl' is SDXL"):
        import_adapter(sd15_lora, tiny_sdxl, "tiny-sdxl")


def test_real_sd15_shapes_do_not_fit_the_tiny_model(
    tmp_path: Path, sd15_lora: Path, tiny_sd15: Any
) -> None:
    """Same layer names as tiny-sd15, but cross-attention reading 768-wide text (real SD1.5)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(sd15_lora))
    for key in list(state):
        if "attn2.to_k.lora_A" in key or "attn2.to_v.lora_A" in key:
            state[key] = torch.zeros(state[key].shape[0], 768)
    path = _save(tmp_path / "real_sd15.safetensors", state)
    info = inspect_adapter_file(path)
    assert info.family == "sd15"  # the 768-wide text says SD1.5: the family matches
    with pytest.raises(LoraImportError, match=r"do not fit base model 'tiny-sd15'.*expects 768->"):
        import_adapter(path, tiny_sd15, "tiny-sd15")


def test_lora_without_lora_layers_is_refused(tmp_path: Path) -> None:
    import torch

    path = _save(
        tmp_path / "weird.safetensors", {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}
    )
    with pytest.raises(LoraImportError, match="no LoRA layers"):
        inspect_adapter_file(path)


def test_embedding_width_is_checked(tmp_path: Path, tiny_sd15: Any) -> None:
    import torch

    good = _save(tmp_path / "good_emb.safetensors", {"emb_params": torch.randn(2, 32)})
    info = import_adapter(good, tiny_sd15, "tiny-sd15")
    assert info.kind == "embedding"
    bad = _save(tmp_path / "bad_emb.safetensors", {"emb_params": torch.randn(2, 768)})
    with pytest.raises(LoraImportError, match=r"768 wide.*32-wide"):
        import_adapter(bad, tiny_sd15, "tiny-sd15")


def test_addnet_hash_ignores_metadata(tmp_path: Path) -> None:
    """A1111's LoRA hash covers tensor data only, so editing metadata keeps it."""
    import torch

    tensors = {"x": torch.arange(6, dtype=torch.float32)}
    a = _save(tmp_path / "a.safetensors", tensors, {"title": "one"})
    b = _save(tmp_path / "b.safetensors", tensors, {"title": "two, longer"})
    assert file_sha256(a) != file_sha256(b)
    assert addnet_hash(a) == addnet_hash(b)
    c = _save(tmp_path / "c.safetensors", {"x": torch.arange(6, dtype=torch.float32) + 1})
    assert addnet_hash(c) != addnet_hash(a)
