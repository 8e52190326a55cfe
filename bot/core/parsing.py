"""The text grammar of commands typed as free text (Slack, the console).

`/style create ink inkstyle concept`, `/imagine "a cat, ink wash" inkstyle seed=4 size=768x512`.
Words fill a command's positional parameters in order; `key=value` sets any parameter by
name; quotes ("..." or '...') keep spaces together. Only syntax is checked here: values are
validated by `arguments`, the same way for every platform.

The parser never raises: a syntax problem comes back as a ParsedText whose args hold
PARSE_ERROR, which the core answers with the message and the command's usage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.commands import ParsedText
from storage.families import ASPECT_RATIOS
from storage.result_buttons import buttons_help
from storage.training_bounds import METHODS, PRESETS

# What chat accepts for /style train method= ("ti" is shorthand for textual_inversion).
METHOD_CHOICES = (*METHODS, "ti")

# Commands that, typed alone on Slack, open a form whose options are pick lists: those
# with choices worth picking from.
FORM_COMMANDS = ("style train", "style create", "imagine")

PARSE_ERROR = "_parse_error"
HELP = "help"


@dataclass(frozen=True)
class Param:
    name: str
    help: str
    required: bool = False
    positional: bool = True
    rest: bool = False  # takes every remaining word (prompts, captions)

    def usage(self) -> str:
        if not self.positional:
            return f"[{self.name}=…]"
        return self.name if self.required else f"[{self.name}]"


@dataclass(frozen=True)
class CommandSpec:
    name: str  # "style create"
    summary: str
    params: tuple[Param, ...] = ()

    @property
    def usage(self) -> str:
        return " ".join([f"/{self.name}", *(p.usage() for p in self.params)])

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _p(name: str, help: str, **kw: bool) -> Param:
    return Param(name, help, **kw)


COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec(
            "style create",
            "start a style (or concept) with a trigger word",
            (
                _p("name", "short name, e.g. ink", required=True),
                _p("trigger", "the made-up word that switches the style on", required=True),
                _p("kind", "style or concept"),
                _p("base", "base model name"),
            ),
        ),
        CommandSpec(
            "style add",
            "add reference images (attach them, or post them in the style's thread)",
            (_p("name", "the style"),),
        ),
        CommandSpec(
            "style caption",
            "set the caption of image number N; `auto` captions the uncaptioned images with "
            "the captioning model (a person's caption always wins)",
            (
                _p("name", "the style", required=True),
                _p("number", "the image's number on the contact sheet, or auto", required=True),
                _p("text", "the caption (not with auto)", rest=True),
            ),
        ),
        CommandSpec(
            "style review",
            "post the contact sheet for an art lead to approve",
            (_p("name", "the style", required=True),),
        ),
        CommandSpec(
            "style train",
            "train on the approved dataset",
            (
                _p("name", "the style", required=True),
                _p("preset", "style or concept"),
                _p("steps", "training steps"),
                _p("rank", "LoRA rank"),
                _p("lr", "learning rate"),
                _p("method", "lora, dora or ti", positional=False),
                _p("quantize", "nf4: the base in 4 bits (QLoRA), for big models", positional=False),
                _p("layers", "attention, full or locon (SD: with convolutions)", positional=False),
                _p("optimizer", "adamw, adamw8bit (CUDA) or prodigy (no lr)", positional=False),
                _p("flip", "on or off: mirrored copies (styles: on)", positional=False),
                _p("noise_offset", "0-0.2: very dark or bright styles train", positional=False),
                _p("shuffle", "on: caption tags in a new order each step", positional=False),
                _p("keep_tags", "with shuffle: the first N tags stay put", positional=False),
                _p("epochs", "passes over the images (sets steps)", positional=False),
                _p(
                    "accumulate",
                    "micro-batches per step: a bigger batch in the same memory",
                    positional=False,
                ),
                _p("text_encoder", "on: a LoRA on the text encoder too (SD)", positional=False),
                _p("preserve", "0-4: prompts without the trigger stay plain", positional=False),
                _p("min_timestep", "0-999: train from this noise level up", positional=False),
                _p(
                    "max_timestep",
                    "1-1000: train up to this noise level (lower: textures learn faster)",
                    positional=False,
                ),
                _p("init_word", "ti: the word its new token starts from", positional=False),
            ),
        ),
        CommandSpec("style list", "the team's styles"),
        CommandSpec(
            "style info",
            "datasets, images, models and the last training run",
            (_p("name", "the style", required=True),),
        ),
        CommandSpec(
            "style versions",
            "every model version: its dataset, recipe, loss, approver, and which is used",
            (_p("name", "the style", required=True),),
        ),
        CommandSpec(
            "style use",
            "art leads: make a training checkpoint (its step) the version the style uses",
            (_p("name", "the style", required=True), _p("step", "the step", required=True)),
        ),
        CommandSpec(
            "style export",
            "download the latest model files",
            (_p("name", "the style", required=True),),
        ),
        CommandSpec(
            "style import",
            "import a LoRA .safetensors the team already has (attach it; Slack: post it in a "
            "thread with this command as its text); an art lead approves it like a trained one",
            (
                _p("name", "the style (created if new)", required=True),
                _p("trigger", "its trigger word", required=True),
                _p("base", "base model, for a new style", positional=False),
            ),
        ),
        CommandSpec(
            "imagine",
            "generate images; a style's trigger word in the prompt applies it",
            (
                _p("prompt", "what to draw", required=True, rest=True),
                _p("negative", "what to avoid", positional=False),
                _p("seed", "a number, for repeatable results", positional=False),
                _p("steps", "sampling steps", positional=False),
                _p("cfg", "prompt strength", positional=False),
                _p("size", "WxH, e.g. 768x512", positional=False),
                _p("count", "how many images", positional=False),
                _p("compare", "yes: base and style side by side", positional=False),
                _p("ar", "aspect ratio, e.g. 16:9 (or --ar 16:9 in the prompt)", positional=False),
                _p(
                    "strength",
                    "with an attached image: how much to repaint, 0.05-1",
                    positional=False,
                ),
            ),
        ),
        CommandSpec("jobs", "your jobs and the team's queue"),
        CommandSpec("cancel", "cancel a job", (_p("job", "the job number", required=True),)),
        CommandSpec(
            "audit",
            "art leads: the latest audit events (uploads, approvals, trainings, generations, "
            "deletions, imports)",
            (
                _p("style", "only this style's events"),
                _p("count", "how many events (default 20)", positional=False),
            ),
        ),
    )
}

# Other spellings people use for the same option.
ALIASES = {
    "neg": "negative",
    "negative_prompt": "negative",
    "learning_rate": "lr",
    "n": "count",
    "cfg_scale": "cfg",
    "id": "job",
    "aspect": "ar",
    "aspect_ratio": "ar",
    "denoise": "strength",
}

GROUPS = ("style", "imagine", "jobs", "cancel", "audit")


class _SyntaxProblem(Exception):
    pass


@dataclass(frozen=True)
class Token:
    value: str
    key: str | None = None  # set for key=value
    quoted: bool = False


# Order matters: quoted strings, then key=value (value maybe quoted), then bare words.
_TOKEN = re.compile(
    r"""
    "(?P<dq>[^"]*)"
  | '(?P<sq>[^']*)'(?=\s|$)
  | (?P<key>[A-Za-z_]+)=(?:"(?P<kdq>[^"]*)"|'(?P<ksq>[^']*)'(?=\s|$)|(?P<kv>\S*))
  | (?P<bare>\S+)
    """,
    re.VERBOSE,
)
_SMART_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "«": '"', "»": '"'})


def tokenize(text: str) -> list[Token]:
    """Split text into words, quoted strings and key=value pairs."""
    text = text.translate(_SMART_QUOTES)
    tokens: list[Token] = []
    for m in _TOKEN.finditer(text):
        if m.group("dq") is not None or m.group("sq") is not None:
            value = m.group("dq") if m.group("dq") is not None else m.group("sq")
            tokens.append(Token(value, quoted=True))
        elif m.group("key") is not None:
            value = next((m.group(g) for g in ("kdq", "ksq", "kv") if m.group(g) is not None), "")
            if m.group("kv") is not None and value.startswith('"'):
                raise _SyntaxProblem(f"a quote after {m.group('key')}= is not closed")
            tokens.append(Token(value, key=m.group("key").lower()))
        else:
            bare = m.group("bare")
            if bare.startswith('"'):
                raise _SyntaxProblem(f"a quote is not closed (at {bare[:20]})")
            tokens.append(Token(bare))
    return tokens


def split_words(text: str) -> list[str]:
    """Plain words of a line (quotes honoured), e.g. for console file paths."""
    try:
        return [t.value if t.key is None else f"{t.key}={t.value}" for t in tokenize(text)]
    except _SyntaxProblem:
        return text.split()


def parse_command_text(slash: str, text: str) -> ParsedText:
    """(slash command, its text) -> command name and args. Never raises (see module doc)."""
    group = slash.strip().lstrip("/").lower()
    if group not in GROUPS:
        return ParsedText(
            HELP, {PARSE_ERROR: f"Atelier has no /{group} command; it knows /{', /'.join(GROUPS)}."}
        )
    name = group
    try:
        tokens = tokenize(text)
        if group == "style":
            if not tokens or tokens[0].key is not None:
                return ParsedText(HELP, {"topic": "style"})
            sub = tokens.pop(0).value.lower()
            name = f"style {sub}"
            if sub in ("help", "?"):
                return ParsedText(HELP, {"topic": "style"})
            if name not in COMMANDS:
                subs = ", ".join(n.split(" ", 1)[1] for n in COMMANDS if n.startswith("style "))
                raise _SyntaxProblem(f"/style has no '{sub}' command; use one of {subs}")
        return ParsedText(name, bind(COMMANDS[name], tokens))
    except _SyntaxProblem as problem:
        return ParsedText(name, {PARSE_ERROR: str(problem)})


def bind(spec: CommandSpec, tokens: list[Token]) -> dict[str, str]:
    """Assign tokens to the spec's parameters: key=value first, then words in order."""
    args: dict[str, str] = {}
    words: list[Token] = []
    for token in tokens:
        if token.key is None:
            words.append(token)
            continue
        key = ALIASES.get(token.key, token.key)
        if spec.param(key) is None:
            known = ", ".join(p.name for p in spec.params) or "no options"
            raise _SyntaxProblem(
                f"/{spec.name} has no option '{token.key}' (it takes {known}); "
                'put text with = in quotes, e.g. "a=b"'
            )
        if key in args:
            raise _SyntaxProblem(f"{key} is given twice")
        args[key] = token.value
    slots = [p for p in spec.params if p.positional and p.name not in args]
    for param in slots:
        if not words:
            break
        if param.rest:
            args[param.name] = " ".join(w.value for w in words)
            words = []
        else:
            args[param.name] = words.pop(0).value
    if words:
        extra = " ".join(w.value for w in words)
        raise _SyntaxProblem(f"too many words ({extra[:40]})")
    return args


def usage(name: str) -> str:
    spec = COMMANDS.get(name)
    return spec.usage if spec else ""


def help_text(topic: str | None = None) -> str:
    specs = [s for s in COMMANDS.values() if not topic or s.name.split(" ")[0] == topic]
    lines = [f"`{s.usage}`: {s.summary}" for s in specs]
    lines.append(
        "Reactions: art leads ✅ approve or ❌ reject a review sheet; 🔁 rerolls a result."
    )
    lines.append("Buttons under every result:")
    lines += [f"  {line}" for line in buttons_help().splitlines()]
    lines.append(choices_help())
    forms = ", ".join(f"`/{name}`" for name in FORM_COMMANDS)
    lines.append(
        f"On Slack, {forms} typed alone open a form with these lists and the team's styles."
    )
    return "\n".join(lines)


def choices_help() -> str:
    """The fixed choices of options (Slack and the console have no autocomplete)."""
    ratios = ", ".join(f"{w}:{h}" for w, h in ASPECT_RATIOS)
    return (
        f"Choices: preset {' or '.join(PRESETS)}; method {', '.join(METHOD_CHOICES)}; ar {ratios}."
    )
