"""PNG files that A1111/Forge, ComfyUI viewers and Civitai read: the `parameters` text chunk
plus Atelier's full record as JSON under the key `atelier`.

Torch-free on purpose: the bot and storage may parse parameters back without the runner.

The rules below follow AUTOMATIC1111/stable-diffusion-webui's own code, since A1111 is what a
studio pastes these files into: `modules/infotext_utils.py` (the `parameters` text, quoting),
`modules/sd_samplers.py` + `modules/sd_schedulers.py` (sampler and "Schedule type") and
`extensions-builtin/Lora` (`<lora:NAME:w>` tags and "Lora hashes").
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image, PngImagePlugin

from storage.png_record import RECORD_KEY, read_record

PARAMETERS_KEY = "parameters"
# Fixed so the same pixels and metadata always give the same bytes.
_COMPRESS_LEVEL = 6

# A1111's own pattern for `Key: value` pairs on the last line (modules/infotext_utils.py).
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")

# --- samplers ---------------------------------------------------------------------------
#
# Since v1.9 A1111 keeps the sampler and the sigma schedule apart ("Sampler: DPM++ 2M,
# Schedule type: Karras") and reads a missing "Schedule type" as "Automatic", which means "the
# sampler's own default" -- and A1111's default for DPM++ 2M is Karras. So a plain (non-Karras)
# DPM++ 2M image without the field is re-run with Karras sigmas. Every image therefore states
# its schedule, as A1111's label (sd_schedulers.py):
# - "Karras": diffusers `use_karras_sigmas=True`.
# - "Uniform": the model's own sigmas, evenly spaced in time (k-diffusion `get_sigmas`), which
#   is what diffusers' default spacing does and what A1111's Automatic gives Euler / Euler a.
#   Written for Euler too, so Forge (whose Automatic is "Normal" for new models) agrees.
# - "Automatic" for DDIM and UniPC: A1111 runs them on its own timesteps and ignores the field.
A1111_SAMPLERS: Mapping[str, tuple[str, str]] = {
    # Atelier's name (gpu_runner.generation.SAMPLERS) -> (A1111 sampler, A1111 schedule type)
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
    "DPM++ 2M": ("DPM++ 2M", "Uniform"),
    "Euler a": ("Euler a", "Uniform"),
    "Euler": ("Euler", "Uniform"),
    "DDIM": ("DDIM", "Automatic"),
    "UniPC": ("UniPC", "Automatic"),
}
# What A1111 runs for "Automatic" with these samplers (sd_samplers_kdiffusion.py options;
# DDIM/UniPC are timestep samplers with no schedule). Used to read A1111's own files back.
_A1111_AUTOMATIC = {
    "DPM++ 2M": "Karras",
    "Euler a": "Uniform",
    "Euler": "Uniform",
    "DDIM": "Automatic",
    "UniPC": "Automatic",
}
# A1111's schedules as (name, label, aliases), in its order (sd_schedulers.py): a legacy sampler
# name such as "DPM++ 2M Karras" is split by these suffixes when A1111 reads it.
_A1111_SCHEDULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("automatic", "Automatic", ()),
    ("uniform", "Uniform", ()),
    ("karras", "Karras", ()),
    ("exponential", "Exponential", ()),
    ("polyexponential", "Polyexponential", ()),
    ("sgm_uniform", "SGM Uniform", ("SGMUniform",)),
    ("kl_optimal", "KL Optimal", ()),
    ("align_your_steps", "Align Your Steps", ()),
    ("simple", "Simple", ()),
    ("normal", "Normal", ()),
    ("ddim", "DDIM", ()),
    ("beta", "Beta", ()),
)


def a1111_sampler(name: str) -> tuple[str, str]:
    """(A1111 sampler, A1111 schedule type) for one of Atelier's sampler names."""
    try:
        return A1111_SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"no A1111 name for sampler {name!r}; add it to A1111_SAMPLERS "
            f"(known: {', '.join(A1111_SAMPLERS)})"
        ) from None


def split_a1111_sampler(sampler: str, schedule: str | None) -> tuple[str, str]:
    """How A1111 reads a Sampler/Schedule type pair (sd_samplers.get_sampler_and_scheduler).

    A legacy name that ends in a schedule ("DPM++ 2M Karras") gives that schedule, whatever
    the field says; a missing field is "Automatic". Returns (sampler, schedule label).
    """
    labels = {n: label for n, label, _ in _A1111_SCHEDULES}
    labels.update({label: label for _, label, _ in _A1111_SCHEDULES})
    found = labels.get(schedule or "", "Automatic")
    name = sampler
    for sched_name, label, aliases in _A1111_SCHEDULES:
        for option in (label, sched_name, *aliases):
            if name.endswith(" " + option):
                found, name = label, name[: -(len(option) + 1)]
                break
    return name, found


def atelier_sampler(sampler: str, schedule: str | None) -> str | None:
    """Atelier's sampler name for what A1111 would run from this pair, or None if Atelier has
    no such sampler (e.g. "Euler" with "Exponential")."""
    name, label = split_a1111_sampler(sampler, schedule)
    if name not in _A1111_AUTOMATIC:
        return None
    if label == "Automatic" or _A1111_AUTOMATIC[name] == "Automatic":
        # Automatic runs the sampler's default; timestep samplers ignore the field entirely.
        label = _A1111_AUTOMATIC[name]
    for ours, (a_sampler, a_schedule) in A1111_SAMPLERS.items():
        runs = _A1111_AUTOMATIC[a_sampler] if a_schedule == "Automatic" else a_schedule
        if a_sampler == name and runs == label:
            return ours
    return None


# --- LoRA tags --------------------------------------------------------------------------

# A1111 finds `<lora:NAME:w>` by NAME = the file's stem or its `ss_output_name` (networks.py);
# it splits the tag on ":" and ends it at ">", and "Lora hashes" pairs are split on "," and ":".
_BAD_IN_LORA_NAME = re.compile(r"[:<>,\s]")


@dataclass(frozen=True)
class LoraRef:
    """One LoRA as the infotext names it.

    `name` must be the name the LoRA file goes by for other tools (see
    `gpu_runner.training.export.lora_file_stem`): the file stem and `ss_output_name`.
    `hash` is A1111's hash of the file (its header's `sshs_model_hash`, else the sha256 of its
    tensor data); A1111 matches the first 12 hex digits.
    """

    name: str
    weight: float
    hash: str

    def __post_init__(self) -> None:
        if not self.name or _BAD_IN_LORA_NAME.search(self.name):
            raise ValueError(f"LoRA name {self.name!r} cannot be written in a <lora:...> tag")

    @property
    def tag(self) -> str:
        return f"<lora:{self.name}:{self.weight:g}>"

    @property
    def short_hash(self) -> str:
        return self.hash[:12]


@dataclass(frozen=True)
class A1111Parameters:
    """What goes into A1111's `parameters` chunk, in A1111's own field order.

    `sampler` is Atelier's name ("DPM++ 2M Karras"); it is written as A1111's sampler plus an
    explicit "Schedule type" (`A1111_SAMPLERS`). Give `schedule_type` only to write an A1111
    sampler name that is not in that table. `loras` are appended to the prompt as tags and
    listed in "Lora hashes" under the same names (A1111 pairs them by name).
    """

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg: float
    seed: int
    width: int
    height: int
    model: str = ""
    model_hash: str = ""  # A1111 writes the first 10 hex digits of the file's sha256
    loras: Sequence[LoraRef] = ()
    # For prompts that already hold their tags: name -> 12 hex digits (prefer `loras`).
    lora_hashes: Mapping[str, str] = field(default_factory=dict)
    schedule_type: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


def _quote(value: str) -> str:
    # A1111 quotes values that would break the comma-separated line (infotext_utils.quote).
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def _format_number(value: float) -> str:
    # A1111 prints 7.0 as "7" and 7.5 as "7.5".
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _hash_key(name: str) -> str:
    # A1111 drops ":" and "," from the name it writes in "Lora hashes" (extra_networks_lora).
    return name.replace(":", "").replace(",", "")


def format_parameters(params: A1111Parameters) -> str:
    """A1111's infotext: prompt, `Negative prompt:` line, then one line of `Key: value` pairs."""
    if params.schedule_type:
        sampler, schedule = params.sampler, params.schedule_type
    else:
        sampler, schedule = a1111_sampler(params.sampler)
    pairs: list[tuple[str, str]] = [
        ("Steps", str(params.steps)),
        ("Sampler", sampler),
        ("Schedule type", schedule),
        ("CFG scale", _format_number(params.cfg)),
        ("Seed", str(params.seed)),
        ("Size", f"{params.width}x{params.height}"),
    ]
    if params.model_hash:
        pairs.append(("Model hash", params.model_hash))
    if params.model:
        pairs.append(("Model", params.model))
    hashes = {_hash_key(lora.name): lora.short_hash for lora in params.loras}
    hashes.update(params.lora_hashes)
    if hashes:
        pairs.append(("Lora hashes", ", ".join(f"{name}: {h}" for name, h in hashes.items())))
    pairs.extend(params.extra.items())
    line = ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs)
    prompt = " ".join([params.prompt, *(lora.tag for lora in params.loras)]).strip()
    lines = [prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


def _is_settings_line(line: str) -> bool:
    # A1111 takes the last line as settings only when it holds at least 3 pairs.
    return len(_PARAM_RE.findall(line)) >= 3


def add_parameter(text: str, key: str, value: str) -> str:
    """The infotext with one more `Key: value` pair on its settings line."""
    lines = text.split("\n")
    if not _is_settings_line(lines[-1]):
        raise ValueError("the infotext has no settings line to add to")
    lines[-1] = f"{lines[-1]}, {key}: {_quote(value)}"
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 infotext back into a dict.

    Keys: prompt, negative, steps, sampler, schedule_type, atelier_sampler, cfg, seed, width,
    height, size, model, model_hash, lora_hashes (name -> hash) and raw (every `Key: value`
    pair as text). Follows A1111's parse_generation_parameters and its sampler reading, so it
    reads A1111's own files too (a legacy "DPM++ 2M Karras" gives sampler "DPM++ 2M" and
    schedule_type "Karras").
    """
    lines = text.strip().split("\n")
    last = lines[-1]
    if not _is_settings_line(last):
        # No settings line: everything is prompt text.
        last = ""
    else:
        lines = lines[:-1]
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("Negative prompt:"):
            in_negative = True
            stripped = stripped[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(stripped)
    raw = {key.strip(): _unquote(value.strip()) for key, value in _PARAM_RE.findall(last)}
    out: dict[str, Any] = {
        "prompt": "\n".join(prompt),
        "negative": "\n".join(negative),
        "raw": raw,
    }
    if "Steps" in raw:
        out["steps"] = int(raw["Steps"])
    if "Sampler" in raw:
        out["sampler"], out["schedule_type"] = split_a1111_sampler(
            raw["Sampler"], raw.get("Schedule type")
        )
        out["atelier_sampler"] = atelier_sampler(raw["Sampler"], raw.get("Schedule type"))
    if "CFG scale" in raw:
        out["cfg"] = float(raw["CFG scale"])
    if "Seed" in raw:
        out["seed"] = int(raw["Seed"])
    size = _SIZE_RE.match(raw.get("Size", ""))
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
        out["size"] = (out["width"], out["height"])
    if "Model" in raw:
        out["model"] = raw["Model"]
    if "Model hash" in raw:
        out["model_hash"] = raw["Model hash"]
    if "Lora hashes" in raw:
        hashes: dict[str, str] = {}
        for item in raw["Lora hashes"].split(","):
            name, _, value = item.strip().rpartition(":")
            if name:
                hashes[name.strip()] = value.strip()
        out["lora_hashes"] = hashes
    return out


def encode_png(image: Image.Image, parameters: str, record: Mapping[str, Any]) -> bytes:
    """PNG bytes with the `parameters` chunk and the JSON record; deterministic for equal input."""
    info = PngImagePlugin.PngInfo()
    # add_text writes tEXt when the text is Latin-1 (as A1111 does) and iTXt otherwise.
    info.add_text(PARAMETERS_KEY, parameters)
    info.add_itxt(RECORD_KEY, json.dumps(record, sort_keys=True, ensure_ascii=False))
    buf = io.BytesIO()
    rgb = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
    rgb.save(buf, format="PNG", pnginfo=info, compress_level=_COMPRESS_LEVEL)
    return buf.getvalue()


@dataclass(frozen=True)
class PngMetadata:
    parameters: str | None
    record: dict[str, Any] | None


def read_png_metadata(data: bytes) -> PngMetadata:
    """The `parameters` text and the `atelier` JSON record from PNG bytes (None when absent)."""
    with Image.open(io.BytesIO(data)) as img:
        text: Mapping[str, Any] = getattr(img, "text", {}) or {}
        parameters = text.get(PARAMETERS_KEY)
        record = read_record(img)
    return PngMetadata(
        parameters=str(parameters) if parameters is not None else None, record=record
    )


def side_by_side(images: Sequence[Image.Image], gap: int = 0) -> Image.Image:
    """Images pasted left to right on one canvas (base | style for `compare`)."""
    width = sum(img.width for img in images) + gap * (len(images) - 1)
    height = max(img.height for img in images)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for img in images:
        canvas.paste(img.convert("RGB"), (x, 0))
        x += img.width + gap
    return canvas


# --- compare images ---------------------------------------------------------------------

COMPARE_KEY = "Atelier compare"  # the infotext note on a compare image
# Fields that belong to one half only: never stated for the whole composite.
_PANEL_ONLY = frozenset({"variant", "width", "height", "adapters", "prompt_sent"})


class DescribedImage(Protocol):
    """One rendered half: its own infotext and record (GeneratedImage fits)."""

    @property
    def infotext(self) -> str: ...

    @property
    def record(self) -> Mapping[str, Any]: ...


def describe_comparison(
    composite: Image.Image, base: DescribedImage, styled: DescribedImage, *, gap: int = 0
) -> tuple[str, dict[str, Any]]:
    """(infotext, record) for `side_by_side([base image, styled image], gap)`.

    A1111 infotext describes one generation, so the text is the styled half's own (its prompt,
    LoRA tags, hashes and size: pasted into A1111 it re-makes the right half) plus a note that
    says so and what the left half is. The record states the composite's full size and gives
    each half as a panel (position, box, its own record and infotext); LoRAs and the sent
    prompt appear only in the panel they belong to.
    """
    left, right = dict(base.record), dict(styled.record)
    if left.get("variant", "base") != "base" or right.get("variant", "style") != "style":
        raise ValueError("a comparison is the base image on the left and the styled one right")
    lw, lh = int(left["width"]), int(left["height"])
    rw, rh = int(right["width"]), int(right["height"])
    size = (lw + gap + rw, max(lh, rh))
    if composite.size != size:
        raise ValueError(
            f"the halves make {size[0]}x{size[1]}, not {composite.width}x{composite.height}"
        )
    note = (
        f"left {lw}x{lh}: base model, no styles; right {rw}x{rh}: with the style, as these "
        f"parameters say; same seed; whole image {size[0]}x{size[1]}"
    )
    infotext = add_parameter(styled.infotext, COMPARE_KEY, note)
    common = {k: v for k, v in right.items() if k not in _PANEL_ONLY and k in left and left[k] == v}
    record: dict[str, Any] = {
        **common,
        "variant": "compare",
        "layout": "side_by_side",
        "width": size[0],
        "height": size[1],
        "note": note,
        "panels": [
            {
                **left,
                "position": "left",
                "box": [0, 0, lw, lh],  # left, top, right, bottom in the composite
                "parameters": base.infotext,
            },
            {
                **right,
                "position": "right",
                "box": [lw + gap, 0, lw + gap + rw, rh],
                "parameters": styled.infotext,
            },
        ],
    }
    return infotext, record
