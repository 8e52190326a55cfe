"""What the flow-matching transformer families (FLUX.1, FLUX.2 [klein], Qwen-Image,
Z-Image) share: Euler sampling only, the rectified-flow objective, no textual-inversion
embeddings, and a prompt-length limit counted as each pipeline tokenizes.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gpu_runner.families.base import ModelFamily
from gpu_runner.prompts import InvalidRequestError
from gpu_runner.training.objective import FlowMatchObjective, Objective

# The pipelines' max_sequence_length default: prompt tokens past it are cut off silently.
MAX_SEQUENCE_LENGTH = 512


def qwen3_chat_tokens(pipe: Any, text: str, *, thinking: bool) -> int:
    """Tokens of `text` as a Qwen3 text-encoder pipeline feeds it: inside the chat template,
    with the pipeline's thinking setting."""
    tok = pipe.tokenizer
    templated = tok.apply_chat_template(
        [{"role": "user", "content": text}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=thinking,
    )
    return len(tok(templated)["input_ids"])


class FlowMatchingFamily(ModelFamily):
    denoiser_attr = "transformer"
    # How the prompt is counted, in the too-long message ("" when it is counted plainly).
    prompt_count_note: ClassVar[str] = ""
    # The encoder that reads the prompt, in the too-long message.
    prompt_encoder_label: ClassVar[str] = "text encoder"

    @abstractmethod
    def prompt_tokens(self, pipe: Any, text: str) -> int:
        """How many tokens of the text encoder's sequence `text` fills."""

    def check_prompt_length(self, pipe: Any, text: str, what: str) -> None:
        used = self.prompt_tokens(pipe, text)
        if used > MAX_SEQUENCE_LENGTH:
            raise InvalidRequestError(
                f"the {what} is {used} tokens long{self.prompt_count_note} but {self.label}'s "
                f"{self.prompt_encoder_label} reads at most {MAX_SEQUENCE_LENGTH}; shorten it "
                f"by {used - MAX_SEQUENCE_LENGTH} tokens"
            )

    def call_kwargs(self, negative_prompts: list[str]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
        if self.takes_negative_prompt:
            kwargs["negative_prompt"] = negative_prompts
        return kwargs

    def expand_prompt(self, pipe: Any, text: str) -> str:
        return text  # no textual-inversion embeddings to expand

    def objective(self, pipe: Any, config: Any, device: torch.device) -> Objective:
        # Uniform draws on the scheduler's table and a velocity target, as diffusers' LoRA
        # examples for these families train (weighting_scheme "none").
        return FlowMatchObjective(
            pipe.scheduler.config, timesteps=(config.min_timestep, config.max_timestep)
        )

    def make_scheduler(self, base_config: Mapping[str, Any], sampler: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from gpu_runner.samplers import resolve_sampler

        if resolve_sampler(sampler).name != "Euler":
            raise InvalidRequestError(f"{self.label} samples with Euler (flow matching) only")
        return FlowMatchEulerDiscreteScheduler.from_config(dict(base_config))
