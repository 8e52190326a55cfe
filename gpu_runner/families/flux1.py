"""FLUX.1 [dev] (and [schnell], same layout): a double- and single-stream transformer on
2x2-patched 16-channel latents, CLIP-L for a pooled vector and T5 for the prompt's tokens,
a guidance embedding instead of CFG on the guidance-distilled dev model, flow matching, and
kohya keys in Black Forest Labs' module names (`lora_unet_double_blocks_N_img_attn_qkv`,
`lora_unet_single_blocks_N_linear1`, ...), with the layers BFL's model fuses (q/k/v of each
stream; a single block's q/k/v and MLP input) fused as it holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import ModelFamily, TinyBuilder
from gpu_runner.prompts import InvalidRequestError
from gpu_runner.training.dataset import TextCond
from gpu_runner.training.objective import FlowMatchObjective, Objective

KOHYA_PREFIX = "lora_unet_"
# FluxPipeline's max_sequence_length default (and its maximum): T5 tokens past it are cut.
MAX_SEQUENCE_LENGTH = 512
# The guidance the dev transformer's embedding is given while training: 1.0, as kohya
# sd-scripts' docs/flux_train_network.md says to set it (its default 3.5 is for sampling)
# and diffusers' README_flux.md example does (`--guidance_scale=1`); generation keeps 3.5.
TRAIN_GUIDANCE = 1.0
# diffusers module (inside transformer_blocks.N / single_transformer_blocks.N) -> BFL name
# (inside double_blocks.N / single_blocks.N): the table diffusers' FLUX.1 kohya converter
# (loaders/lora_conversion_utils.py, _convert_kohya_flux_lora_to_diffusers) reads back.
_DOUBLE = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1.linear": "img_mod_lin",
    "norm1_context.linear": "txt_mod_lin",
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
# Layers BFL keeps as one linear layer, their parts in the order of its output rows.
_FUSED = {
    "transformer_blocks": {
        "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    },
    "single_transformer_blocks": {
        "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    },
}
_BLOCKS = {
    "transformer_blocks": ("double_blocks", _DOUBLE),
    "single_transformer_blocks": ("single_blocks", _SINGLE),
}
_A, _B, _MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
# peft suffix -> kohya; DoRA magnitudes as LyCORIS/kohya keep them, (out_features, 1).
_PEFT_SUFFIXES = {_A: "lora_down.weight", _B: "lora_up.weight", _MAGNITUDE: "dora_scale"}

Weights = dict[str, torch.Tensor]  # one peft layer's tensors by suffix


def _tiny(seed: int) -> Any:
    from gpu_runner.families.tiny_flux1 import build_tiny_flux1_pipeline

    return build_tiny_flux1_pipeline(seed)


def _split(key: str) -> tuple[str, str]:
    for suffix in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), suffix
    raise ValueError(f"unexpected LoRA weight {key!r}: only transformer LoRA is exported")


def _place(module: str) -> tuple[str, str, str]:
    """`single_transformer_blocks.3.attn.to_q` -> (`single_transformer_blocks`, `3`,
    `attn.to_q`); a layer outside the blocks has no BFL LoRA name."""
    stream, _, rest = module.partition(".")
    index, _, inner = rest.partition(".")
    if stream not in _BLOCKS or not index.isdigit():
        raise ValueError(f"{module} has no FLUX.1 (BFL) name; train only layers in the blocks")
    return stream, index, inner


def _fused_lora(key: str, parts: list[Weights], alpha: float) -> dict[str, torch.Tensor]:
    """One LoRA for a fused layer: down weights stacked, up weights block-diagonal, alpha
    times the number of parts so alpha/rank stays the trained scale. Its delta is exactly
    the parts' deltas stacked."""
    out = {
        f"{key}.lora_down.weight": torch.cat([p[_A] for p in parts]).contiguous(),
        f"{key}.lora_up.weight": torch.block_diag(*[p[_B] for p in parts]).contiguous(),
        f"{key}.alpha": torch.tensor(float(alpha) * len(parts)),
    }
    if _MAGNITUDE in parts[0]:
        # DoRA normalises each output row: the fused rows are the parts' stacked, so the
        # fused magnitude is theirs stacked.
        mags = [p[_MAGNITUDE].reshape(-1, 1) for p in parts]
        out[f"{key}.dora_scale"] = torch.cat(mags).contiguous()
    return out


def _plain_lora(key: str, weights: Weights, alpha: float) -> dict[str, torch.Tensor]:
    out = {f"{key}.alpha": torch.tensor(float(alpha))}
    for suffix, kohya in _PEFT_SUFFIXES.items():
        if suffix in weights:
            value = weights[suffix]
            value = value.reshape(-1, 1) if suffix == _MAGNITUDE else value
            out[f"{key}.{kohya}"] = value.contiguous()
    return out


class Flux1(ModelFamily):
    name = "flux1"
    label = "FLUX.1"
    runs_label = "FLUX.1 [dev]/[schnell]"
    pipeline_class_names = ("FluxPipeline",)
    denoiser_attr = "transformer"
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-flux1": _tiny}
    # diffusers' train_dreambooth_lora_flux.py default targets (both streams' attention and
    # feed-forwards), plus the single blocks' `proj_mlp` so that their fused `linear1` (q,
    # k, v and the MLP input in BFL's model) is trained whole.
    lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
        "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    )  # fmt: skip
    # kohya-ss/sd-scripts library/sai_model_spec.py: ARCH_FLUX_1_DEV and IMPL_FLUX.
    modelspec_architecture = "flux-1-dev"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    # kohya-ss/sd-scripts library/flux_utils.py MODEL_VERSION_FLUX_V1.
    ss_base_model_version = "flux1"
    # BFL checkpoints: FLUX.1 modulates each double block itself (FLUX.2 shares one).
    single_file_marker = "double_blocks.0.img_mod.lin."
    # With the guidance embedding (true_cfg_scale 1) FluxPipeline reads no negative prompt.
    takes_negative_prompt = False

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

    def call_kwargs(self, negative_prompts: list[str]) -> dict[str, Any]:
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}

    def expand_prompt(self, pipe: Any, text: str) -> str:
        return text  # no textual-inversion embeddings to expand

    def check_prompt_length(self, pipe: Any, text: str, what: str) -> None:
        # T5 carries the prompt; CLIP-L gives only a pooled summary of its first 77 tokens,
        # which every FLUX.1 tool truncates likewise.
        used = len(pipe.tokenizer_2(text)["input_ids"])  # with its end-of-text token
        if used > MAX_SEQUENCE_LENGTH:
            raise InvalidRequestError(
                f"the {what} is {used} tokens long but {self.label}'s T5 text encoder reads at "
                f"most {MAX_SEQUENCE_LENGTH}; shorten it by {used - MAX_SEQUENCE_LENGTH} tokens"
            )

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextCond,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        from diffusers import FluxPipeline as P

        dtype = denoiser.dtype  # type: ignore[attr-defined]
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

    def objective(self, pipe: Any, config: Any, device: torch.device) -> Objective:
        return FlowMatchObjective(pipe.scheduler.config)

    def make_scheduler(self, base_config: Mapping[str, Any], sampler: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from gpu_runner.samplers import resolve_sampler

        if resolve_sampler(sampler).name != "Euler":
            raise InvalidRequestError(f"{self.label} samples with Euler (flow matching) only")
        return FlowMatchEulerDiscreteScheduler.from_config(dict(base_config))

    def kohya_state(
        self, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        """Every peft layer under its BFL name; the parts of a layer BFL fuses become one
        LoRA on it (`_fused_lora`), so ComfyUI and InvokeAI find every key in the model."""
        modules: dict[str, Weights] = {}
        for key, tensor in peft_state.items():
            module, suffix = _split(key)
            modules.setdefault(module, {})[suffix] = tensor.detach().float().cpu()
        out: dict[str, torch.Tensor] = {}
        for module in sorted(modules):
            if module not in modules:  # taken into a fused layer already
                continue
            stream, index, inner = _place(module)
            block, table = _BLOCKS[stream]
            prefix = f"{KOHYA_PREFIX}{block}_{index}_"
            fused = [(n, p) for n, p in _FUSED[stream].items() if inner in p]
            if fused:
                name, parts = fused[0]
                names = [f"{stream}.{index}.{p}" for p in parts]
                missing = [n for n in names if n not in modules]
                if missing:
                    raise ValueError(
                        f"FLUX.1 fuses {', '.join(parts)} into {name}: train all or none "
                        f"({missing} untrained)"
                    )
                out.update(_fused_lora(prefix + name, [modules.pop(n) for n in names], alpha))
            elif inner in table:
                out.update(_plain_lora(prefix + table[inner], modules.pop(module), alpha))
            else:
                raise ValueError(f"{module} has no FLUX.1 (BFL) name; train only mapped layers")
        return out
