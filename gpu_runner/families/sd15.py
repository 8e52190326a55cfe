"""Stable Diffusion 1.x/2.x: a UNet on 4-channel latents, one CLIP text encoder, DDPM
training (epsilon or v-prediction, min-SNR weights), kohya keys `lora_unet_<module path>`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import ModelFamily, TinyBuilder, compute_dtype
from gpu_runner.families.lora_signs import HeaderSign, LoraSigns
from gpu_runner.training.dataset import TextCond
from gpu_runner.training.objective import DiffusionObjective, Objective

# kohya-ss/sd-scripts library/sai_model_spec.py: the architecture and implementation ids.
IMPL_DIFFUSERS = "diffusers"
IMPL_SAI = "https://github.com/Stability-AI/generative-models"
_SEP = r"[._]"  # diffusers names use dots, kohya's underscores
# A LoRA's cross-attention key/value projection reads the text encoder's width.
CONTEXT_KEY = r"attn2[._]to_[kv].*(lora_down|lora_A|lora\.down)"


# The "full" layer set (`lora_layer_sets` says where it comes from).
_FULL = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def _tiny_sd15(seed: int) -> Any:
    from gpu_runner.tiny_models import build_tiny_sd15_pipeline

    return build_tiny_sd15_pipeline(seed=seed)


def _toy_sd15(seed: int) -> Any:
    # Pretrained on the toy world and shipped: the seed has nothing to draw.
    from gpu_runner.toyworld.model import build_toy_sd15_pipeline

    return build_toy_sd15_pipeline()


class StableDiffusion15(ModelFamily):
    name = "sd15"
    label = "SD1.5"
    runs_label = "SD1.5/SD2"
    pipeline_class_names = ("StableDiffusionPipeline",)
    denoiser_attr = "unet"
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-sd15": _tiny_sd15}
    shipped_builders: ClassVar[Mapping[str, TinyBuilder]] = {"toy-sd15": _toy_sd15}
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # kohya's networks/lora.py: its "full" LoRA adds the transformer blocks' feed-forwards
    # and projections; LoCon (LyCORIS, kohya's conv_dim) the ResNet blocks' convolutions.
    lora_layer_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "attention": lora_targets,
        "full": _FULL,
        "locon": (*_FULL, "conv1", "conv2"),
    }
    modelspec_architecture = "stable-diffusion-v1"
    modelspec_implementation = IMPL_DIFFUSERS
    ss_base_model_version = "sd_v1"
    text_encoder_pairs = (("tokenizer", "text_encoder"),)
    # kohya's networks/lora.py trains CLIPAttention and CLIPMLP linears; ComfyUI's
    # LORA_CLIP_MAP (comfy/lora.py) maps exactly these six under `lora_te_`.
    text_encoder_lora_prefixes: ClassVar[Mapping[str, str]] = {"text_encoder": "lora_te_"}
    text_encoder_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    embedding_modelspec_implementation = IMPL_SAI
    kohya_prefix: ClassVar[str] = "lora_unet_"
    # SD1.x's checkpoint layout has no key the others lack: a file with no marker is SD.
    single_file_fallback = True
    lora_signs = LoraSigns(
        # SD2 runs as SD1.5 but reads OpenCLIP ViT-H (1024 wide), SD1.x CLIP ViT-L (768).
        context_key=CONTEXT_KEY,
        context_dims={768: "sd15", 1024: "sd2"},
        # Attention in the first down block and the last up block: SD1.x and SD2.x alike.
        layout_keys=(rf"down_blocks{_SEP}0{_SEP}attentions", rf"up_blocks{_SEP}3{_SEP}attentions"),
        metadata=(
            HeaderSign("sd2", architecture=r"stable-diffusion-v2", base_version=r"sd_v2"),
            HeaderSign("sd15", architecture=r"stable-diffusion-v1", base_version=r"sd_v1"),
        ),
    )

    def pipeline_class(self) -> type[Any]:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def variant_of(self, pipe: Any) -> str:
        # SD2's text encoder (OpenCLIP ViT-H) is 1024 wide, SD1.x's CLIP ViT-L 768.
        return "sd2" if int(pipe.unet.config.cross_attention_dim) == 1024 else self.name

    def load_kwargs(self) -> dict[str, Any]:
        # No safety checker (as in A1111, ComfyUI): a team's own tool on its own data.
        return {"safety_checker": None, "requires_safety_checker": False}

    def encode_text(
        self, pipe: Any, prompts: list[str], device: torch.device, *, grad: bool = False
    ) -> TextCond:
        with torch.set_grad_enabled(grad):
            hidden, _ = pipe.encode_prompt(
                prompts, device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return TextCond(hidden)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextCond,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype = compute_dtype(denoiser)
        kwargs = self._added_cond(cond, extra)
        return denoiser(  # type: ignore[no-any-return]
            noisy.to(dtype), timesteps, encoder_hidden_states=cond.hidden.to(dtype), **kwargs
        ).sample

    def _added_cond(self, cond: TextCond, extra: torch.Tensor | None) -> dict[str, Any]:
        return {}

    def objective(self, pipe: Any, config: Any, device: torch.device) -> Objective:
        return DiffusionObjective(
            pipe.scheduler.config, config.prediction_type, config.min_snr_gamma, device,
            timesteps=(config.min_timestep, config.max_timestep),
        )  # fmt: skip

    def kohya_state(
        self, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        from gpu_runner.training.export import peft_to_kohya

        return peft_to_kohya(dict(peft_state), alpha, prefix=self.kohya_prefix)

    def load_embedding(self, pipe: Any, state: Mapping[str, torch.Tensor], token: str) -> None:
        pipe.load_textual_inversion(dict(state), token=token)
