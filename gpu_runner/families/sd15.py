"""Stable Diffusion 1.x/2.x: a UNet on 4-channel latents, one CLIP text encoder, DDPM
training (epsilon or v-prediction, min-SNR weights), kohya keys `lora_unet_<module path>`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import ModelFamily, TinyBuilder
from gpu_runner.training.dataset import TextCond
from gpu_runner.training.objective import DiffusionObjective, Objective

# kohya-ss/sd-scripts library/sai_model_spec.py: the architecture and implementation ids.
IMPL_DIFFUSERS = "diffusers"
IMPL_SAI = "https://github.com/Stability-AI/generative-models"


def _tiny_sd15(seed: int) -> Any:
    from gpu_runner.tiny_models import build_tiny_sd15_pipeline

    return build_tiny_sd15_pipeline(seed=seed)


class StableDiffusion15(ModelFamily):
    name = "sd15"
    label = "SD1.5"
    runs_label = "SD1.5/SD2"
    pipeline_class_names = ("StableDiffusionPipeline",)
    denoiser_attr = "unet"
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-sd15": _tiny_sd15}
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    modelspec_architecture = "stable-diffusion-v1"
    modelspec_implementation = IMPL_DIFFUSERS
    ss_base_model_version = "sd_v1"
    text_encoder_pairs = (("tokenizer", "text_encoder"),)
    kohya_prefix: ClassVar[str] = "lora_unet_"

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
        dtype = denoiser.dtype  # type: ignore[attr-defined]
        kwargs = self._added_cond(cond, extra)
        return denoiser(  # type: ignore[no-any-return]
            noisy.to(dtype), timesteps, encoder_hidden_states=cond.hidden.to(dtype), **kwargs
        ).sample

    def _added_cond(self, cond: TextCond, extra: torch.Tensor | None) -> dict[str, Any]:
        return {}

    def objective(self, pipe: Any, config: Any, device: torch.device) -> Objective:
        return DiffusionObjective(
            pipe.scheduler.config, config.prediction_type, config.min_snr_gamma, device
        )

    def kohya_state(
        self, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        from gpu_runner.training.export import peft_to_kohya

        return peft_to_kohya(dict(peft_state), alpha, prefix=self.kohya_prefix)

    def load_embedding(self, pipe: Any, state: Mapping[str, torch.Tensor], token: str) -> None:
        pipe.load_textual_inversion(dict(state), token=token)
