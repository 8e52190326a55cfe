"""SDXL: SD's UNet objective and keys, two CLIP text encoders (hidden states concatenated,
the second's pooled output added), and micro-conditioning on the image's original size and
crop (`time_ids`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import TinyBuilder
from gpu_runner.families.lora_signs import HeaderSign, LoraSigns
from gpu_runner.families.sd15 import _SEP, CONTEXT_KEY, IMPL_SAI, StableDiffusion15
from gpu_runner.training.dataset import TextCond


def _tiny_sdxl(seed: int) -> Any:
    from gpu_runner.tiny_models import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=seed)


class StableDiffusionXL(StableDiffusion15):
    name = "sdxl"
    label = "SDXL"
    runs_label = "SDXL"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-sdxl": _tiny_sdxl}
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    modelspec_implementation = IMPL_SAI
    ss_base_model_version = "sdxl_base_v1-0"
    text_encoder_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    # kohya's SDXL names: te1 the CLIP ViT-L, te2 the OpenCLIP ViT-bigG (ComfyUI: clip_l,
    # clip_g).
    text_encoder_lora_prefixes: ClassVar[Mapping[str, str]] = {
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }
    # Single checkpoint files in SAI's layout name the second text encoder so.
    single_file_marker: ClassVar[str] = "conditioner.embedders.1."
    single_file_fallback = False
    lora_signs = LoraSigns(
        # No attention in the first down block, attention in up block 0, transformer depth
        # above 1, a second text encoder. Read after the transformer families: their
        # diffusers names have `transformer_blocks.1` too.
        own_keys=(
            rf"up_blocks{_SEP}0{_SEP}attentions",
            rf"transformer_blocks{_SEP}[1-9]",
            r"lora_te2_",
            r"^text_encoder_2\.",
        ),
        context_key=CONTEXT_KEY,
        context_dims={2048: "sdxl"},  # CLIP ViT-L and OpenCLIP ViT-bigG side by side
        metadata=(HeaderSign("sdxl", architecture=r"stable-diffusion-xl", base_version=r"sdxl"),),
        # SDXL embeddings carry one set of vectors per text encoder.
        embedding_keys=("clip_g",),
    )

    def pipeline_class(self) -> type[Any]:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load_kwargs(self) -> dict[str, Any]:
        return {}

    def variant_of(self, pipe: Any) -> str:
        return self.name

    def encode_text(
        self, pipe: Any, prompts: list[str], device: torch.device, *, grad: bool = False
    ) -> TextCond:
        with torch.set_grad_enabled(grad):
            hidden, _, pooled, _ = pipe.encode_prompt(
                prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return TextCond(hidden, pooled)

    def _added_cond(self, cond: TextCond, extra: torch.Tensor | None) -> dict[str, Any]:
        assert cond.pooled is not None and extra is not None
        time_ids = extra.to(cond.pooled.device, cond.pooled.dtype)
        return {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids}}

    def load_embedding(self, pipe: Any, state: Mapping[str, torch.Tensor], token: str) -> None:
        # SDXL embeddings carry one set of vectors per text encoder (A1111's clip_g/clip_l).
        pipe.load_textual_inversion(
            state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )  # fmt: skip
        pipe.load_textual_inversion(
            state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
