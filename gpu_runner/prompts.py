"""Prompt parsing and request validation.

Trigger words of known styles select their adapters at weight 1.0; A1111's
`<lora:name:weight>` tags select by name with a weight and are removed from the text the
model sees. Torch-free, so the bot can validate a request before it is queued.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

AdapterKind = Literal["lora", "embedding"]

_LORA_TAG = re.compile(r"<\s*lora\s*:([^>]*)>", re.IGNORECASE)
MIN_WEIGHT, MAX_WEIGHT = -4.0, 4.0


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


def strip_lora_tags(prompt: str) -> str:
    """The prompt without `<lora:...>` tags, whitespace tidied."""
    text = _LORA_TAG.sub(" ", prompt)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;])", r"\1", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def _trigger_pattern(trigger: str) -> re.Pattern[str]:
    # Whole word, any case: "mystyle" must not fire inside "mystyles" or "notmystyle".
    return re.compile(rf"(?<![\w]){re.escape(trigger)}(?![\w])", re.IGNORECASE)


def _parse_weight(raw: str, tag: str) -> float:
    try:
        weight = float(raw)
    except ValueError:
        raise InvalidRequestError(
            f"'{tag}' has weight '{raw}', which is not a number; write e.g. <lora:name:0.8>"
        ) from None
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise InvalidRequestError(
            f"'{tag}' has weight {weight}; use a weight between {MIN_WEIGHT} and {MAX_WEIGHT}"
        )
    return weight


def parse_prompt(prompt: str, known: Mapping[str, AdapterInfo]) -> ParsedPrompt:
    """Select adapters from `known` (trigger word -> adapter) and `<lora:name:w>` tags.

    A tag naming an adapter also selected by its trigger overrides the trigger's weight
    of 1.0. Adapters keep the order in which they first appear in the prompt.
    """
    by_name: dict[str, AdapterInfo] = {}
    for info in known.values():
        by_name.setdefault(info.name.lower(), info)
    found: dict[str, tuple[int, AdapterUse]] = {}  # adapter name -> (position, use)
    tagged: set[str] = set()

    for match in _LORA_TAG.finditer(prompt):
        tag = match.group(0)
        parts = [p.strip() for p in match.group(1).split(":")]
        if not parts[0] or len(parts) > 2:
            raise InvalidRequestError(
                f"'{tag}' is not a LoRA tag; write <lora:name> or <lora:name:0.8>"
            )
        info = by_name.get(parts[0].lower())
        if info is None:
            names = ", ".join(sorted(i.name for i in known.values())) or "none yet"
            raise InvalidRequestError(f"'{tag}' names no known style; known styles: {names}")
        if info.kind == "embedding":
            raise InvalidRequestError(
                f"'{info.name}' is a textual-inversion embedding; use its trigger word "
                f"'{info.trigger}' instead of a <lora:...> tag"
            )
        if info.name in tagged:
            raise InvalidRequestError(f"'{info.name}' is named twice in <lora:...> tags; keep one")
        weight = _parse_weight(parts[1], tag) if len(parts) == 2 else 1.0
        tagged.add(info.name)
        found[info.name] = (match.start(), AdapterUse(info, weight))

    text = strip_lora_tags(prompt)
    for trigger, info in known.items():
        if info.name in found or not trigger:
            continue
        hit = _trigger_pattern(trigger).search(text)
        if hit:
            # Position offset keeps tags and triggers in prompt order well enough.
            found[info.name] = (hit.start(), AdapterUse(info, 1.0))

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
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Raise InvalidRequestError naming the first setting out of range."""
    if not limits.min_steps <= steps <= limits.max_steps:
        raise InvalidRequestError(f"steps is {steps}; use {limits.min_steps} to {limits.max_steps}")
    if not limits.min_cfg <= cfg <= limits.max_cfg:
        raise InvalidRequestError(f"CFG is {cfg}; use {limits.min_cfg} to {limits.max_cfg}")
    for side, value in (("width", width), ("height", height)):
        if value % 8:
            lower, upper = value - value % 8, value - value % 8 + 8
            raise InvalidRequestError(
                f"{side} {value} is not divisible by 8; use {lower} or {upper}"
            )
        if not limits.min_side <= value <= limits.max_side:
            raise InvalidRequestError(
                f"{side} is {value}; use {limits.min_side} to {limits.max_side} pixels"
            )
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
