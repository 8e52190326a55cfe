"""FLUX.2 [klein]: a double- and single-stream transformer on 2x2-patched 32-channel
latents (normalised by the VAE's batch-norm statistics), one Qwen3 text encoder, flow
matching, and kohya keys in Black Forest Labs' module names (`lora_unet_double_blocks_N_
img_attn_qkv`, ...), with q/k/v fused as BFL's model holds them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
from gpu_runner.families.flow_matching import FlowMatchingFamily, qwen3_chat_tokens
from gpu_runner.families.lora_signs import HeaderSign, LoraSigns
from gpu_runner.training.dataset import TextCond

# diffusers block lists -> BFL's names: the tables diffusers' own Flux2 kohya converter
# (loaders/lora_conversion_utils.py, _convert_kohya_flux2_lora_to_diffusers) reads back.
# BFL keeps q, k and v in one linear layer per stream.
STREAMS = {
    "transformer_blocks": BflStream(
        "double_blocks",
        plain={
            "attn.to_out.0": "img_attn_proj",
            "attn.to_add_out": "txt_attn_proj",
            "ff.linear_in": "img_mlp_0",
            "ff.linear_out": "img_mlp_2",
            "ff_context.linear_in": "txt_mlp_0",
            "ff_context.linear_out": "txt_mlp_2",
        },
        fused={
            "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        },
    ),
    "single_transformer_blocks": BflStream(
        "single_blocks",
        plain={"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"},
        fused={},
    ),
}


def _tiny(seed: int) -> Any:
    from gpu_runner.families.tiny_flux2_klein import build_tiny_flux2_klein_pipeline

    return build_tiny_flux2_klein_pipeline(seed)


class Flux2Klein(FlowMatchingFamily):
    name = "flux2-klein"
    label = "FLUX.2 [klein]"
    runs_label = "FLUX.2 [klein]"
    pipeline_class_names = ("Flux2KleinPipeline",)
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-flux2-klein": _tiny}
    # Both streams' attention and the single blocks' fused projection (whose output half
    # is the MLP): the layers diffusers' FLUX.2 LoRA example trains by default.
    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_add_out", "to_qkv_mlp_proj",
    )  # fmt: skip
    # "full" adds both streams' gated feed-forwards (BFL's img_mlp / txt_mlp).
    lora_layer_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "attention": lora_targets,
        "full": (
            *lora_targets, "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
            "ff_context.linear_out",
        ),
    }  # fmt: skip
    # kohya-ss/musubi-tuner src/musubi_tuner/utils/sai_model_spec.py: ARCH_FLUX_2_KLEIN_4B
    # and IMPL_FLUX_2 (the 9B is "Flux.2-klein-9b"; the tiny model has the 4B's layout).
    modelspec_architecture = "Flux.2-klein-4b"
    modelspec_implementation = "https://github.com/black-forest-labs/flux2"
    # Atelier's own value: no kohya ss_base_model_version for FLUX.2 was found to follow.
    ss_base_model_version = "flux2_klein"
    # Its shared modulation: FLUX.1 files have `double_blocks.0.img_attn.qkv.` too (the
    # marker diffusers' single_file_utils checks FLUX.2 by).
    single_file_marker = "single_stream_modulation.lin."
    # Flux2KleinPipeline encodes an empty prompt for CFG's other half: no negative prompt.
    takes_negative_prompt = False
    prompt_count_note = " (with the chat template)"
    lora_signs = LoraSigns(
        # Layers FLUX.1 lacks: a single block's fused projection, gated feed-forwards, and
        # the modulation all blocks share.
        own_keys=(
            DIFFUSERS_PREFIX + r"single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj\.",
            DIFFUSERS_PREFIX + r"transformer_blocks\.\d+\.ff(_context)?\.linear_(in|out)\.",
            r"^(lora_unet_|transformer\.)?(double|single)_stream_modulation",
        ),
        shared_naming=BFL_NAMING,
        # Widths over the model width D: a single block's linear1 is 9D (q, k, v and a
        # gated 3D MLP, doubled), linear2 reads 4D; a double block's MLP is gated 3D (6D).
        width_ratios={
            "linear1": Fraction(9),
            "linear2": Fraction(1, 4),
            "mlp_0": Fraction(6),
            "mlp_2": Fraction(1, 3),
        },
        metadata=(
            HeaderSign("flux2-klein", architecture=r"flux\.2-klein", base_version=r"flux2_klein"),
        ),
    )

    def pipeline_class(self) -> type[Any]:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    def encode_text(
        self, pipe: Any, prompts: list[str], device: torch.device, *, grad: bool = False
    ) -> TextCond:
        with torch.set_grad_enabled(grad):
            hidden, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1)
        return TextCond(hidden)

    def prompt_tokens(self, pipe: Any, text: str) -> int:
        return qwen3_chat_tokens(pipe, text, thinking=False)  # as the pipeline templates it

    def latent_scaler(self, vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        # As Flux2KleinPipeline encodes a reference image: 2x2 patches into channels, then
        # the VAE's batch-norm running statistics.
        from diffusers import Flux2KleinPipeline

        mean = vae.bn.running_mean.detach().float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.detach().float() + vae.config.batch_norm_eps)
        std = std.view(1, -1, 1, 1)

        def scale(z: torch.Tensor) -> torch.Tensor:
            patched = Flux2KleinPipeline._patchify_latents(z.float())
            return (patched - mean.to(z.device)) / std.to(z.device)

        return scale

    def generated_latents_to_loop(
        self, pipe: Any, latents: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        # Flux2KleinPipeline undoes its normalisation and patches before it returns: what
        # it gives is the VAE's own layout, which the loop scales as it scales an encoding.
        return self.latent_scaler(pipe.vae)(latents)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextCond,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline as P

        dtype = compute_dtype(denoiser)
        n, c, h, w = noisy.shape
        out = denoiser(
            hidden_states=P._pack_latents(noisy).to(dtype),
            # The pipeline feeds the scheduler's 0-1000 timestep divided by 1000.
            timestep=(timesteps.float() / 1000).to(dtype),
            guidance=None,
            encoder_hidden_states=cond.hidden.to(dtype),
            txt_ids=P._prepare_text_ids(cond.hidden).to(noisy.device),
            img_ids=P._prepare_latent_ids(noisy).to(noisy.device),
            return_dict=False,
        )[0]
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)  # type: ignore[no-any-return]

    def kohya_state(
        self, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        """Every peft layer under its BFL name; q/k/v of a stream fused into one LoRA, as
        BFL's model holds them."""
        return bfl_kohya_state(peft_state, alpha, STREAMS, self.label)
