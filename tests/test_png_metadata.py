"""PNG metadata: A1111's `parameters` chunk and Atelier's JSON record (no torch needed)."""

from __future__ import annotations

import io

from PIL import Image

from gpu_runner.png_metadata import (
    A1111Parameters,
    encode_png,
    format_parameters,
    parse_parameters,
    read_png_metadata,
    side_by_side,
)


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
        "lora_hashes": {"inkwash": "29f5733126ae", "neon": "0123456789ab"},
    }
    base.update(overrides)
    return A1111Parameters(**base)  # type: ignore[arg-type]


def test_format_matches_a1111_layout() -> None:
    text = format_parameters(_params())
    lines = text.split("\n")
    assert lines[0] == "a red cat, inkwash style"
    assert lines[1] == "Negative prompt: blurry, lowres"
    assert lines[2].startswith("Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234567")
    assert "Size: 512x768" in lines[2]
    # Values with commas or colons are JSON-quoted, as A1111 does.
    assert 'Lora hashes: "inkwash: 29f5733126ae, neon: 0123456789ab"' in lines[2]


def test_parameters_round_trip() -> None:
    parsed = parse_parameters(format_parameters(_params()))
    assert parsed["prompt"] == "a red cat, inkwash style"
    assert parsed["negative"] == "blurry, lowres"
    assert (parsed["seed"], parsed["steps"], parsed["cfg"]) == (1234567, 25, 6.5)
    assert parsed["size"] == (512, 768)
    assert parsed["sampler"] == "DPM++ 2M Karras"
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


def test_prompt_only_text_has_no_settings() -> None:
    parsed = parse_parameters("just a prompt: with a colon")
    assert parsed["prompt"] == "just a prompt: with a colon"
    assert "seed" not in parsed


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
