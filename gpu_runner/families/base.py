"""The interface every model family implements: what differs between SD1.5, SDXL and the
flow-matching transformers lives behind it, one module per family (`sd15.py`, `sdxl.py`,
...), and the runner's shared code (loading, training, export, generation) calls only it.

Generation defaults, memory estimates and the built-in model table stay in
`storage.families` (torch-free, the bot reads them); a family module reads its defaults
from there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gpu_runner.families.lora_signs import LoraSigns

if TYPE_CHECKING:
    from gpu_runner.training.dataset import TextCond
    from gpu_runner.training.objective import Objective

TinyBuilder = Callable[[int], Any]  # seed -> a pipeline built in code (or shipped)


def compute_dtype(denoiser: torch.nn.Module) -> torch.dtype:
    """The dtype a denoiser computes in, by diffusers' own rule for `ModelMixin.dtype`: its
    first floating-point parameter outside `_keep_in_fp32_modules`. The property also walks
    every submodule for layerwise-casting hooks (Atelier adds none) on each call: 33 ms on
    toy-sd15 with a LoRA, a twentieth of a training step."""
    keep = getattr(denoiser, "_keep_in_fp32_modules", None) or ()
    for name, param in denoiser.named_parameters():
        if param.is_floating_point() and not any(m in name for m in keep):
            return param.dtype
    return denoiser.dtype  # type: ignore[no-any-return]


class BuiltinBuildError(RuntimeError):
    """A built-in model cannot be built (its shipped weights are missing or damaged);
    str() says what to do."""


class ModelFamily(ABC):
    """One model family. Instances are stateless: the registry holds one of each."""

    # The family's name in `storage.families` (config, the database, chat).
    name: ClassVar[str]
    # How people read it ("SD1.5"), in messages.
    label: ClassVar[str]
    # What it runs, in the list of supported models ("SD1.5/SD2").
    runs_label: ClassVar[str]
    # The diffusers pipeline class names (`model_index.json` `_class_name`) it loads.
    pipeline_class_names: ClassVar[tuple[str, ...]]
    # The pipeline attribute holding the model LoRAs train ("unet", "transformer").
    denoiser_attr: ClassVar[str]
    # Built-in models of the family (storage.families.BUILTIN_MODELS) made in code.
    tiny_builders: ClassVar[Mapping[str, TinyBuilder]]
    # Built-in models of the family whose weights ship with Atelier (the toy world's).
    shipped_builders: ClassVar[Mapping[str, TinyBuilder]] = {}
    # The layers a LoRA trains when the preset does not say (peft target_modules).
    lora_targets: ClassVar[tuple[str, ...]]
    # peft target_modules for each layer set it offers (storage.families.LAYER_SETS_OF):
    # "attention" is `lora_targets`.
    lora_layer_sets: ClassVar[Mapping[str, tuple[str, ...]]]
    # Header values kohya's library/sai_model_spec.py and train_util.py write for the family.
    modelspec_architecture: ClassVar[str]
    modelspec_implementation: ClassVar[str]
    ss_base_model_version: ClassVar[str]
    # Textual inversion trains new token rows in these (tokenizer, text encoder) pairs;
    # empty where the family's text encoder makes it meaningless.
    text_encoder_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()
    # The text encoders a LoRA may train too (storage.families.TEXT_ENCODER_LORA_FAMILIES),
    # each with the kohya key prefix its part of the file carries; empty: the denoiser only.
    text_encoder_lora_prefixes: ClassVar[Mapping[str, str]] = {}
    # peft targets in those encoders.
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ()
    # The modelspec.implementation kohya writes for the family's embedding files.
    embedding_modelspec_implementation: ClassVar[str] = ""
    # A key prefix only this family's single checkpoint files carry ("": none).
    single_file_marker: ClassVar[str] = ""
    # Whether a checkpoint file with no family's marker is read as this family.
    single_file_fallback: ClassVar[bool] = False
    # Whether the pipeline's call takes a negative prompt (generation tells the person when
    # one is ignored rather than dropping it silently).
    takes_negative_prompt: ClassVar[bool] = True
    # How an adapter file made for the family is told before it loads (lora_signs.py).
    lora_signs: ClassVar[LoraSigns] = LoraSigns()

    # ----- loading ------------------------------------------------------------------------

    @abstractmethod
    def pipeline_class(self) -> type[Any]:
        """The diffusers pipeline class a single checkpoint file of this family loads as."""

    def pipeline_classes(self) -> tuple[type[Any], ...]:
        """Every pipeline class of the family (a loaded pipeline is one of these)."""
        return (self.pipeline_class(),)

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for from_pretrained / from_single_file."""
        return {}

    def owns(self, pipe: Any) -> bool:
        return isinstance(pipe, self.pipeline_classes())

    def variant_of(self, pipe: Any) -> str:
        """The name `lora_import` detects adapter files by for this loaded pipeline (SD2
        runs as SD1.5 but takes only SD2 LoRAs)."""
        return self.name

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)  # type: ignore[no-any-return]

    # ----- conditioning -------------------------------------------------------------------

    @abstractmethod
    def encode_text(
        self, pipe: Any, prompts: list[str], device: torch.device, *, grad: bool = False
    ) -> TextCond:
        """The pipeline's own prompt encoding, so training sees what generation feeds."""

    @abstractmethod
    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: TextCond,
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        """The denoiser's prediction on latents in the loop's (N, C, h, w) layout; `extra`
        is the family's per-image conditioning (SDXL: size/crop ids), None where unused."""

    # ----- generation ---------------------------------------------------------------------

    def cfg_kwargs(self, cfg: float) -> dict[str, Any]:
        """The pipeline-call argument that carries the CFG scale."""
        return {"guidance_scale": cfg}

    def call_kwargs(self, negative_prompts: list[str]) -> dict[str, Any]:
        """The family's own pipeline-call arguments beside prompt, size, steps and CFG."""
        return {"negative_prompt": negative_prompts} if self.takes_negative_prompt else {}

    def expand_prompt(self, pipe: Any, text: str) -> str:
        """The text the encoder sees (multi-vector embeddings expand one token into several)."""
        return str(pipe.maybe_convert_prompt(text, pipe.tokenizer))

    def check_prompt_length(self, pipe: Any, text: str, what: str) -> None:
        """Refuse text longer than the family's text encoder reads (CLIP: 77 tokens)."""
        from gpu_runner.prompts import check_prompt_length

        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t]
        check_prompt_length(tokenizers, self.expand_prompt(pipe, text), what)

    # ----- latents ------------------------------------------------------------------------

    def latent_dist(self, vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean and std of (N, 3, H, W) pixels, in the VAE's own layout (what
        `latent_scaler` reads)."""
        from gpu_runner.training.dataset import encode_latent_dist

        return encode_latent_dist(vae, pixels)

    def latent_scaler(self, vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """VAE posterior samples -> the latents the denoiser sees, in the loop's (N, C, h, w)
        layout (default: the VAE config's shift and scale)."""
        from gpu_runner.training.dataset import shift_and_scale

        config = vae.config
        return lambda z: shift_and_scale(z, config)

    def generated_latents_to_loop(
        self, pipe: Any, latents: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """What the pipeline returns with output_type="latent" for `height` x `width` images
        -> the loop's (N, C, h, w) latents, scaled as `latent_scaler` scales a VAE encoding
        (default: returned so already, as the SD and Z-Image pipelines return them)."""
        return latents

    def make_scheduler(self, base_config: Mapping[str, Any], sampler: str) -> Any:
        """A fresh scheduler for an Atelier sampler name on the model's scheduler config."""
        from gpu_runner.samplers import make_scheduler

        return make_scheduler(base_config, sampler)

    # ----- training -----------------------------------------------------------------------

    @abstractmethod
    def objective(self, pipe: Any, config: Any, device: torch.device) -> Objective:
        """The training objective: timestep sampling, noising, target and loss weights."""

    # ----- export -------------------------------------------------------------------------

    @abstractmethod
    def kohya_state(
        self, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        """peft's LoRA/DoRA weights renamed to the kohya layout other tools load."""

    def kohya_text_encoder_state(
        self, encoder: str, peft_state: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, torch.Tensor]:
        """A text encoder's LoRA weights under kohya's names: the module path after the
        encoder's prefix (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`)."""
        from gpu_runner.training.export import clip_checkpoint_names, peft_to_kohya

        prefix = self.text_encoder_lora_prefixes.get(encoder)
        if prefix is None:
            raise ValueError(f"{self.label} has no text-encoder LoRA for {encoder!r}")
        return peft_to_kohya(clip_checkpoint_names(peft_state), alpha, prefix=prefix)

    def diffusers_layers(
        self,
        peft_state: Mapping[str, torch.Tensor],
        text_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, Any]:
        """`save_lora_weights` keyword arguments holding the denoiser's LoRA layers and those
        of any text encoder trained too (keyed by the pipeline's attribute name)."""
        from gpu_runner.training.export import clip_checkpoint_names

        texts = {attr: clip_checkpoint_names(st) for attr, st in (text_states or {}).items()}
        parts = {self.denoiser_attr: peft_state, **texts}
        return {
            f"{attr}_lora_layers": {k: v.detach().float().cpu() for k, v in state.items()}
            for attr, state in parts.items()
        }

    # ----- embeddings (textual inversion) -------------------------------------------------

    def load_embedding(self, pipe: Any, state: Mapping[str, torch.Tensor], token: str) -> None:
        """Load a textual-inversion file's vectors under `token`."""
        raise ValueError(f"{self.label} has no textual-inversion embeddings")

    def unload_embedding(self, pipe: Any, tokens: list[str]) -> None:
        for tok_name, enc_name in self.text_encoder_pairs:
            pipe.unload_textual_inversion(
                tokens=tokens,
                tokenizer=getattr(pipe, tok_name),
                text_encoder=getattr(pipe, enc_name),
            )
