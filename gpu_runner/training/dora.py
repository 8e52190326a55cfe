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
from peft.utils.integrations import dequantize_module_weight

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
        if not isinstance(base, torch.nn.Linear | torch.nn.Conv2d):
            raise ValueError(f"DoRA export handles linear and conv layers only, not {key}")
        with torch.no_grad():
            # A quantized base (QLoRA) trained against its dequantized weights.
            weight = dequantize_module_weight(base).detach().float()
            # Conv as ComfyUI patches it: up and down flattened past dim 0, the product
            # reshaped to the kernel (peft's lora_B of a conv is a 1x1 conv).
            up = layer.lora_B[adapter_name].weight.float().flatten(1)
            down = layer.lora_A[adapter_name].weight.float().flatten(1)
            merged = weight + (up @ down).reshape(weight.shape) * layer.scaling[adapter_name]
            magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach().float()
            rows = weight.flatten(1).norm(dim=1) + _EPS
            scale = magnitude.reshape(-1) * rows / merged.flatten(1).norm(dim=1)
        # Output axis first, then ones: (out, 1) for linear, (out, 1, 1, 1) for conv, so it
        # broadcasts over the weight in ComfyUI.
        out[key] = scale.reshape(weight.shape[0], *[1] * (weight.dim() - 1)).cpu()
    return out
