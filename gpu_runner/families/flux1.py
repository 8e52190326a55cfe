"""FLUX.1 [dev] (and [schnell], same layout): a double- and single-stream transformer on
2x2-patched 16-channel latents, CLIP-L for a pooled vector and T5 for the prompt's tokens,
a guidance embedding instead of CFG on the guidance-distilled dev model, flow matching, and
kohya keys in Black Forest Labs' module names (`lora_unet_double_blocks_N_img_attn_qkv`,
`lora_unet_single_blocks_N_linear1`, ...), with the layers BFL's model fuses (q/k/v of each
stream; a single block's q/k/v and MLP input) fused as it holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import TinyBuilder, compute_dtype
from gpu_runner.families.bfl_lora import (
    BFL_NAMING,
    DIFFUSERS_PREFIX,
    BflStream,
    bfl_kohya_state,
)
from gpu_runner.families.flow_matching import MAX_SEQUENCE_LENGTH, FlowMatchingFamily
from gpu_runner.families.lora_signs import HeaderSign, LoraSigns
from gpu_runner.training.dataset import TextCond

# The guidance the dev transformer's embedding is given while training: 1.0, as kohya
# sd-scripts' docs/flux_train_network.md says to set it (its default 3.5 is for sampling)
# and diffusers' README_flux.md example does (`--guidance_scale=1`); generation keeps 3.5.
TRAIN_GUIDANCE = 1.0
# diffusers block lists -> BFL's names: the tables diffusers' FLUX.1 kohya converter
# (loaders/lora_conversion_utils.py, _convert_kohya_flux_lora_to_diffusers) reads back.
STREAMS = {
    "transformer_blocks": BflStream(
        "double_blocks",
        plain={
            "attn.to_out.0": "img_attn_proj",
            "attn.to_add_out": "txt_attn_proj",
            "ff.net.0.proj": "img_mlp_0",
            "ff.net.2": "img_mlp_2",
            "ff_context.net.0.proj": "txt_mlp_0",
            "ff_context.net.2": "txt_mlp_2",
            "norm1.linear": "img_mod_lin",
            "norm1_context.linear": "txt_mod_lin",
        },
        fused={
            "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        },
    ),
    "single_transformer_blocks": BflStream(
        "single_blocks",
        plain={"proj_out": "linear2", "norm.linear": "modulation_lin"},
        fused={"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
    ),
}


def _tiny(seed: int) -> Any:
    from gpu_runner.families.tiny_flux1 import build_tiny_flux1_pipeline

    return build_tiny_flux1_pipeline(seed)


class Flux1(FlowMatchingFamily):
    name = "flux1"
    label = "FLUX.1"
    runs_label = "FLUX.1 [dev]/[schnell]"
    pipeline_class_names = ("FluxPipeline",)
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-flux1": _tiny}
    # diffusers' train_dreambooth_lora_flux.py default targets (both streams' attention and
    # feed-forwards), plus the single blocks' `proj_mlp` so that their fused `linear1` (q,
    # k, v and the MLP input in BFL's model) is trained whole.
    lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
        "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    )  # fmt: skip
    # "attention": both streams' attention, and the single blocks' `proj_mlp` that BFL's
    # linear1 fuses with their q/k/v (it trains whole or not at all); "full" (the default)
    # adds the double blocks' feed-forwards.
    lora_layer_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "attention": (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
            "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "proj_mlp",
        ),
        "full": lora_targets,
    }  # fmt: skip
    # kohya-ss/sd-scripts library/sai_model_spec.py: ARCH_FLUX_1_DEV and IMPL_FLUX.
    modelspec_architecture = "flux-1-dev"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    # kohya-ss/sd-scripts library/flux_utils.py MODEL_VERSION_FLUX_V1.
    ss_base_model_version = "flux1"
    # BFL checkpoints: FLUX.1 modulates each double block itself (FLUX.2 shares one).
    single_file_marker = "double_blocks.0.img_mod.lin."
    # With the guidance embedding (true_cfg_scale 1) FluxPipeline reads no negative prompt.
    takes_negative_prompt = False
    lora_signs = LoraSigns(
        # Layers FLUX.2 lacks: each block's own modulation, and a single block's q/k/v and
        # MLP kept apart in diffusers' names.
        own_keys=(
            r"^lora_unet_double_blocks_\d+_(img|txt)_mod_lin\.",
            r"^lora_unet_single_blocks_\d+_modulation_lin\.",
            DIFFUSERS_PREFIX
            + r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)\.",
            DIFFUSERS_PREFIX + r"single_transformer_blocks\.\d+\.norm\.linear\.",
        ),
        shared_naming=BFL_NAMING,
        # Widths over the model width D: a single block's linear1 is 7D (q, k, v and a 4D
        # MLP), linear2 reads 5D; a double block's MLP is 4D.
        width_ratios={
            "linear1": Fraction(7),
            "linear2": Fraction(1, 5),
            "mlp_0": Fraction(4),
            "mlp_2": Fraction(1, 4),
        },
        # 19 double blocks; every FLUX.2 has at most 8.
        deep_blocks=(r"^lora_unet_double_blocks_(\d+)_", 8),
        # kohya's sai_model_spec: flux-1-dev, flux-1-schnell, flux-1; flux_utils: "flux1".
        metadata=(HeaderSign("flux1", architecture=r"flux-1", base_version=r"flux1$"),),
    )

    def pipeline_class(self) -> type[Any]:
        from diffusers import FluxPipeline

        return FluxPipeline

    def encode_text(
        self, pipe: Any, prompts: list[str], device: torch.device, *, grad: bool = False
    ) -> TextCond:
        with torch.set_grad_enabled(grad):
            hidden, pooled, _ = pipe.encode_prompt(
                prompts, device=device, num_images_per_prompt=1,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )  # fmt: skip
        return TextCond(hidden, pooled)

    # T5 carries the prompt; CLIP-L gives only a pooled summary of its first 77 tokens,
    # which every FLUX.1 tool truncates likewise.
    prompt_encoder_label = "T5 text encoder"

    def prompt_tokens(self, pipe: Any, text: str) -> int:
        return len(pipe.tokenizer_2(text)["input_ids"])  # with its end-of-text token

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextCond,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        from diffusers import FluxPipeline as P

        dtype = compute_dtype(denoiser)
        n, c, h, w = noisy.shape
        guidance = None
        if denoiser.config.guidance_embeds:  # type: ignore[attr-defined]  # dev, not schnell
            guidance = torch.full((n,), TRAIN_GUIDANCE, device=noisy.device, dtype=dtype)
        out = denoiser(
            hidden_states=P._pack_latents(noisy, n, c, h, w).to(dtype),
            # The pipeline feeds the scheduler's 0-1000 timestep divided by 1000.
            timestep=(timesteps.float() / 1000).to(dtype),
            guidance=guidance,
            pooled_projections=cond.pooled.to(dtype),  # type: ignore[union-attr]
            encoder_hidden_states=cond.hidden.to(dtype),
            txt_ids=torch.zeros(cond.hidden.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=P._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, dtype),
            return_dict=False,
        )[0]
        # Unpack: (N, h/2 * w/2, C * 4) patches back to (N, C, h, w), as _unpack_latents.
        out = out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(n, c, h, w)  # type: ignore[no-any-return]

    def generated_latents_to_loop(
        self, pipe: Any, latents: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        # FluxPipeline returns its packed (N, h/2 * w/2, C * 4) tokens, already scaled.
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # type: ignore[no-any-return]

    def kohya_state(
        self, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        """Every peft layer under its BFL name; the parts of a layer BFL fuses become one
        LoRA on it, so ComfyUI and InvokeAI find every key in the model."""
        return bfl_kohya_state(peft_state, alpha, STREAMS, self.label)
