"""FLUX.2 [klein]: a double- and single-stream transformer on 2x2-patched 32-channel
latents (normalised by the VAE's batch-norm statistics), one Qwen3 text encoder, flow
matching, and kohya keys in Black Forest Labs' module names (`lora_unet_double_blocks_N_
img_attn_qkv`, ...), with q/k/v fused as BFL's model holds them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import ModelFamily, TinyBuilder
from gpu_runner.prompts import InvalidRequestError
from gpu_runner.training.dataset import TextCond
from gpu_runner.training.objective import FlowMatchObjective, Objective

KOHYA_PREFIX = "lora_unet_"
# Flux2KleinPipeline's max_sequence_length default: tokens past it are cut off silently.
MAX_SEQUENCE_LENGTH = 512
# diffusers module (inside transformer_blocks.N / single_transformer_blocks.N) -> BFL name
# (inside double_blocks.N / single_blocks.N): the table diffusers' own Flux2 kohya converter
# (loaders/lora_conversion_utils.py, _convert_kohya_flux2_lora_to_diffusers) reads back.
_DOUBLE = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.linear_in": "img_mlp_0",
    "ff.linear_out": "img_mlp_2",
    "ff_context.linear_in": "txt_mlp_0",
    "ff_context.linear_out": "txt_mlp_2",
}
# BFL keeps q, k and v in one linear layer per stream.
_DOUBLE_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_PEFT_SUFFIXES = {
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.weight": "lora_up.weight",
    ".lora_magnitude_vector": "dora_scale",  # DoRA; LyCORIS/kohya keep it (out_features, 1)
}
_MAGNITUDE = ".lora_magnitude_vector"


def _tiny(seed: int) -> Any:
    from gpu_runner.families.tiny_flux2_klein import build_tiny_flux2_klein_pipeline

    return build_tiny_flux2_klein_pipeline(seed)


def _split(key: str) -> tuple[str, str]:
    for suffix in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), suffix
    raise ValueError(f"unexpected LoRA weight {key!r}: only transformer LoRA is exported")


def _bfl_name(module: str) -> str:
    """`transformer_blocks.0.attn.to_out.0` -> `double_blocks_0_img_attn_proj`."""
    stream, _, rest = module.partition(".")
    index, _, inner = rest.partition(".")
    table, block = {
        "transformer_blocks": (_DOUBLE, "double_blocks"),
        "single_transformer_blocks": (_SINGLE, "single_blocks"),
    }.get(stream, ({}, ""))
    if inner not in table:
        raise ValueError(f"{module} has no FLUX.2 (BFL) name; train only mapped layers")
    return f"{block}_{index}_{table[inner]}"


class Flux2Klein(ModelFamily):
    name = "flux2-klein"
    label = "FLUX.2 [klein]"
    runs_label = "FLUX.2 [klein]"
    pipeline_class_names = ("Flux2KleinPipeline",)
    denoiser_attr = "transformer"
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]] = {"tiny-flux2-klein": _tiny}
    # Both streams' attention and the single blocks' fused projection (whose output half
    # is the MLP): the layers diffusers' FLUX.2 LoRA example trains by default.
    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_add_out", "to_qkv_mlp_proj",
    )  # fmt: skip
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

    def pipeline_class(self) -> type[Any]:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    def encode_text(
        self, pipe: Any, prompts: list[str], device: torch.device, *, grad: bool = False
    ) -> TextCond:
        with torch.set_grad_enabled(grad):
            hidden, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1)
        return TextCond(hidden)

    def call_kwargs(self, negative_prompts: list[str]) -> dict[str, Any]:
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}

    def expand_prompt(self, pipe: Any, text: str) -> str:
        return text  # no textual-inversion embeddings to expand

    def check_prompt_length(self, pipe: Any, text: str, what: str) -> None:
        # Counted as the pipeline tokenizes: inside Qwen3's chat template, thinking off.
        tok = pipe.tokenizer
        templated = tok.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        used = len(tok(templated)["input_ids"])
        if used > MAX_SEQUENCE_LENGTH:
            raise InvalidRequestError(
                f"the {what} is {used} tokens long (with the chat template) but {self.label}'s "
                f"text encoder reads at most {MAX_SEQUENCE_LENGTH}; shorten it by "
                f"{used - MAX_SEQUENCE_LENGTH} tokens"
            )

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

        dtype = denoiser.dtype  # type: ignore[attr-defined]
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
        """Every peft layer under its BFL name; q/k/v of a stream fused into one LoRA whose
        down weights are stacked and whose up weight is block-diagonal, with alpha scaled
        by 3 so alpha/rank stays the trained scale: the fused delta is exactly the three."""
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in peft_state.items():
            module, suffix = _split(key)
            modules.setdefault(module, {})[suffix] = tensor.detach().float().cpu()
        out: dict[str, torch.Tensor] = {}
        fused_parts = {m for parts in _DOUBLE_FUSED.values() for m in parts}
        done: set[str] = set()
        for module, weights in sorted(modules.items()):
            stream, _, rest = module.partition(".")
            index, _, inner = rest.partition(".")
            if stream == "transformer_blocks" and inner in fused_parts:
                for fused, parts in _DOUBLE_FUSED.items():
                    if inner not in parts or f"{index}.{fused}" in done:
                        continue
                    names = [f"{stream}.{index}.{p}" for p in parts]
                    missing = [n for n in names if n not in modules]
                    if missing:
                        raise ValueError(
                            f"FLUX.2 fuses q, k and v: train all three or none ({missing})"
                        )
                    downs = [modules[n][".lora_A.weight"] for n in names]
                    ups = [modules[n][".lora_B.weight"] for n in names]
                    key = f"{KOHYA_PREFIX}double_blocks_{index}_{fused}"
                    out[f"{key}.lora_down.weight"] = torch.cat(downs).contiguous()
                    out[f"{key}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
                    out[f"{key}.alpha"] = torch.tensor(float(alpha) * len(parts))
                    if _MAGNITUDE in modules[names[0]]:
                        # DoRA normalises each output row: the fused rows are q's, k's and
                        # v's stacked, so the fused magnitude is theirs stacked.
                        mags = [modules[n][_MAGNITUDE].reshape(-1, 1) for n in names]
                        out[f"{key}.dora_scale"] = torch.cat(mags).contiguous()
                    done.add(f"{index}.{fused}")
                continue
            key = KOHYA_PREFIX + _bfl_name(module)
            for suffix, kohya in _PEFT_SUFFIXES.items():
                if suffix in weights:
                    value = weights[suffix]
                    value = value.reshape(-1, 1) if suffix == _MAGNITUDE else value
                    out[f"{key}.{kohya}"] = value.contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
        return out
