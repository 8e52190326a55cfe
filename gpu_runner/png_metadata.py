"""PNG files that A1111/Forge, ComfyUI viewers and Civitai read: the `parameters` text chunk
plus Atelier's full record as JSON under the key `atelier`.

Torch-free on purpose: the bot and storage may parse parameters back without the runner.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"
RECORD_KEY = "atelier"
# Fixed so the same pixels and metadata always give the same bytes.
_COMPRESS_LEVEL = 6

# A1111's own pattern for `Key: value` pairs on the last line (modules/infotext_utils.py).
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class A1111Parameters:
    """What goes into A1111's `parameters` chunk, in A1111's own field order."""

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
    lora_hashes: Mapping[str, str] = field(default_factory=dict)  # name -> 12 hex digits
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


def format_parameters(params: A1111Parameters) -> str:
    """A1111's infotext: prompt, `Negative prompt:` line, then one line of `Key: value` pairs."""
    pairs: list[tuple[str, str]] = [
        ("Steps", str(params.steps)),
        ("Sampler", params.sampler),
        ("CFG scale", _format_number(params.cfg)),
        ("Seed", str(params.seed)),
        ("Size", f"{params.width}x{params.height}"),
    ]
    if params.model_hash:
        pairs.append(("Model hash", params.model_hash))
    if params.model:
        pairs.append(("Model", params.model))
    if params.lora_hashes:
        joined = ", ".join(f"{name}: {h}" for name, h in params.lora_hashes.items())
        pairs.append(("Lora hashes", joined))
    pairs.extend(params.extra.items())
    line = ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs)
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    lines.append(line)
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 infotext back into a dict.

    Keys: prompt, negative, steps, sampler, cfg, seed, width, height, size, model,
    model_hash, lora_hashes (name -> hash) and raw (every `Key: value` pair as text).
    Follows A1111's parse_generation_parameters, so it reads A1111's own files too.
    """
    lines = text.strip().split("\n")
    last = lines[-1]
    if len(_PARAM_RE.findall(last)) < 3:
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
        out["sampler"] = raw["Sampler"]
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
        raw_record = text.get(RECORD_KEY)
    record = json.loads(raw_record) if raw_record else None
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
