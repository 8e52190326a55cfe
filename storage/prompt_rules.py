"""How text names a style: trigger words, A1111's `<lora:...>` tags and trigger insertion in
training captions. Written once for the bot (which chooses the styles of an `/imagine`) and
the runner (which captions the training data and renders), so what selects a style in chat
is what the model was trained to answer to.

- A trigger is found as a whole word in any case. Case does not matter because CLIP's
  tokenizer lowercases its input (the token textual inversion adds included), so "ZXStyle"
  and "zxstyle" are the same tokens to the model. Letters, digits, `_` and `-` make up a
  word, as they make up a trigger: "ink" does not fire inside "inks" or "ink-wash".
- `<lora:NAME>` and `<lora:NAME:WEIGHT>` select a style by its name or its trigger (the
  infotext Atelier writes names the trigger: it is the exported file's stem, which is what
  A1111 looks up). Tags are removed from the text the model sees.
- A training caption gets the trigger in front, kohya-style, unless it already holds it
  by the rule above, so "zxstyle, a cat" is not prefixed again for trigger "ZXStyle"; a
  prior-preservation caption has it taken out by the same rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_WEIGHT, MAX_WEIGHT = -4.0, 4.0
TRIGGER_PLACEHOLDER = "[trigger]"  # a caption may say where its trigger goes

_LORA_TAG = re.compile(r"<\s*lora\s*:([^>]*)>", re.IGNORECASE)


class PromptError(ValueError):
    """A `<lora:...>` tag that cannot be read; str() is one line telling the person what to fix."""


@dataclass(frozen=True)
class LoraTag:
    text: str  # as written, for messages
    name: str  # a style's name or trigger, as written
    weight: float
    start: int  # where it stands in the prompt


def _trigger_word(trigger: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", re.IGNORECASE)


def find_trigger(trigger: str, text: str) -> int | None:
    """Where `trigger` first stands in `text` as a whole word, in any case; None if nowhere."""
    hit = _trigger_word(trigger).search(text) if trigger else None
    return None if hit is None else hit.start()


def tag_names(tag: LoraTag, name: str, trigger: str | None) -> bool:
    """Whether a `<lora:...>` tag means the style with this name and trigger."""
    wanted = tag.name.casefold()
    return wanted == name.casefold() or (trigger is not None and wanted == trigger.casefold())


def lora_tags(prompt: str) -> list[LoraTag]:
    """The prompt's `<lora:NAME>` / `<lora:NAME:WEIGHT>` tags in order (weight 1 by default).

    Raises PromptError for a tag without a name, with extra parts, or with a weight that is
    not a number in [MIN_WEIGHT, MAX_WEIGHT].
    """
    tags: list[LoraTag] = []
    for match in _LORA_TAG.finditer(prompt):
        text = match.group(0)
        parts = [p.strip() for p in match.group(1).split(":")]
        if not parts[0] or len(parts) > 2:
            raise PromptError(f"{text} is not a LoRA tag; write <lora:name> or <lora:name:0.8>")
        weight = _weight(parts[1], text) if len(parts) == 2 and parts[1] else 1.0
        tags.append(LoraTag(text, parts[0], weight, match.start()))
    return tags


def strip_lora_tags(prompt: str) -> str:
    """The prompt without `<lora:...>` tags, whitespace tidied: what the text encoder gets."""
    text = _LORA_TAG.sub(" ", prompt)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;])", r"\1", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def insert_trigger(caption: str, trigger: str) -> str:
    """`[trigger]` placeholders become the trigger; otherwise it is prefixed kohya-style
    ("trigger, caption") unless the caption already holds it (`find_trigger`)."""
    caption = caption.strip()
    if TRIGGER_PLACEHOLDER in caption:
        return caption.replace(TRIGGER_PLACEHOLDER, trigger)
    if find_trigger(trigger, caption) is not None:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def shuffled_tags(caption: str, trigger: str, keep: int, order: list[float]) -> str:
    """kohya's shuffle_caption with keep_tokens: the caption's comma-separated tags in a new
    order, every tag holding the trigger (`find_trigger`) and the first `keep` of the
    others where they stand; the rest sort by `order` (one random number per tag)."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if len(order) < len(tags):
        raise ValueError("shuffled_tags needs a number for every tag")
    plain = [i for i, t in enumerate(tags) if find_trigger(trigger, t) is None]
    moving = plain[keep:]
    placed = dict(zip(moving, sorted(moving, key=lambda i: order[i]), strict=True))
    return ", ".join(tags[placed.get(i, i)] for i in range(len(tags)))


def without_trigger(caption: str, trigger: str) -> str:
    """The caption with the trigger (and the comma after it) taken out wherever it holds it
    (`find_trigger`): what the base model is asked to draw for prior preservation."""
    text = re.sub(rf"{_trigger_word(trigger).pattern}\s*,?\s*", "", caption, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip(" ,")


def _weight(raw: str, tag: str) -> float:
    try:
        weight = float(raw)
    except ValueError:
        raise PromptError(
            f"{tag} has weight '{raw}', which is not a number; write e.g. <lora:name:0.8>"
        ) from None
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise PromptError(
            f"{tag} has weight {weight:g}; use a weight between {MIN_WEIGHT:g} and {MAX_WEIGHT:g}"
        )
    return weight
