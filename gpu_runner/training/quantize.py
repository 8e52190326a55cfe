"""A quantized frozen base for LoRA training (QLoRA): the denoiser's linear layers are
stored as 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA") through bitsandbytes, and the
adapter trains on top in the training dtype. The 12B FLUX.1 or 20B Qwen-Image transformer
then fits a 24 GB card: NF4 keeps 4 bits per weight plus one fp32 scale per 64 weights
(about 0.28 of bf16's bytes). Convolutions, norms and embeddings stay as they are, as in
diffusers' own bitsandbytes quantizer."""

from __future__ import annotations

from typing import Any

import torch


class QuantizationError(RuntimeError):
    """The quantized base cannot be made here; the message says what to do instead."""


def _bnb():  # type: ignore[no-untyped-def]
    try:
        import bitsandbytes
    except ImportError:
        raise QuantizationError(
            "quantize=nf4 needs bitsandbytes on the runner (it comes with Atelier's runner "
            "install: rerun ./install.sh); or train without quantize"
        ) from None
    return bitsandbytes


def quantize_frozen_linears(module: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every `nn.Linear` under `module` by an NF4 `Linear4bit` holding the same
    weights (quantized where they are); returns how many. The layers compute in
    `compute_dtype`, and peft puts its 4-bit LoRA/DoRA layers on them."""
    count = _replace_linears(module, compute_dtype, _bnb())
    # What peft reads to put its bitsandbytes LoRA layers (DoRA included) on them.
    module.is_loaded_in_4bit = True  # type: ignore[assignment]
    return count


def _replace_linears(module: torch.nn.Module, compute_dtype: torch.dtype, bnb: Any) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and not isinstance(child, bnb.nn.Linear4bit):
            device = child.weight.device
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=compute_dtype, quant_type="nf4", device="meta",
            )  # fmt: skip
            # bitsandbytes repacks NF4 weights in place for its AVX512-BF16 CPU kernel on the
            # first no-grad eval forward (a validation pass); the repacked weights break
            # the training steps after it and the absmax of layers narrower than 64.
            layer.support_avx512bf16_for_cpu = False
            weight = child.weight.data.to(compute_dtype)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            layer.weight = layer.weight.to(device)  # bitsandbytes quantizes on the move
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer)
            count += 1
        else:
            count += _replace_linears(child, compute_dtype, bnb)
    return count
