"""Qwen-Image: a 60-block double-stream MMDiT on 2x2-packed 16-channel latents of a causal
video VAE (an image is one frame), conditioned on the last hidden layer of Qwen2.5-VL
read through a fixed system prompt, flow matching with true CFG, and kohya keys in the
model's own module names (`lora_unet_transformer_blocks_N_attn_to_q`, as musubi-tuner
writes them): ComfyUI's Qwen-Image model and diffusers' share those names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import TinyBuilder, compute_dtype
from gpu_runner.families.flow_matching import MAX_SEQUENCE_LENGTH, FlowMatchingFamily
from gpu_runner.families.lora_signs import HeaderSign, LoraSigns
from gpu_runner.training.dataset import TextCond, encode_latent_dist

KOHYA_PREFIX = "lora_unet_"


def _tiny(seed: int) -> Any:
    from gpu_runner.families.tiny_qwenimage import build_tiny_qwenimage_pipeline

    return build_tiny_qwenimage_pipeline(seed)


class QwenImage(FlowMatchingFamily):
    name = "qwenimage"
    label = "Qwen-Image"
    runs_label = "Qwen-Image"
    pipeline_class_names = ("QwenImagePipeline",)
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-qwenimage": _tiny}
    # Both streams' attention projections: diffusers' Qwen-Image LoRA example trains the
    # image stream's four by default; the text stream's four let the trigger's own tokens
    # change too. All eight are in InvokeAI's kohya Qwen-Image table and ComfyUI's map.
    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_add_out",
    )  # fmt: skip
    # "full" adds both streams' MLPs.
    lora_layer_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "attention": lora_targets,
        "full": (
            *lora_targets, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
            "txt_mlp.net.2",
        ),
    }  # fmt: skip
    # kohya-ss/musubi-tuner src/musubi_tuner/utils/sai_model_spec.py: ARCH_QWEN_IMAGE and
    # IMPL_QWEN_IMAGE.
    modelspec_architecture = "Qwen-Image"
    modelspec_implementation = "https://github.com/QwenLM/Qwen-Image"
    # ostris/ai-toolkit's QwenImageModel.get_base_model_version (what LoRA managers read).
    ss_base_model_version = "qwen_image"
    # kohya keys on its double-stream blocks (musubi-tuner's names), or diffusers/ComfyUI
    # keys on `transformer_blocks.N`'s attention, MLPs and modulations, with no single-stream
    # block anywhere: the rule InvokeAI's Qwen-Image LoRA probe applies (FLUX's diffusers
    # files name their double-stream blocks alike; single-stream ones tell them apart).
    lora_signs = LoraSigns(
        own_keys=(
            r"^lora_unet_transformer_blocks_\d+_",
            r"^(transformer\.|diffusion_model\.)?transformer_blocks\.\d+\."
            r"(attn|img_mlp|txt_mlp|img_mod|txt_mod)\.",
        ),
        foreign_keys=(r"single_(transformer_)?blocks",),
        # musubi-tuner's "Qwen-Image/lora", ai-toolkit's "qwen_image" (not Qwen-Image-2.x).
        metadata=(
            HeaderSign("qwenimage", architecture=r"qwen-image(/|$)", base_version=r"qwen_image$"),
        ),
    )

    def pipeline_class(self) -> type[Any]:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    def encode_text(
        self, pipe: Any, prompts: list[str], device: torch.device, *, grad: bool = False
    ) -> TextCond:
        with torch.set_grad_enabled(grad):
            hidden, mask = pipe.encode_prompt(
                prompts, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH
            )
        # Padded to the longest prompt; the mask (None: no padding) keeps it out of attention.
        return TextCond(hidden, token_mask=mask)

    def cfg_kwargs(self, cfg: float) -> dict[str, Any]:
        # QwenImagePipeline's guidance_scale is for guidance-distilled models (ignored with a
        # warning); classifier-free guidance is true_cfg_scale, on with any negative prompt.
        return {"true_cfg_scale": cfg}

    def prompt_tokens(self, pipe: Any, text: str) -> int:
        # Counted as the pipeline encodes: inside its system-prompt template, whose first
        # tokens it drops from the embeddings.
        templated = pipe.prompt_template_encode.format(text)
        return len(pipe.tokenizer(templated)["input_ids"]) - pipe.prompt_template_encode_start_idx

    def latent_dist(self, vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # AutoencoderKLQwenImage encodes video (N, C, frames, H, W): an image is one frame.
        return encode_latent_dist(vae, pixels.unsqueeze(2))

    def latent_scaler(self, vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        # As QwenImagePipeline normalises latents: the VAE config's per-channel statistics.
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)

        def scale(z: torch.Tensor) -> torch.Tensor:
            frame = z[:, :, 0].float()  # the one frame
            return (frame - mean.to(z.device)) / std.to(z.device)

        return scale

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextCond,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        from diffusers import QwenImagePipeline as P

        dtype = compute_dtype(denoiser)
        n, c, h, w = noisy.shape
        out = denoiser(
            hidden_states=P._pack_latents(noisy.to(dtype), n, c, h, w),
            # The pipeline feeds the scheduler's 0-1000 timestep divided by 1000.
            timestep=(timesteps.float() / 1000).to(dtype),
            encoder_hidden_states=cond.hidden.to(dtype),
            encoder_hidden_states_mask=cond.token_mask,
            img_shapes=[[(1, h // 2, w // 2)]] * n,  # (frames, rows, columns) of patches
            return_dict=False,
        )[0]
        # Sizes in latent pixels: a VAE factor of 1 makes the pipeline's unpacking exact.
        return P._unpack_latents(out, h, w, 1)[:, :, 0]  # type: ignore[no-any-return]

    def generated_latents_to_loop(
        self, pipe: Any, latents: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        # QwenImagePipeline returns its packed tokens, normalised as `latent_scaler` does;
        # unpacked they are (N, C, frames=1, h, w).
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        return unpacked[:, :, 0]  # type: ignore[no-any-return]

    def kohya_state(
        self, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        """The transformer's module paths with dots as underscores, as musubi-tuner names
        them; diffusers' own names are Qwen-Image's, so nothing is renamed or fused."""
        from gpu_runner.training.export import peft_to_kohya

        return peft_to_kohya(dict(peft_state), alpha, prefix=KOHYA_PREFIX)
