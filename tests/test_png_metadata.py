"""PNG metadata: A1111's `parameters` chunk and Atelier's JSON record (no torch needed).

The `_a1111_*` helpers below re-state, in our own words, how AUTOMATIC1111 reads these files
(modules/infotext_utils.py parse_generation_parameters, modules/sd_samplers.py
get_sampler_and_scheduler, modules/sd_samplers_kdiffusion.py get_sigmas,
modules/sd_schedulers.py, extensions-builtin/Lora/scripts/lora_script.py infotext_pasted), so
the tests check what A1111 would do with our files, not what our own parser thinks.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from gpu_runner.png_metadata import (
    A1111_SAMPLERS,
    COMPARE_KEY,
    A1111Parameters,
    LoraRef,
    describe_comparison,
    encode_png,
    format_parameters,
    parse_parameters,
    read_png_metadata,
    side_by_side,
)

# --- A1111's rules, re-stated for the tests ----------------------------------------------

_A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Schedules: (name, label, aliases), in A1111's order.
_A1111_SCHEDULES = [
    ("automatic", "Automatic", []),
    ("uniform", "Uniform", []),
    ("karras", "Karras", []),
    ("exponential", "Exponential", []),
    ("polyexponential", "Polyexponential", []),
    ("sgm_uniform", "SGM Uniform", ["SGMUniform"]),
    ("kl_optimal", "KL Optimal", []),
    ("align_your_steps", "Align Your Steps", []),
    ("simple", "Simple", []),
    ("normal", "Normal", []),
    ("ddim", "DDIM", []),
    ("beta", "Beta", []),
]
# k-diffusion samplers and the schedule each runs under "Automatic" (None: the model's sigmas).
_A1111_KDIFF = {"DPM++ 2M": "karras", "Euler a": None, "Euler": None}
_A1111_TIMESTEP_SAMPLERS = {"DDIM", "UniPC", "PLMS"}  # run on their own timesteps
_A1111_RE_LORA = re.compile("<lora:([^:]+):")


def _png_text_chunks(data: bytes) -> dict[str, str]:
    """tEXt / iTXt chunks straight from the PNG bytes (what PIL hands A1111 as image.info)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out: dict[str, str] = {}
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            out[key.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode()
    return out


def _a1111_parse(text: str) -> dict[str, str]:
    """parse_generation_parameters: prompt lines, `Negative prompt:`, and the last line's pairs
    when it holds at least three; sizes split into `-1`/`-2`; a missing schedule is Automatic."""
    *lines, last = text.strip().split("\n")
    if len(_A1111_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    res: dict[str, str] = {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    res["Prompt"], res["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    for key, value in _A1111_PAIR.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = _A1111_SIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    res.setdefault("Schedule type", "Automatic")
    return res


def _a1111_sampler_and_schedule(sampler: str, schedule: str) -> tuple[str, str]:
    """get_sampler_and_scheduler: a name ending in a schedule wins over the field."""
    by_any = {n: label for n, label, _ in _A1111_SCHEDULES} | {
        label: label for _, label, _ in _A1111_SCHEDULES
    }
    found, name = by_any.get(schedule, "Automatic"), sampler
    for sched_name, label, aliases in _A1111_SCHEDULES:
        for option in [label, sched_name, *aliases]:
            if name.endswith(" " + option):
                found, name = label, name[: -len(option) - 1]
                break
    return name, found


def _a1111_runs(infotext: str) -> tuple[str, str]:
    """(sampler, sigma schedule) that A1111 uses when this infotext is pasted and run."""
    params = _a1111_parse(infotext)
    sampler, label = _a1111_sampler_and_schedule(params["Sampler"], params["Schedule type"])
    if sampler in _A1111_TIMESTEP_SAMPLERS:
        return sampler, "own timesteps"
    assert sampler in _A1111_KDIFF, f"A1111 has no sampler {sampler!r}"
    name = next(n for n, lab, _ in _A1111_SCHEDULES if lab == label)
    if name == "automatic":
        name = _A1111_KDIFF[sampler] or "uniform"
    # Uniform is the model's own sigmas: the same as Automatic for samplers without a default.
    return sampler, name


def _a1111_paste_loras(infotext: str, hash_lookup: dict[str, str]) -> str:
    """lora_script.infotext_pasted: rename each tag to the file that "Lora hashes" points at."""
    params = _a1111_parse(infotext)
    pairs = [item.strip().split(":", 1) for item in params.get("Lora hashes", "").split(",")]
    hashes = {p[0].strip().replace(",", ""): p[1].strip() for p in pairs if len(p) == 2}

    def rename(match: re.Match[str]) -> str:
        found = hash_lookup.get(hashes.get(match.group(1), ""))
        return f"<lora:{found}:" if found else match.group(0)

    return _A1111_RE_LORA.sub(rename, params["Prompt"])


# What Atelier's diffusers schedulers run for each of its sampler names (generation.py).
_ATELIER_RUNS = {
    "DPM++ 2M Karras": ("DPM++ 2M", "karras"),
    "DPM++ 2M": ("DPM++ 2M", "uniform"),
    "Euler a": ("Euler a", "uniform"),
    "Euler": ("Euler", "uniform"),
    "DDIM": ("DDIM", "own timesteps"),
    "UniPC": ("UniPC", "own timesteps"),
}

# --- fixtures ------------------------------------------------------------------------------

INK = LoraRef("inkwash", 0.8, "29f5733126ae" + "0" * 52)
NEON = LoraRef("neon", 1.0, "0123456789ab" + "f" * 52)


def _params(**overrides: object) -> A1111Parameters:
    base: dict[str, object] = {
        "prompt": "a red cat, inkwash style",
        "negative_prompt": "blurry, lowres",
        "steps": 25,
        "sampler": "DPM++ 2M Karras",
        "cfg": 6.5,
        "seed": 1234567,
        "width": 512,
        "height": 768,
        "model": "sd15",
        "model_hash": "6ce0161689",
        "loras": (INK, NEON),
    }
    base.update(overrides)
    return A1111Parameters(**base)  # type: ignore[arg-type]


# --- infotext layout and parsing -----------------------------------------------------------


def test_format_matches_a1111_layout() -> None:
    text = format_parameters(_params())
    lines = text.split("\n")
    assert lines[0] == "a red cat, inkwash style <lora:inkwash:0.8> <lora:neon:1>"
    assert lines[1] == "Negative prompt: blurry, lowres"
    # A1111 v1.9+ order: the schedule right after the sampler, both named as A1111 names them.
    assert lines[2].startswith(
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567"
    )
    assert "Size: 512x768" in lines[2]
    # Values with commas or colons are JSON-quoted, as A1111 does.
    assert 'Lora hashes: "inkwash: 29f5733126ae, neon: 0123456789ab"' in lines[2]


def test_parameters_round_trip() -> None:
    parsed = parse_parameters(format_parameters(_params()))
    assert parsed["prompt"] == "a red cat, inkwash style <lora:inkwash:0.8> <lora:neon:1>"
    assert parsed["negative"] == "blurry, lowres"
    assert (parsed["seed"], parsed["steps"], parsed["cfg"]) == (1234567, 25, 6.5)
    assert parsed["size"] == (512, 768)
    assert (parsed["sampler"], parsed["schedule_type"]) == ("DPM++ 2M", "Karras")
    assert parsed["atelier_sampler"] == "DPM++ 2M Karras"
    assert parsed["model_hash"] == "6ce0161689"
    assert parsed["lora_hashes"] == {"inkwash": "29f5733126ae", "neon": "0123456789ab"}


def test_parse_reads_a1111_text_with_multiline_prompt_and_no_negative() -> None:
    text = (
        "masterpiece, <lora:inkwash:0.8>\nsecond line\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, "
        "Size: 640x384, Model hash: abcdef1234, Model: v1-5, Version: v1.10.1"
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, <lora:inkwash:0.8>\nsecond line"
    assert parsed["negative"] == ""
    assert (parsed["width"], parsed["height"], parsed["seed"], parsed["cfg"]) == (640, 384, 42, 7.0)
    assert parsed["raw"]["Version"] == "v1.10.1"
    assert parsed["atelier_sampler"] == "Euler a"


def test_prompt_only_text_has_no_settings() -> None:
    parsed = parse_parameters("just a prompt: with a colon")
    assert parsed["prompt"] == "just a prompt: with a colon"
    assert "seed" not in parsed


# --- samplers: what A1111 re-runs ----------------------------------------------------------


@pytest.mark.parametrize("sampler", sorted(_ATELIER_RUNS))
def test_a1111_reruns_each_sampler_with_the_schedule_atelier_used(sampler: str) -> None:
    png = encode_png(Image.new("RGB", (8, 8)), format_parameters(_params(sampler=sampler)), {})
    infotext = _png_text_chunks(png)["parameters"]
    assert "Schedule type: " in infotext  # never left for A1111 to guess
    assert _a1111_runs(infotext) == _ATELIER_RUNS[sampler]


def test_a_missing_schedule_is_what_made_plain_dpm_karras() -> None:
    # The defect, in A1111's rules: without the field A1111 runs DPM++ 2M with Karras sigmas.
    legacy = "a cat\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 64x64"
    assert _a1111_runs(legacy) == ("DPM++ 2M", "karras")
    assert _a1111_runs(format_parameters(_params(sampler="DPM++ 2M"))) == ("DPM++ 2M", "uniform")


@pytest.mark.parametrize(
    ("sampler", "schedule", "atelier"),
    [
        ("DPM++ 2M Karras", None, "DPM++ 2M Karras"),  # A1111 before v1.9
        ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
        ("DPM++ 2M", None, "DPM++ 2M Karras"),  # Automatic is Karras for DPM++ 2M
        ("DPM++ 2M", "Uniform", "DPM++ 2M"),
        ("Euler a", None, "Euler a"),
        ("Euler", "Exponential", None),  # nothing of Atelier's runs that
        ("DDIM", "Karras", "DDIM"),  # timestep samplers ignore the schedule
    ],
)
def test_parse_reads_samplers_as_a1111_runs_them(
    sampler: str, schedule: str | None, atelier: str | None
) -> None:
    line = f"Steps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 1, Size: 64x64"
    if schedule:
        line += f", Schedule type: {schedule}"
    parsed = parse_parameters("a cat\n" + line)
    a1111 = _a1111_sampler_and_schedule(sampler, schedule or "Automatic")
    assert (parsed["sampler"], parsed["schedule_type"]) == a1111
    assert parsed["atelier_sampler"] == atelier


def test_an_unknown_sampler_needs_an_explicit_schedule() -> None:
    with pytest.raises(ValueError, match="no A1111 name for sampler 'LMS'"):
        format_parameters(_params(sampler="LMS"))
    text = format_parameters(_params(sampler="LMS", schedule_type="Karras"))
    assert "Sampler: LMS, Schedule type: Karras" in text


def test_the_mapping_covers_every_generation_sampler() -> None:
    # The one table of A1111 names must know every sampler the runner offers, and agree with
    # what each diffusers scheduler is configured to run.
    pytest.importorskip("diffusers")
    from gpu_runner.samplers import SAMPLERS

    assert set(SAMPLERS) == set(A1111_SAMPLERS) == set(_ATELIER_RUNS)
    for name, spec in SAMPLERS.items():
        if spec.scheduler in ("DDIMScheduler", "UniPCMultistepScheduler"):
            runs = "own timesteps"
        else:
            runs = "karras" if spec.options.get("use_karras_sigmas") else "uniform"
        assert _ATELIER_RUNS[name][1] == runs, name


# --- LoRA tags -----------------------------------------------------------------------------


def test_a1111_maps_pasted_tags_to_files_through_lora_hashes() -> None:
    text = format_parameters(_params())
    # A fresh install indexes each file by the first 12 hex digits of its sshs_model_hash.
    on_disk = {INK.hash[:12]: "inkwash", NEON.hash[:12]: "neon-v2"}
    prompt = _a1111_paste_loras(text, on_disk)
    assert prompt.endswith("<lora:inkwash:0.8> <lora:neon-v2:1>")
    # Each tag is written once and its hash entry carries the same name.
    assert prompt.count("<lora:") == 2


@pytest.mark.parametrize("name", ["ink:wash", "ink wash", "ink,wash", "ink>", ""])
def test_lora_names_a1111_cannot_parse_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be written"):
        LoraRef(name, 1.0, "0" * 64)


# --- PNG chunks ----------------------------------------------------------------------------


def test_png_carries_both_chunks_and_is_deterministic() -> None:
    image = Image.new("RGB", (16, 8), (10, 200, 30))
    text = format_parameters(_params(prompt="ünïcode prompt ✓"))
    record = {"seed": 1234567, "adapters": [{"name": "inkwash", "weight": 0.8}], "prompt": "✓"}
    first = encode_png(image, text, record)
    second = encode_png(image.copy(), text, dict(reversed(list(record.items()))))
    assert first == second  # key order of the record does not matter
    meta = read_png_metadata(first)
    assert meta.parameters == text
    assert meta.record == record
    assert _png_text_chunks(first)["parameters"] == text  # as A1111 reads the chunk
    assert Image.open(io.BytesIO(first)).size == (16, 8)
    # A different seed in the metadata changes the bytes.
    assert encode_png(image, text, {**record, "seed": 1}) != first


def test_png_without_metadata_reads_none() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    meta = read_png_metadata(buf.getvalue())
    assert meta.parameters is None and meta.record is None


def test_side_by_side_is_twice_as_wide() -> None:
    left = Image.new("RGB", (32, 24), (255, 0, 0))
    right = Image.new("RGB", (32, 24), (0, 0, 255))
    both = side_by_side([left, right])
    assert both.size == (64, 24)
    assert both.getpixel((0, 0)) == (255, 0, 0)
    assert both.getpixel((63, 23)) == (0, 0, 255)


# --- compare images ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Half:
    """Stands in for generation.GeneratedImage: an infotext and a record."""

    infotext: str
    record: dict[str, Any] = field(default_factory=dict)


def _half(variant: str, loras: tuple[LoraRef, ...], w: int = 32, h: int = 24) -> _Half:
    params = _params(prompt="inkwash cat", loras=loras, width=w, height=h)
    record = {
        "atelier_record": 1,
        "variant": variant,
        "prompt": "inkwash cat",
        "prompt_sent": "inkwash cat" if loras else "inkwash cat (plain words)",
        "seed": 8,
        "width": w,
        "height": h,
        "sampler": "DPM++ 2M Karras",
        "adapters": [{"name": lo.name, "weight": lo.weight} for lo in loras],
    }
    return _Half(format_parameters(params), record)


def _compare(gap: int = 0) -> tuple[Image.Image, str, dict[str, Any]]:
    base, styled = _half("base", ()), _half("style", (INK,))
    composite = side_by_side(
        [Image.new("RGB", (32, 24), (255, 0, 0)), Image.new("RGB", (32, 24), (0, 0, 255))], gap
    )
    infotext, record = describe_comparison(composite, base, styled, gap=gap)
    return composite, infotext, record


def test_compare_record_states_the_composite_and_each_half() -> None:
    composite, infotext, record = _compare()
    png = encode_png(composite, infotext, record)
    meta = read_png_metadata(png)
    assert meta.record == record
    assert Image.open(io.BytesIO(png)).size == (record["width"], record["height"]) == (64, 24)
    assert record["variant"] == "compare" and record["seed"] == 8
    assert "adapters" not in record  # the composite as a whole is not "with inkwash"
    left, right = record["panels"]
    assert (left["position"], left["variant"], left["adapters"]) == ("left", "base", [])
    assert (right["position"], right["variant"]) == ("right", "style")
    assert [a["name"] for a in right["adapters"]] == ["inkwash"]
    # Each box holds the pixels of its half.
    for panel, colour in ((left, (255, 0, 0)), (right, (0, 0, 255))):
        x0, y0, x1, y1 = panel["box"]
        assert (x1 - x0, y1 - y0) == (panel["width"], panel["height"])
        assert composite.getpixel((x0, y0)) == colour == composite.getpixel((x1 - 1, y1 - 1))
    # The LoRA tag belongs to the styled half only.
    assert "<lora:" not in left["parameters"] and "<lora:inkwash:0.8>" in right["parameters"]


def test_compare_infotext_is_the_styled_half_with_a_note() -> None:
    _, infotext, _ = _compare()
    params = _a1111_parse(infotext)
    # Pasted into A1111 it re-makes the right half: that half's size and tag, not the canvas.
    assert (params["Size-1"], params["Size-2"]) == ("32", "24")
    assert params["Prompt"].count("<lora:inkwash:0.8>") == 1
    note = params[COMPARE_KEY]
    assert "left 32x24: base model, no styles" in note and "right 32x24: with the style" in note
    assert "whole image 64x24" in note
    assert parse_parameters(infotext)["raw"][COMPARE_KEY] == note


def test_compare_with_a_gap_places_the_right_half_after_it() -> None:
    composite, _, record = _compare(gap=4)
    assert composite.size == (record["width"], record["height"]) == (68, 24)
    assert record["panels"][1]["box"] == [36, 0, 68, 24]


def test_compare_refuses_a_record_that_does_not_fit() -> None:
    base, styled = _half("base", ()), _half("style", (INK,))
    composite = side_by_side([Image.new("RGB", (32, 24)), Image.new("RGB", (32, 24))])
    with pytest.raises(ValueError, match="base image on the left"):
        describe_comparison(composite, styled, base)
    with pytest.raises(ValueError, match="make 64x24, not 32x24"):
        describe_comparison(Image.new("RGB", (32, 24)), base, styled)
