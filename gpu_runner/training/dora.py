"""DoRA magnitudes for the kohya file, written so ComfyUI renders what peft trained.

peft's DoRA scales each output row of the merged weight: W' = m * (W + dW) / ||W + dW||_row.
ComfyUI's `weight_decompose` (comfy/weight_adapter/base.py; Forge carries the same code)
treats a `dora_scale` of shape (out, 1) as output-axis and divides by the row norms of the
*original* weight: W' = s * (W + dW) / (||W||_row + eps). Storing s = m * (||W||_row + eps)
/ ||W + dW||_row makes the two equal for the base model the LoRA was trained on. The other
layout, (1, in), means column norms in ComfyUI, A1111 and LyCORIS alike, which is not what
peft trains; no layout renders peft's DoRA exactly in all of them.
"""

from __future__ import annotations

from typing import Any

import torch

MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
# ComfyUI patches weights in float32 (its intermediate dtype) and adds that dtype's eps.
_EPS = torch.finfo(torch.float32).eps


def comfy_dora_scales(
    unet: Any, adapter_name: str, peft_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """peft's magnitude entries of `peft_state`, replaced by the `dora_scale` values that
    ComfyUI's rule turns back into the trained weights."""
    out: dict[str, torch.Tensor] = {}
    for key in peft_state:
        if not key.endswith(MAGNITUDE_SUFFIX):
            continue
        layer = unet.get_submodule(key.removesuffix(MAGNITUDE_SUFFIX))
        base = layer.get_base_layer()
        if not isinstance(base, torch.nn.Linear):
            raise ValueError(f"DoRA export handles linear layers only, not {key}")
        with torch.no_grad():
            weight = base.weight.detach().float()
            delta = (
                layer.lora_B[adapter_name].weight.float()
                @ layer.lora_A[adapter_name].weight.float()
            )
            merged = weight + delta * layer.scaling[adapter_name]
            magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach().float()
            scale = magnitude * (weight.norm(dim=1) + _EPS) / merged.norm(dim=1)
        out[key] = scale.cpu()
    return out
