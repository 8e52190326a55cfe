"""Prompt parsing and request validation on the runner.

Trigger words of known styles select their adapters at the base model's trigger weight
(storage.families, 1.0 but for toy-sd15); A1111's
`<lora:name:weight>` tags select by name or trigger with a weight and are removed from the
text the model sees. The rules are storage.prompt_rules, the ones the bot applies in chat.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from storage.families import SizeOffGridError, check_size

# MIN_WEIGHT, MAX_WEIGHT and strip_lora_tags are re-exported: the runner's modules name
# them from here, while the rules themselves live in storage.
from storage.prompt_rules import MAX_WEIGHT as MAX_WEIGHT
from storage.prompt_rules import MIN_WEIGHT as MIN_WEIGHT
from storage.prompt_rules import (
    PromptError,
    find_trigger,
    lora_tags,
    tag_names,
)
from storage.prompt_rules import strip_lora_tags as strip_lora_tags

AdapterKind = Literal["lora", "embedding"]


class InvalidRequestError(ValueError):
    """A request that cannot run as given; str() is one line telling the requester what to fix."""


@dataclass(frozen=True)
class AdapterInfo:
    """One style's adapter file as the runner needs it.

    `name` is what `<lora:name:w>` matches; `trigger` is the word that selects it in a
    prompt. For kind "embedding" (textual inversion) the trigger is also the token whose
    vectors the file holds. `sha256` is the file's hash if storage already knows it.
    `render_path` is the file Atelier loads to render the style when it is not `path`:
    the diffusers-format file of a LoRA Atelier trained, which keeps DoRA's magnitudes
    (diffusers drops `dora_scale` from kohya files); hashes always describe `path`.
    """

    name: str
    path: str
    trigger: str | None = None
    kind: AdapterKind = "lora"
    sha256: str | None = None
    render_path: str | None = None


@dataclass(frozen=True)
class AdapterUse:
    adapter: AdapterInfo
    weight: float = 1.0


@dataclass(frozen=True)
class ParsedPrompt:
    text: str  # what the text encoder gets: `<lora:...>` tags removed, triggers kept
    adapters: tuple[AdapterUse, ...]


def parse_prompt(
    prompt: str, known: Mapping[str, AdapterInfo], trigger_weight: float = 1.0
) -> ParsedPrompt:
    """Select adapters from `known` (trigger word -> adapter) and `<lora:...>` tags, by the
    rules the bot applies in chat (storage.prompt_rules).

    A trigger selects its adapter at `trigger_weight`; a tag naming an adapter also
    selected by its trigger overrides that. Adapters keep the order in which they first
    appear in the prompt.
    """
    found: dict[str, tuple[int, AdapterUse]] = {}  # adapter name -> (position, use)
    try:
        tags = lora_tags(prompt)
    except PromptError as exc:
        raise InvalidRequestError(str(exc)) from None
    for tag in tags:
        info = next((i for i in known.values() if tag_names(tag, i.name, i.trigger)), None)
        if info is None:
            names = ", ".join(sorted(i.name for i in known.values())) or "none yet"
            raise InvalidRequestError(f"{tag.text} names no known style; known styles: {names}")
        if info.kind == "embedding":
            raise InvalidRequestError(
                f"'{info.name}' is a textual-inversion embedding; use its trigger word "
                f"'{info.trigger}' instead of a <lora:...> tag"
            )
        if info.name in found:
            raise InvalidRequestError(f"'{info.name}' is named twice in <lora:...> tags; keep one")
        found[info.name] = (tag.start, AdapterUse(info, tag.weight))

    text = strip_lora_tags(prompt)
    for trigger, info in known.items():
        if info.name in found:
            continue
        at = find_trigger(trigger, text)
        if at is not None:
            # Position offset keeps tags and triggers in prompt order well enough.
            found[info.name] = (at, AdapterUse(info, trigger_weight))

    ordered = tuple(use for _, use in sorted(found.values(), key=lambda item: item[0]))
    return ParsedPrompt(text=text, adapters=ordered)


class _Tokenizer(Protocol):
    model_max_length: int

    def __call__(self, text: str) -> Mapping[str, list[int]]: ...


def count_tokens(tokenizer: _Tokenizer, text: str) -> int:
    """Tokens the text encoder would see, start and end markers included."""
    return len(tokenizer(text)["input_ids"])


def check_prompt_length(tokenizers: Iterable[_Tokenizer], text: str, what: str = "prompt") -> None:
    """Refuse text longer than the text encoder's window (77 tokens for CLIP)."""
    for tokenizer in tokenizers:
        limit = int(tokenizer.model_max_length)
        used = count_tokens(tokenizer, text)
        if used > limit:
            raise InvalidRequestError(
                f"the {what} is {used - 2} tokens long but the text encoder reads at most "
                f"{limit - 2}; shorten it by {used - limit} tokens"
            )


@dataclass(frozen=True)
class Limits:
    """Bounds for generation settings; the runner may tighten them per device."""

    min_steps: int = 1
    max_steps: int = 150
    min_cfg: float = 0.0
    max_cfg: float = 30.0
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    max_count: int = 8
    max_seed: int = 2**32 - 1  # A1111's and ComfyUI's UIs draw seeds in this range


DEFAULT_LIMITS = Limits()


def validate_settings(
    *,
    steps: int,
    cfg: float,
    width: int,
    height: int,
    count: int,
    seed: int | None,
    family: str,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Raise InvalidRequestError naming the first setting out of range (sides: on the grid
    the family's pipeline draws)."""
    if not limits.min_steps <= steps <= limits.max_steps:
        raise InvalidRequestError(f"steps is {steps}; use {limits.min_steps} to {limits.max_steps}")
    if not limits.min_cfg <= cfg <= limits.max_cfg:
        raise InvalidRequestError(f"CFG is {cfg}; use {limits.min_cfg} to {limits.max_cfg}")
    for side, value in (("width", width), ("height", height)):
        if not limits.min_side <= value <= limits.max_side:
            raise InvalidRequestError(
                f"{side} is {value}; use {limits.min_side} to {limits.max_side} pixels"
            )
    try:
        check_size(family, width, height)
    except SizeOffGridError as exc:
        raise InvalidRequestError(str(exc)) from None
    if width * height > limits.max_pixels:
        raise InvalidRequestError(
            f"{width}x{height} is more than {limits.max_pixels} pixels; pick a smaller size"
        )
    if not 1 <= count <= limits.max_count:
        raise InvalidRequestError(f"count is {count}; use 1 to {limits.max_count}")
    if seed is not None and not 0 <= seed <= limits.max_seed:
        raise InvalidRequestError(f"seed is {seed}; use 0 to {limits.max_seed}, or leave it out")


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' (or '512' for a square) -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×*]\s*(\d+))?\s*", text)
    if not match:
        raise InvalidRequestError(f"size '{text}' is not WIDTHxHEIGHT; write e.g. 512x768")
    width = int(match.group(1))
    height = int(match.group(2) or match.group(1))
    return width, height
