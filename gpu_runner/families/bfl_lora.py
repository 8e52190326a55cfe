"""kohya LoRA keys in Black Forest Labs' module names (`lora_unet_double_blocks_N_
img_attn_qkv`, `lora_unet_single_blocks_N_linear2`), shared by FLUX.1 and FLUX.2: each
peft layer under its BFL name, and the layers BFL's model keeps fused (q/k/v of a stream;
FLUX.1's single-block q/k/v and MLP input) trained apart and exported as one LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

KOHYA_PREFIX = "lora_unet_"
# Any key in BFL's kohya names: a FLUX LoRA, FLUX.1 or FLUX.2 (their diffusers names are
# told by the layers only one of them has; joint attention alone is also Qwen-Image's).
BFL_NAMING = r"^lora_unet_(double|single)_blocks_\d+_"
# diffusers' names, with or without the pipeline's `transformer.` prefix.
DIFFUSERS_PREFIX = r"^(transformer\.)?"
_A, _B, _MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
# peft suffix -> kohya; DoRA magnitudes as LyCORIS/kohya keep them, (out_features, 1).
_PEFT_SUFFIXES = {_A: "lora_down.weight", _B: "lora_up.weight", _MAGNITUDE: "dora_scale"}

Weights = dict[str, torch.Tensor]  # one peft layer's tensors by suffix


@dataclass(frozen=True)
class BflStream:
    """One diffusers block list (`transformer_blocks`) as BFL names it."""

    block: str  # BFL's name for the list: "double_blocks"
    plain: Mapping[str, str]  # diffusers module inside a block -> BFL name
    fused: Mapping[str, tuple[str, ...]]  # BFL name -> its diffusers parts, in row order


def _split(key: str) -> tuple[str, str]:
    for suffix in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), suffix
    raise ValueError(f"unexpected LoRA weight {key!r}: only transformer LoRA is exported")


def _fused_lora(key: str, parts: list[Weights], alpha: float) -> dict[str, torch.Tensor]:
    """One LoRA for a fused layer: down weights stacked, up weights block-diagonal, alpha
    times the number of parts so alpha/rank stays the trained scale. Its delta is exactly
    the parts' deltas stacked."""
    out = {
        f"{key}.lora_down.weight": torch.cat([p[_A] for p in parts]).contiguous(),
        f"{key}.lora_up.weight": torch.block_diag(*[p[_B] for p in parts]).contiguous(),
        f"{key}.alpha": torch.tensor(float(alpha) * len(parts)),
    }
    if _MAGNITUDE in parts[0]:
        # DoRA normalises each output row: the fused rows are the parts' stacked, so the
        # fused magnitude is theirs stacked.
        mags = [p[_MAGNITUDE].reshape(-1, 1) for p in parts]
        out[f"{key}.dora_scale"] = torch.cat(mags).contiguous()
    return out


def _plain_lora(key: str, weights: Weights, alpha: float) -> dict[str, torch.Tensor]:
    out = {f"{key}.alpha": torch.tensor(float(alpha))}
    for suffix, kohya in _PEFT_SUFFIXES.items():
        if suffix in weights:
            value = weights[suffix]
            value = value.reshape(-1, 1) if suffix == _MAGNITUDE else value
            out[f"{key}.{kohya}"] = value.contiguous()
    return out


def bfl_kohya_state(
    peft_state: Mapping[str, torch.Tensor],
    alpha: float,
    streams: Mapping[str, BflStream],
    label: str,
) -> dict[str, torch.Tensor]:
    """peft's transformer LoRA/DoRA weights in BFL's kohya names, so ComfyUI and InvokeAI
    find every key in the model. `streams`: diffusers block list -> its BFL names; `label`
    names the family in errors."""
    modules: dict[str, Weights] = {}
    for key, tensor in peft_state.items():
        module, suffix = _split(key)
        modules.setdefault(module, {})[suffix] = tensor.detach().float().cpu()
    out: dict[str, torch.Tensor] = {}
    for module in sorted(modules):
        if module not in modules:  # taken into a fused layer already
            continue
        stream, _, rest = module.partition(".")
        index, _, inner = rest.partition(".")
        if stream not in streams or not index.isdigit():
            raise ValueError(f"{module} has no {label} (BFL) name; train only layers in the blocks")
        names = streams[stream]
        prefix = f"{KOHYA_PREFIX}{names.block}_{index}_"
        fused = [(n, p) for n, p in names.fused.items() if inner in p]
        if fused:
            name, parts = fused[0]
            members = [f"{stream}.{index}.{p}" for p in parts]
            missing = [m for m in members if m not in modules]
            if missing:
                raise ValueError(
                    f"{label} fuses {', '.join(parts)} into {name}: train all or none "
                    f"({missing} untrained)"
                )
            out.update(_fused_lora(prefix + name, [modules.pop(m) for m in members], alpha))
        elif inner in names.plain:
            out.update(_plain_lora(prefix + names.plain[inner], modules.pop(module), alpha))
        else:
            raise ValueError(f"{module} has no {label} (BFL) name; train only mapped layers")
    return out
