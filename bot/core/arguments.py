"""Argument models per command: validated the same way whatever platform sent them.

Adapters pass args as strings (Discord options, parsed Slack/console text). A problem comes
back as a UserError naming what was wrong and showing the command's usage.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from bot.core.errors import UserError
from bot.core.parsing import PARSE_ERROR, usage
from storage.families import ASPECT_RATIOS
from storage.models import StyleKind
from storage.training_bounds import (
    LAYER_SETS,
    METHODS,
    OPTIMIZERS,
    PRESETS,
    QUANTIZATIONS,
    REAL_BOUNDS,
    WHOLE_BOUNDS,
)

MAX_SEED = 2**32 - 1
_NAME = re.compile(r"\w[\w-]{0,39}")
_TRIGGER = re.compile(r"[\w-]{2,32}")
_INIT_WORD = re.compile(r"[^\W\d_]{1,32}")
_BASE = re.compile(r"[\w./:@-]{1,200}")
# NUL (PostgreSQL text cannot hold it) and lone surrogates (broken UTF-8 let through by JSON
# escapes or a terminal): no database, chat platform or tokenizer takes them.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")
_FIELD_LABELS = {
    PARSE_ERROR: "the command",
    "text": "the caption",
    "negative": "the negative prompt",
    "name": "the style name",
    "trigger": "the trigger word",
}


def scrub_text(text: str) -> str:
    """`text` with NUL and lone surrogates replaced by U+FFFD, for echoing input in replies."""
    return _NOT_TEXT.sub("\ufffd", text)


# -- field parsers: each raises ValueError with the sentence a person should read ----------


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def style_name(value: Any) -> str:
    name = unicodedata.normalize("NFC", _text(value)).lower()
    if not name:
        raise ValueError("the style name is empty")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"style name '{name[:40]}' must be 1-40 letters, digits, _ or - (one word)"
        )
    return name


def _is_emoji_like(ch: str) -> bool:
    # Emoji and their joiners, variation selectors and skin tones.
    return unicodedata.category(ch) in ("So", "Sk", "Cf", "Mn", "Me", "Cs")


def trigger_word(value: Any) -> str:
    word = unicodedata.normalize("NFC", _text(value))
    if not word:
        raise ValueError("the trigger word is empty")
    if all(_is_emoji_like(c) for c in word):
        raise ValueError(
            "a trigger can't be only emoji (tokenizers split them unpredictably); "
            "use a made-up word such as inkstyle"
        )
    if " " in word:
        raise ValueError(f"trigger '{word[:32]}' must be one word without spaces")
    if not _TRIGGER.fullmatch(word):
        if len(word) < 2 or len(word) > 32:
            raise ValueError(f"trigger '{word[:32]}' must be 2-32 characters long")
        raise ValueError(f"trigger '{word[:32]}' may only hold letters, digits, _ or -")
    if not any(c.isalpha() for c in word):
        raise ValueError(f"trigger '{word}' needs at least one letter")
    return word


def _init_word(value: Any) -> str | None:
    word = unicodedata.normalize("NFC", _text(value))
    if not word:
        return None
    if not _INIT_WORD.fullmatch(word):
        raise ValueError(f"init_word '{word[:32]}' must be one word of 1-32 letters (e.g. sketch)")
    return word


def _kind(value: Any) -> StyleKind:
    text = _text(value).lower() or StyleKind.STYLE
    try:
        return StyleKind(text)
    except ValueError:
        raise ValueError(f"kind must be style or concept (got '{text[:20]}')") from None


def _base(value: Any) -> str | None:
    text = _text(value)
    if not text:
        return None
    if not _BASE.fullmatch(text):
        raise ValueError(f"base model '{text[:40]}' is not a model name")
    return text


def _whole(name: str, low: int, high: int) -> Any:
    def parse(value: Any) -> int | None:
        text = _text(value).lstrip("#")
        if not text:
            return None
        try:
            number = int(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"{name} must be a whole number (got '{text[:20]}')") from None
        if not low <= number <= high:
            raise ValueError(f"{name} must be between {low} and {high} (got {number})")
        return number

    return BeforeValidator(parse)


def _real(name: str, low: float, high: float) -> Any:
    def parse(value: Any) -> float | None:
        text = _text(value)
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{name} must be a number such as 1e-4 (got '{text[:20]}')") from None
        if not low <= number <= high:
            raise ValueError(f"{name} must be between {low:g} and {high:g} (got {number:g})")
        return number

    return BeforeValidator(parse)


def _choice(name: str, options: dict[str, str]) -> Any:
    def parse(value: Any) -> str | None:
        text = _text(value).lower()
        if not text:
            return None
        if text not in options:
            choices = ", ".join(sorted(set(options)))
            raise ValueError(f"{name} must be one of {choices} (got '{text[:20]}')")
        return options[text]

    return BeforeValidator(parse)


def _seed(value: Any) -> int | None:
    text = _text(value).lower()
    if text in ("", "random", "-1", "none"):
        return None
    try:
        seed = int(text)
    except ValueError:
        raise ValueError(f"seed must be a whole number (got '{text[:20]}')") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}")
    return seed


def _size(value: Any) -> tuple[int, int] | None:
    text = _text(value).lower().replace("×", "x").replace("*", "x")
    if not text:
        return None
    parts = text.split("x")
    try:
        width, height = (int(parts[0]), int(parts[0])) if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise ValueError(f"size must look like 512x768 (got '{text[:20]}')") from None
    for side in (width, height):
        if not 64 <= side <= 2048 or side % 8:
            raise ValueError(
                f"size {width}x{height}: each side must be 64-2048 pixels and a multiple of 8"
            )
    return width, height


# Midjourney's habit: `--ar 16:9` (or `--aspect 16:9`) inside the prompt text.
_AR_IN_PROMPT = re.compile(r"(?:^|\s)--(?:ar|aspect)(?:\s+|=)([^\s,;]+)", re.IGNORECASE)


def _ratio(value: Any) -> tuple[int, int] | None:
    text = _text(value).replace("/", ":").replace("x", ":").replace("×", ":")
    if not text:
        return None
    accepted = ", ".join(f"{w}:{h}" for w, h in ASPECT_RATIOS)
    try:
        width, height = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(
            f"the aspect ratio (ar) must look like 16:9; accepted: {accepted}"
        ) from None
    if (width, height) not in ASPECT_RATIOS:
        raise ValueError(
            f"the aspect ratio {width}:{height} is not one Atelier accepts; use one of {accepted}"
        )
    return width, height


def _flag(value: Any) -> bool:
    text = _text(value).lower()
    if text in ("", "no", "false", "off", "0"):
        return False
    if text in ("yes", "true", "on", "1", "y"):
        return True
    raise ValueError(f"compare must be yes or no (got '{text[:20]}')")


def _bounded_text(name: str, low: int, high: int) -> Any:
    def parse(value: Any) -> str:
        text = _text(value)
        if len(text) < low:
            raise ValueError(f"{name} is empty")
        if len(text) > high:
            raise ValueError(f"{name} is {len(text)} characters; keep it under {high}")
        return text

    return BeforeValidator(parse)


StyleName = Annotated[str, BeforeValidator(style_name)]
OptionalStyleName = Annotated[
    str | None, BeforeValidator(lambda v: style_name(v) if _text(v) else None)
]


class Args(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StyleCreateArgs(Args):
    name: StyleName
    trigger: Annotated[str, BeforeValidator(trigger_word)]
    kind: Annotated[StyleKind, BeforeValidator(_kind)] = StyleKind.STYLE
    base: Annotated[str | None, BeforeValidator(_base)] = None


class StyleAddArgs(Args):
    name: OptionalStyleName = None


AUTO = "auto"


def _image_number(value: Any) -> int | str:
    if _text(value).lower() == AUTO:
        return AUTO
    parse = _whole("number", 1, 100_000).func
    number = parse(value)
    if number is None:
        raise ValueError("number is missing: give the image's number, or auto")
    return int(number)


class StyleCaptionArgs(Args):
    name: StyleName
    # An image's number, or "auto": queue the captioning model on the uncaptioned ones.
    number: Annotated[int | str, BeforeValidator(_image_number)]
    text: Annotated[str, _bounded_text("the caption", 0, 1000)] = ""

    @model_validator(mode="after")
    def _text_unless_auto(self) -> StyleCaptionArgs:
        if self.number == AUTO and self.text:
            raise ValueError("auto captions need no text; leave it out, or give a number")
        if self.number != AUTO and not self.text:
            raise ValueError("the caption is empty")
        return self


class StyleImportArgs(Args):
    name: StyleName
    trigger: Annotated[str, BeforeValidator(trigger_word)]
    base: Annotated[str | None, BeforeValidator(_base)] = None


class AuditArgs(Args):
    style: OptionalStyleName = None
    count: Annotated[int | None, _whole("count", 1, 100)] = None


class StyleNameArgs(Args):
    name: StyleName


_ON_OFF = {"on": "on", "yes": "on", "true": "on", "off": "off", "no": "off", "false": "off"}
# "ti" is chat shorthand; the runner knows the method by its full name only.
_METHOD_NAMES = {**{m: m for m in METHODS}, "ti": "textual_inversion"}


class StyleTrainArgs(Args):
    """The bounds are the runner's own (storage.training_bounds), checked here so a typo is
    answered in chat at once instead of failing the queued job."""

    name: StyleName
    preset: Annotated[str | None, _choice("preset", {p: p for p in PRESETS})] = None
    steps: Annotated[int | None, _whole("steps", *WHOLE_BOUNDS["steps"])] = None
    rank: Annotated[int | None, _whole("rank", *WHOLE_BOUNDS["rank"])] = None
    lr: Annotated[float | None, _real("lr", *REAL_BOUNDS["learning_rate"])] = None
    method: Annotated[str | None, _choice("method", _METHOD_NAMES)] = None
    quantize: Annotated[str | None, _choice("quantize", {q: q for q in QUANTIZATIONS})] = None
    layers: Annotated[str | None, _choice("layers", {s: s for s in LAYER_SETS})] = None
    optimizer: Annotated[str | None, _choice("optimizer", {o: o for o in OPTIMIZERS})] = None
    flip: Annotated[str | None, _choice("flip", _ON_OFF)] = None
    noise_offset: Annotated[float | None, _real("noise_offset", *REAL_BOUNDS["noise_offset"])] = (
        None
    )
    accumulate: Annotated[
        int | None, _whole("accumulate", *WHOLE_BOUNDS["gradient_accumulation"])
    ] = None
    shuffle: Annotated[str | None, _choice("shuffle", _ON_OFF)] = None
    keep_tags: Annotated[int | None, _whole("keep_tags", *WHOLE_BOUNDS["keep_tags"])] = None
    epochs: Annotated[int | None, _whole("epochs", *WHOLE_BOUNDS["epochs"])] = None
    text_encoder: Annotated[str | None, _choice("text_encoder", _ON_OFF)] = None
    preserve: Annotated[float | None, _real("preserve", *REAL_BOUNDS["output_preservation"])] = None
    min_timestep: Annotated[int | None, _whole("min_timestep", *WHOLE_BOUNDS["min_timestep"])] = (
        None
    )
    max_timestep: Annotated[int | None, _whole("max_timestep", *WHOLE_BOUNDS["max_timestep"])] = (
        None
    )
    init_word: Annotated[str | None, BeforeValidator(_init_word)] = None


class StyleUseArgs(Args):
    name: StyleName
    step: Annotated[int, _whole("step", 1, WHOLE_BOUNDS["steps"][1])]


class NoArgs(Args):
    pass


class ImagineArgs(Args):
    prompt: Annotated[str, _bounded_text("the prompt", 1, 2000)]
    negative: Annotated[str, _bounded_text("the negative prompt", 0, 2000)] = ""
    seed: Annotated[int | None, BeforeValidator(_seed)] = None
    steps: Annotated[int | None, _whole("steps", 1, 150)] = None
    cfg: Annotated[float | None, _real("cfg", 0.0, 30.0)] = None
    size: Annotated[tuple[int, int] | None, BeforeValidator(_size)] = None
    count: Annotated[int | None, _whole("count", 1, 8)] = None
    compare: Annotated[bool, BeforeValidator(_flag)] = False
    ar: Annotated[tuple[int, int] | None, BeforeValidator(_ratio)] = None
    strength: Annotated[float | None, _real("strength", 0.05, 1.0)] = None

    @model_validator(mode="before")
    @classmethod
    def _ar_from_prompt(cls, data: Any) -> Any:
        """`--ar 16:9` in the prompt is the `ar` option; the prompt keeps the rest."""
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            return data
        found = _AR_IN_PROMPT.findall(data["prompt"])
        if not found:
            return data
        if len(found) > 1 or _text(data.get("ar")):
            raise ValueError("the aspect ratio is given twice; keep one ar")
        prompt = re.sub(r"\s+([,;])", r"\1", _AR_IN_PROMPT.sub(" ", data["prompt"])).strip()
        return {**data, "prompt": prompt, "ar": found[0]}

    @model_validator(mode="after")
    def _one_shape(self) -> ImagineArgs:
        if self.size is not None and self.ar is not None:
            raise ValueError("give size or ar, not both")
        return self


class CancelArgs(Args):
    job: Annotated[int, _whole("job", 1, 2**62)]


ARG_MODELS: dict[str, type[Args]] = {
    "style create": StyleCreateArgs,
    "style add": StyleAddArgs,
    "style caption": StyleCaptionArgs,
    "style review": StyleNameArgs,
    "style train": StyleTrainArgs,
    "style list": NoArgs,
    "style info": StyleNameArgs,
    "style export": StyleNameArgs,
    "style versions": StyleNameArgs,
    "style use": StyleUseArgs,
    "imagine": ImagineArgs,
    "style import": StyleImportArgs,
    "jobs": NoArgs,
    "cancel": CancelArgs,
    "audit": AuditArgs,
}


def with_usage(problem: str, command: str) -> str:
    """One line: the problem, then the right form."""
    problem = problem.strip().rstrip(".")
    text = problem[:1].upper() + problem[1:]
    form = usage(command)
    return f"{text}. Usage: `{form}`" if form else f"{text}."


def validate_args(command: str, args: Mapping[str, str]) -> Args:
    """Validated args for `command`, or UserError with what was wrong and the usage."""
    for key, value in args.items():
        if isinstance(value, str) and _NOT_TEXT.search(value):
            what = _FIELD_LABELS.get(key, f"the {key}")
            raise UserError(
                with_usage(
                    f"{what} has characters that cannot be stored (a NUL byte or broken "
                    "UTF-8); retype it",
                    command,
                )
            )
    if PARSE_ERROR in args:
        raise UserError(with_usage(args[PARSE_ERROR], command))
    model = ARG_MODELS[command]
    try:
        return model.model_validate(dict(args))
    except ValidationError as exc:
        raise UserError(with_usage(_describe(exc), command)) from None


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(p) for p in error["loc"])
    if error["type"] == "missing":
        return f"{field} is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "value_error":
        return message
    return f"{field}: {message}"
