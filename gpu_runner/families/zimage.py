"""Z-Image (Tongyi-MAI): one single-stream transformer (`layers`, after a `noise_refiner` for
the image tokens and a `context_refiner` for the caption's) on 2x2-patched 16-channel latents
(the FLUX.1 VAE's shift and scale), one Qwen3 text encoder whose captions stay variable in
length, flow matching with the model predicting the negated velocity, and LoRA files keyed
`diffusion_model.<diffusers module>` with kohya's `lora_down`/`lora_up`/`alpha`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import TinyBuilder, compute_dtype
from gpu_runner.families.flow_matching import (
    MAX_SEQUENCE_LENGTH,
    FlowMatchingFamily,
    qwen3_chat_tokens,
)
from gpu_runner.families.lora_signs import HeaderSign, LoraSigns
from gpu_runner.training.dataset import TextCond

# The prefix ComfyUI's Z-Image (Lumina2) key map reads diffusers module names under
# (comfy/lora.py `model_lora_keys_unet`, z_image_to_diffusers), which InvokeAI's Z-Image
# LoRA probe requires and diffusers' Z-Image converter strips.
KEY_PREFIX = "diffusion_model."
# The modules ComfyUI's z_image_to_diffusers table maps onto its native weights: inside each
# block, then the model's own embedders and final layer.
BLOCKS = ("layers", "noise_refiner", "context_refiner")
BLOCK_MODULES = (
    "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0",
)  # fmt: skip
MODEL_MODULES = (
    "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
    "all_x_embedder.2-1", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
)  # fmt: skip
_PEFT_SUFFIXES = {
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.weight": "lora_up.weight",
    ".lora_magnitude_vector": "dora_scale",  # DoRA; LyCORIS/kohya keep it (out_features, 1)
}


def _tiny(seed: int) -> Any:
    from gpu_runner.families.tiny_zimage import build_tiny_zimage_pipeline

    return build_tiny_zimage_pipeline(seed)


def mapped_module(module: str) -> bool:
    """Whether ComfyUI's Z-Image key map has this diffusers module (`layers.3.attention.to_q`)."""
    block, _, rest = module.partition(".")
    index, _, inner = rest.partition(".")
    if block in BLOCKS and index.isdigit():
        return inner in BLOCK_MODULES
    return module in MODEL_MODULES


class ZImage(FlowMatchingFamily):
    name = "zimage"
    label = "Z-Image"
    runs_label = "Z-Image"
    pipeline_class_names = ("ZImagePipeline",)
    prompt_count_note = " (with the chat template)"
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-zimage": _tiny}
    # Attention in every block: the default of diffusers' Z-Image LoRA example
    # (examples/dreambooth/train_dreambooth_lora_z_image.py, --lora_layers unset).
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # "full" adds each block's SwiGLU feed-forward (in ComfyUI's Z-Image key map).
    lora_layer_sets: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "attention": lora_targets,
        "full": (*lora_targets, "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    }
    # kohya-ss/musubi-tuner src/musubi_tuner/utils/sai_model_spec.py: ARCH_Z_IMAGE and
    # IMPL_Z_IMAGE.
    modelspec_architecture = "Z-Image"
    modelspec_implementation = "https://github.com/Tongyi-MAI/Z-Image"
    # Atelier's own value: no kohya ss_base_model_version for Z-Image was found to follow.
    ss_base_model_version = "zimage"
    # The key diffusers' single-file loader tells a Z-Image checkpoint by (CHECKPOINT_KEY_NAMES).
    single_file_marker = "layers.0.adaLN_modulation.0."
    # Its blocks (`layers`, `noise_refiner`, `context_refiner`) with their `attention`
    # (diffusers' to_q/.../to_out.0, or the original qkv/out), `feed_forward.w1-3` and
    # `adaLN_modulation`, under ComfyUI's `diffusion_model.`, diffusers' `transformer.` or no
    # prefix, or kohya-style with `lora_unet_` (some trainers write `__`). Lumina 2's
    # original NextDiT names are Z-Image's own (Z-Image grew from it): such a file reads so.
    lora_signs = LoraSigns(
        own_keys=(
            r"^(diffusion_model\.|transformer\.|base_model\.model\.)?"
            r"(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward|adaLN_modulation)\.",
            r"^lora_unet__?(layers|noise_refiner|context_refiner)_\d+_(attention|feed_forward|adaLN)_",
        ),
        metadata=(HeaderSign("zimage", architecture=r"z-image", base_version=r"zimage"),),
    )

    def pipeline_class(self) -> type[Any]:
        from diffusers import ZImagePipeline

        return ZImagePipeline

    def pipeline_classes(self) -> tuple[type[Any], ...]:
        # The image-to-image pipeline diffusers' AutoPipelineForImage2Image makes from it.
        from diffusers import ZImageImg2ImgPipeline, ZImagePipeline

        return (ZImagePipeline, ZImageImg2ImgPipeline)

    def encode_text(
        self, pipe: Any, prompts: list[str], device: torch.device, *, grad: bool = False
    ) -> TextCond:
        # The pipeline keeps only each caption's own tokens (the transformer reads captions
        # of any length): pad them to one tensor and say which rows are real.
        with torch.set_grad_enabled(grad):
            embeds, _ = pipe.encode_prompt(
                list(prompts),  # the pipeline rewrites the list it is given in place
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
        hidden = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
        lengths = torch.tensor([len(e) for e in embeds], device=hidden.device)
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        return TextCond(hidden, token_mask=mask)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextCond,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype = compute_dtype(denoiser)
        mask = cond.token_mask
        assert mask is not None, "Z-Image captions carry their token mask"
        # As ZImagePipeline calls it: one (C, frames=1, h, w) latent and one caption of its
        # own length per image, and the time as 1 - t/1000.
        out = denoiser(
            list(noisy.to(dtype).unsqueeze(2).unbind(0)),
            (1000 - timesteps.float()) / 1000,
            [h[m.bool()].to(dtype) for h, m in zip(cond.hidden, mask, strict=True)],
            return_dict=False,
        )[0]
        # The model predicts the negated velocity (the pipeline and diffusers' Z-Image LoRA
        # example both negate it).
        return -torch.stack(out).squeeze(2)

    def prompt_tokens(self, pipe: Any, text: str) -> int:
        return qwen3_chat_tokens(pipe, text, thinking=True)  # as the pipeline templates it

    def kohya_state(
        self, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        """Each peft layer under `diffusion_model.<module>` with kohya's suffixes; q, k and v
        stay separate (ComfyUI slices them into its fused qkv itself)."""
        out: dict[str, torch.Tensor] = {}
        for key, tensor in peft_state.items():
            suffix = next((s for s in _PEFT_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise ValueError(f"unexpected LoRA weight {key!r}: only LoRA/DoRA is exported")
            module = key.removesuffix(suffix)
            if not mapped_module(module):
                raise ValueError(f"{module} has no ComfyUI Z-Image key; train only mapped layers")
            value = tensor.detach().float().cpu()
            if suffix == ".lora_magnitude_vector":
                value = value.reshape(-1, 1)
            out[f"{KEY_PREFIX}{module}.{_PEFT_SUFFIXES[suffix]}"] = value.contiguous()
            if suffix == ".lora_A.weight":
                out[f"{KEY_PREFIX}{module}.alpha"] = torch.tensor(float(alpha))
        return out
