"""Writing trained weights for other tools: kohya-style LoRA safetensors (A1111/Forge, ComfyUI,
InvokeAI) with `ss_*`, `sshs_*` and `modelspec.*` header keys, and diffusers' own LoRA format.

Header rules follow kohya-ss/sd-scripts (`networks/lora.py` save_weights,
`library/train_util.py` precalculate_safetensors_hashes, `library/sai_model_spec.py`) and what
AUTOMATIC1111's `extensions-builtin/Lora` reads back (`network.py`, `networks.py`).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import unicodedata
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file

from gpu_runner.families import family_of_pipeline_class, get_family
from gpu_runner.training.config import AnyTrainConfig, TextualInversionConfig

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
IMPLEMENTATION = "atelier"  # who wrote the file (ss_ keys follow kohya's naming)
# The ModelSpec version kohya's sai_model_spec.py writes today (BASE_METADATA).
SAI_MODEL_SPEC_VERSION = "1.0.1"
# kohya's addnet_hash_legacy: sha256 of the 64 KiB at file offset 1 MiB (header included).
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000

# SAI model spec (https://github.com/Stability-AI/ModelSpec) architecture ids and the
# implementation each family's weights follow are the family's (gpu_runner/families); an
# embedding is written the way kohya writes SAI's own.


def lora_file_stem(name: str) -> str:
    """The one name of an exported LoRA for other tools: the file is `<stem>.safetensors`, its
    header's `ss_output_name` and `modelspec.title` are the stem, and infotext writes
    `<lora:<stem>:w>`. A1111 finds a tag's NAME among file stems and `ss_output_name`s, so the
    three must agree. Pass the style's trigger (what Atelier names the download).

    Identity for every valid trigger (letters, digits, `_`, `-`); anything else that a file
    name or A1111's tag syntax cannot carry (`:`, `,`, `<`, `>`, spaces, `/`, `.`) becomes `_`.
    """
    stem = re.sub(r"[^\w-]", "_", unicodedata.normalize("NFC", name.strip()))
    if not stem.strip("_"):
        raise ValueError(f"{name!r} gives no usable LoRA file name")
    return stem


def _tensor_data(blob: bytes) -> bytes:
    # safetensors: 8-byte little-endian header length, the JSON header, then the tensor data.
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 + n :]


def safetensors_hashes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's precalculate_safetensors_hashes makes them.

    kohya serializes the tensors with only the `ss_*` metadata (user keys may change later),
    then takes sha256 of the tensor data after the header (A1111's addnet hash, Civitai's
    AutoV3; the header does not enter it) and, for the legacy hash, the first 8 hex digits of
    sha256 of the 64 KiB at offset 1 MiB of that serialization (empty for files under 1 MiB).
    """
    blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = hashlib.sha256(_tensor_data(blob)).hexdigest()
    legacy = blob[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]
    return model_hash, hashlib.sha256(legacy).hexdigest()[:8]


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's `__metadata__` (empty when it has none), read without torch."""
    with Path(path).open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return dict(header.get("__metadata__") or {})


def a1111_lora_hash(path: str | Path) -> str:
    """The hash A1111 indexes a LoRA file by (network.py NetworkOnDisk): the header's
    `sshs_model_hash` if it has one, else sha256 of the tensor data after the header.
    Infotext "Lora hashes" must carry its first 12 hex digits to be matched."""
    stored = read_safetensors_metadata(path).get("sshs_model_hash")
    if stored:
        return stored
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def peft_to_kohya(
    state_dict: dict[str, torch.Tensor], alpha: float, prefix: str = "lora_unet_"
) -> dict[str, torch.Tensor]:
    """peft UNet keys (diffusers module names) -> kohya keys.

    kohya's SD1.x LoRA names are the diffusers module paths with '.' -> '_', so these keys
    are exactly what sd-scripts writes for real SD1.5 (e.g. `lora_unet_down_blocks_0_attentions
    _0_transformer_blocks_0_attn1_to_q.lora_down.weight`); A1111, ComfyUI and diffusers map the
    same names for SDXL.
    """
    out: dict[str, torch.Tensor] = {}
    suffixes = {
        ".lora_A.weight": "lora_down.weight",
        ".lora_B.weight": "lora_up.weight",
        ".lora_magnitude_vector": "dora_scale",
    }
    for key, tensor in state_dict.items():
        for peft_suffix, kohya_suffix in suffixes.items():
            if key.endswith(peft_suffix):
                module = prefix + key.removesuffix(peft_suffix).replace(".", "_")
                value = tensor.detach().float().cpu().contiguous()
                if kohya_suffix == "dora_scale" and value.dim() == 1:
                    # LyCORIS/kohya keep DoRA's magnitude as (out_features, 1).
                    value = value.reshape(-1, 1)
                out[f"{module}.{kohya_suffix}"] = value
                if kohya_suffix == "lora_down.weight":
                    out[f"{module}.alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"unexpected LoRA weight {key!r}: only UNet LoRA/DoRA is exported")
    return out


def clip_checkpoint_names(peft_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's LoRA keys under the checkpoint's module paths
    (`text_model.encoder.layers.N...`), the names kohya, ComfyUI and diffusers' files use.
    transformers 5 builds CLIPTextModel without its `text_model.` level (it strips it on
    load) but keeps it in CLIPTextModelWithProjection."""
    return {
        key if key.startswith("text_model.") else f"text_model.{key}": value
        for key, value in peft_state.items()
    }


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's ss_tag_frequency: how often each comma-separated tag appears in the captions."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(t.strip() for t in caption.split(",") if t.strip())
    return dict(counts.most_common())


# What kohya writes as ss_optimizer: the optimizer's class path.
OPTIMIZER_CLASSES = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "prodigy": "prodigyopt.Prodigy",
}


def build_metadata(
    config: AnyTrainConfig,
    *,
    num_train_images: int,
    captions: list[str],
    started_at: datetime,
    finished_at: datetime,
    steps_done: int,
    prediction_type: str | None = None,
) -> dict[str, str]:
    """Header keys (all strings, as safetensors requires) for kohya and modelspec readers.

    `prediction_type` is the scheduler's ("epsilon" or "v_prediction"); kohya writes it as
    modelspec's "epsilon" / "v". The `sshs_*` hashes are added by `export_kohya`, which has
    the tensors.
    """
    res = config.resolution
    family = get_family(config.family)
    is_ti = isinstance(config, TextualInversionConfig)
    kind = "textual-inversion" if is_ti else "lora"
    stem = lora_file_stem(config.output_name)
    text_lr = config.learning_rate if is_ti else config.text_encoder_lr  # type: ignore[union-attr]
    comment = f"trigger: {config.trigger}; trained with Atelier ({config.method}, {config.preset})"
    meta: dict[str, str] = {
        "ss_output_name": stem,
        "ss_training_comment": comment,
        "ss_base_model_version": family.ss_base_model_version,
        "ss_sd_model_name": config.base_model_name,
        "ss_new_sd_model_hash": config.base_model_hash,
        "ss_v2": "False",
        "ss_resolution": f"({res}, {res})",
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": "0" if is_ti else str(config.learning_rate),
        "ss_text_encoder_lr": str(text_lr) if text_lr else "0",
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(steps_done),
        "ss_num_train_images": str(num_train_images),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_min_snr_gamma": str(config.min_snr_gamma) if config.min_snr_gamma else "None",
        "ss_caption_dropout_rate": str(config.caption_dropout),
        # kohya's name for the prior-preservation weight (0: none was used).
        "ss_prior_loss_weight": str(getattr(config, "prior_preservation", 0.0)),
        "ss_seed": str(config.seed),
        # kohya's names and values for these recipe settings (train_network.py's metadata).
        "ss_optimizer": OPTIMIZER_CLASSES[config.optimizer],
        "ss_noise_offset": str(config.noise_offset) if config.noise_offset else "None",
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation),
        "ss_flip_aug": str(config.flip),
        "ss_training_started_at": str(started_at.timestamp()),
        "ss_training_finished_at": str(finished_at.timestamp()),
        "ss_tag_frequency": json.dumps({stem: tag_frequency(captions)}),
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": f"{family.modelspec_architecture}/{kind}",
        "modelspec.implementation": (
            family.embedding_modelspec_implementation if is_ti else family.modelspec_implementation
        ),
        "modelspec.title": stem,
        "modelspec.trigger_phrase": config.trigger,
        # kohya writes the ISO-8601 date and time to the second.
        "modelspec.date": finished_at.replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.author": IMPLEMENTATION,
        "modelspec.description": comment,
        "atelier.method": config.method,
        "atelier.preset": config.preset,
        "atelier.dataset_hash": config.dataset_hash,
        "atelier.base_model_hash": config.base_model_hash,
        "atelier.config": config.model_dump_json(),
    }
    modelspec_prediction = {"epsilon": "epsilon", "v_prediction": "v"}.get(prediction_type or "")
    if modelspec_prediction is not None:  # flow-matching models have no modelspec value
        meta["modelspec.prediction_type"] = modelspec_prediction
    if not is_ti:
        rank = config.rank  # type: ignore[union-attr]
        meta["ss_network_dim"] = str(rank)
        meta["ss_network_alpha"] = str(config.alpha)  # type: ignore[union-attr]
        if config.method == "dora":
            meta["ss_network_module"] = "lycoris.kohya"
            meta["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True"})
        else:
            meta["ss_network_module"] = "networks.lora"
    return meta


def export_kohya(
    path: Path,
    peft_state: dict[str, torch.Tensor],
    alpha: float,
    metadata: dict[str, str],
    *,
    family: str = "sd15",
    text_states: Mapping[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """The kohya file, with kohya's `sshs_*` hashes in the header so A1111 indexes it on a fresh
    install without hashing it first (and matches pasted "Lora hashes" to it). Keys are named
    by the family's rule (`ModelFamily.kohya_state`); a text encoder trained too (its peft
    state in `text_states`, by pipeline attribute) adds its `lora_te*` keys.

    `path` must be `<ss_output_name>.safetensors` (see `lora_file_stem`): one name for the file,
    the header and the tag.
    """
    stem = metadata.get("ss_output_name")
    if stem is not None and path.name != f"{stem}.safetensors":
        raise ValueError(f"kohya file {path.name!r} must be named {stem}.safetensors")
    fam = get_family(family)
    tensors = fam.kohya_state(peft_state, alpha)
    for encoder, state in (text_states or {}).items():
        tensors.update(fam.kohya_text_encoder_state(encoder, state, alpha))
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    header = {
        **metadata,
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": legacy_hash,
        # ModelSpec's hash: sha256 of the tensor data after the header, written "0x...".
        "modelspec.hash_sha256": f"0x{model_hash}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=header)
    return path


def export_diffusers(
    directory: Path,
    pipeline_cls: Any,
    peft_state: dict[str, torch.Tensor],
    adapter_metadata: dict[str, Any],
    text_states: Mapping[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
) -> Path:
    """diffusers' format via the pipeline class's own `save_lora_weights` (peft config, incl.
    alpha and DoRA, travels in the file's header). `text_states`: the (peft state, peft
    config) of each text encoder trained too, by pipeline attribute.

    The keys stay in peft's `lora_A`/`lora_B` form. diffusers' `convert_state_dict_to_diffusers`
    renames only attention projections (`to_q.lora.down`), and its loader decides the format
    from the first key alone: with LoCon targets (conv, ff, proj) that first key is `lora_A`,
    so every renamed attention key was silently dropped on load.
    """
    directory.mkdir(parents=True, exist_ok=True)
    family = family_of_pipeline_class(pipeline_cls)
    texts = text_states or {}
    metadata = {
        f"{attr}_lora_adapter_metadata": _json_ready(meta)
        for attr, meta in {
            family.denoiser_attr: adapter_metadata,
            **{attr: meta for attr, (_, meta) in texts.items()},
        }.items()
    }
    pipeline_cls.save_lora_weights(
        save_directory=directory,
        **family.diffusers_layers(peft_state, {attr: st for attr, (st, _) in texts.items()}),
        **metadata,
        weight_name=DIFFUSERS_WEIGHT_NAME,
        safe_serialization=True,
    )
    return directory / DIFFUSERS_WEIGHT_NAME


def _json_ready(adapter_metadata: dict[str, Any]) -> dict[str, Any]:
    # peft keeps target_modules as a set, which the JSON header cannot hold.
    metadata = dict(adapter_metadata)
    if isinstance(metadata.get("target_modules"), set):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    return metadata


def now_utc() -> datetime:
    return datetime.now(UTC)
