"""Writing trained weights for other tools: kohya-style LoRA safetensors (A1111/Forge, ComfyUI,
InvokeAI) with `ss_*` and `modelspec.*` header keys, and diffusers' own LoRA format."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gpu_runner.training.config import AnyTrainConfig, TextualInversionConfig

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
IMPLEMENTATION = "atelier"  # who wrote the file (ss_ keys follow kohya's naming)

# SAI model spec (https://github.com/Stability-AI/ModelSpec) architecture ids and the
# implementation each family's weights follow (as kohya's sai_model_spec.py writes them).
_ARCH = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}
_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
_IMPL_SAI = "https://github.com/Stability-AI/generative-models"
_IMPL = {"sd15": "diffusers", "sdxl": _IMPL_SAI}


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
                if kohya_suffix == "dora_scale":
                    # LyCORIS/kohya keep DoRA's magnitude as (out_features, 1).
                    value = value.reshape(-1, 1)
                out[f"{module}.{kohya_suffix}"] = value
                if kohya_suffix == "lora_down.weight":
                    out[f"{module}.alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"unexpected LoRA weight {key!r}: only UNet LoRA/DoRA is exported")
    return out


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's ss_tag_frequency: how often each comma-separated tag appears in the captions."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(t.strip() for t in caption.split(",") if t.strip())
    return dict(counts.most_common())


def build_metadata(
    config: AnyTrainConfig,
    *,
    num_train_images: int,
    captions: list[str],
    started_at: datetime,
    finished_at: datetime,
    steps_done: int,
) -> dict[str, str]:
    """Header keys (all strings, as safetensors requires) for kohya and modelspec readers."""
    res = config.resolution
    is_ti = isinstance(config, TextualInversionConfig)
    kind = "textual-inversion" if is_ti else "lora"
    comment = f"trigger: {config.trigger}; trained with Atelier ({config.method}, {config.preset})"
    meta: dict[str, str] = {
        "ss_output_name": config.output_name,
        "ss_training_comment": comment,
        "ss_base_model_version": _BASE_VERSION[config.family],
        "ss_sd_model_name": config.base_model_name,
        "ss_new_sd_model_hash": config.base_model_hash,
        "ss_v2": "False",
        "ss_resolution": f"({res}, {res})",
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": "0" if is_ti else str(config.learning_rate),
        "ss_text_encoder_lr": str(config.learning_rate) if is_ti else "0",
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(steps_done),
        "ss_num_train_images": str(num_train_images),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_min_snr_gamma": str(config.min_snr_gamma) if config.min_snr_gamma else "None",
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_seed": str(config.seed),
        "ss_optimizer": "torch.optim.AdamW",
        "ss_training_started_at": str(started_at.timestamp()),
        "ss_training_finished_at": str(finished_at.timestamp()),
        "ss_tag_frequency": json.dumps({config.output_name: tag_frequency(captions)}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_ARCH[config.family]}/{kind}",
        "modelspec.implementation": _IMPL_SAI if is_ti else _IMPL[config.family],
        "modelspec.title": config.output_name,
        "modelspec.trigger_phrase": config.trigger,
        "modelspec.date": finished_at.date().isoformat(),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.author": IMPLEMENTATION,
        "modelspec.description": comment,
        "atelier.method": config.method,
        "atelier.preset": config.preset,
        "atelier.dataset_hash": config.dataset_hash,
        "atelier.base_model_hash": config.base_model_hash,
        "atelier.config": config.model_dump_json(),
    }
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
    path: Path, peft_state: dict[str, torch.Tensor], alpha: float, metadata: dict[str, str]
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(peft_to_kohya(peft_state, alpha), path, metadata=metadata)
    return path


def export_diffusers(
    directory: Path,
    pipeline_cls: Any,
    peft_state: dict[str, torch.Tensor],
    adapter_metadata: dict[str, Any],
) -> Path:
    """diffusers' format via the pipeline class's own `save_lora_weights` (peft config, incl.
    alpha and DoRA, travels in the file's header)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    directory.mkdir(parents=True, exist_ok=True)
    metadata = dict(adapter_metadata)
    if isinstance(metadata.get("target_modules"), set):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline_cls.save_lora_weights(
        save_directory=directory,
        unet_lora_layers=convert_state_dict_to_diffusers(
            {k: v.detach().float().cpu() for k, v in peft_state.items()}
        ),
        unet_lora_adapter_metadata=metadata,
        weight_name=DIFFUSERS_WEIGHT_NAME,
        safe_serialization=True,
    )
    return directory / DIFFUSERS_WEIGHT_NAME


def now_utc() -> datetime:
    return datetime.now(UTC)
