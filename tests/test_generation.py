"""Prompt parsing, request validation and generation on the tiny pipelines."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpu_runner.png_metadata import parse_parameters, read_png_metadata
from gpu_runner.prompts import (
    AdapterInfo,
    AdapterUse,
    InvalidRequestError,
    parse_prompt,
    parse_size,
    strip_lora_tags,
    validate_settings,
)

pytest_plugins = ("generation_fixtures",)

FAST: dict[str, Any] = {"steps": 3, "width": 64, "height": 64, "cfg": 5.0}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


# --- prompt parsing (no torch) ------------------------------------------------------------

INK = AdapterInfo("inkwash", "/loras/ink.safetensors", trigger="inkwash_style")
NEON = AdapterInfo("neon", "/loras/neon.safetensors", trigger="neonpunk")
EMB = AdapterInfo("zqx", "/loras/zqx.safetensors", trigger="zqxstyle", kind="embedding")
KNOWN = {"inkwash_style": INK, "neonpunk": NEON, "zqxstyle": EMB}


def test_lora_tag_selects_by_name_with_weight_and_is_removed() -> None:
    parsed = parse_prompt("a cat <lora:inkwash:0.5>, at night", KNOWN)
    assert parsed.adapters == (AdapterUse(INK, 0.5),)
    assert parsed.text == "a cat, at night"


def test_lora_tag_without_weight_means_one() -> None:
    assert parse_prompt("<LORA:Neon> city", KNOWN).adapters == (AdapterUse(NEON, 1.0),)


def test_trigger_word_selects_style_at_full_weight() -> None:
    parsed = parse_prompt("a portrait, InkWash_Style, soft light", KNOWN)
    assert parsed.adapters == (AdapterUse(INK, 1.0),)
    assert "InkWash_Style" in parsed.text  # the trigger stays: the LoRA was trained on it


def test_trigger_must_be_a_whole_word() -> None:
    assert parse_prompt("neonpunks and xneonpunk", KNOWN).adapters == ()


def test_several_adapters_combine_in_prompt_order() -> None:
    parsed = parse_prompt("neonpunk street <lora:inkwash:0.7> zqxstyle", KNOWN)
    assert parsed.adapters == (AdapterUse(NEON, 1.0), AdapterUse(INK, 0.7), AdapterUse(EMB, 1.0))


def test_tag_weight_overrides_trigger_weight() -> None:
    parsed = parse_prompt("inkwash_style cat <lora:inkwash:0.3>", KNOWN)
    assert parsed.adapters == (AdapterUse(INK, 0.3),)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:nope:1>", "names no known style; known styles: inkwash, neon, zqx"),
        ("<lora:inkwash:lots>", "not a number"),
        ("<lora:inkwash:9>", "between -4 and 4"),
        ("<lora:inkwash:1> <lora:inkwash:0.2>", "named twice"),
        ("<lora:zqx:1>", "textual-inversion embedding; use its trigger word 'zqxstyle'"),
        ("<lora:inkwash:1:2:3>", "is not a LoRA tag"),
    ],
)
def test_bad_tags_are_explained(prompt: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_prompt(prompt, KNOWN)


def test_strip_lora_tags_tidies_spacing() -> None:
    assert strip_lora_tags("<lora:a:1> red  cat <lora:b> , blue") == "red cat, blue"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"width": 500}, "SD1.5 draws sides in steps of 8: use size=496x512 or size=504x512"),
        (
            {"width": 1000, "height": 1000, "family": "flux1"},
            "FLUX.1 draws sides in steps of 16: use size=992x992 or size=1008x1008",
        ),
        ({"height": 520, "family": "zimage"}, "steps of 16: use size=512x512 or size=512x528"),
        ({"height": 32}, "height is 32; use 64 to 2048"),
        ({"steps": 0}, "steps is 0"),
        ({"steps": 500}, "steps is 500"),
        ({"cfg": 31.0}, "CFG is 31.0"),
        ({"count": 9}, "count is 9"),
        ({"seed": -1}, "seed is -1"),
        ({"seed": 2**40}, "seed is"),
    ],
)
def test_out_of_range_settings_are_explained(settings: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"steps": 20, "cfg": 7.0, "width": 512, "height": 512, "count": 1}
    base.update(seed=None, family="sd15")
    with pytest.raises(InvalidRequestError, match=message):
        validate_settings(**{**base, **settings})


def test_parse_size() -> None:
    assert parse_size("512x768") == (512, 768)
    assert parse_size("640") == (640, 640)
    with pytest.raises(InvalidRequestError, match="WIDTHxHEIGHT"):
        parse_size("big")


# --- generation ---------------------------------------------------------------------------

pytestmark = pytest.mark.runner


def _lora(path: Path, name: str, trigger: str) -> AdapterInfo:
    return AdapterInfo(name=name, path=str(path), trigger=trigger)


def test_same_request_twice_gives_identical_png(generator: Any, sd15_lora: Path) -> None:
    from gpu_runner.generation import GenerationRequest

    request = GenerationRequest("a red cat", seed=11, **FAST)
    first = generator.generate(request)
    # A LoRA request in between must leave nothing behind.
    styled = GenerationRequest(
        "a red cat", seed=11, adapters=(AdapterUse(_lora(sd15_lora, "ink", "inkwash")),), **FAST
    )
    generator.generate(styled)
    second = generator.generate(request)
    assert first.images[0].png == second.images[0].png


def test_lora_changes_the_image_without_reloading_base(generator: Any, sd15_lora: Path) -> None:
    from gpu_runner.generation import GenerationRequest

    ink = _lora(sd15_lora, "ink", "inkwash")
    loaded = generator.cache.get("tiny-sd15")
    unet = loaded.pipe.unet
    plain = generator.generate(GenerationRequest("inkwash cat", seed=3, **FAST))
    styled = generator.generate(
        GenerationRequest.from_prompt("inkwash cat", {"inkwash": ink}, seed=3, **FAST)
    )
    assert styled.request.adapters == (AdapterUse(ink, 1.0),)
    assert _max_diff(plain.images[0].png, styled.images[0].png) > 10
    assert generator.cache.get("tiny-sd15") is loaded and loaded.pipe.unet is unet
    assert generator.adapter_name(ink) in loaded.adapters.loaded  # loaded once, kept


def test_adapters_combine_and_weights_matter(
    generator: Any, sd15_lora: Path, sd15_lora_b: Path
) -> None:
    from gpu_runner.generation import GenerationRequest

    known = {
        "inkwash": _lora(sd15_lora, "ink", "inkwash"),
        "neon": _lora(sd15_lora_b, "neon", "neon"),
    }

    def run(prompt: str) -> Any:
        return generator.generate(GenerationRequest.from_prompt(prompt, known, seed=5, **FAST))

    ink, neon = run("cat <lora:ink:1>").images[0], run("cat <lora:neon:1>").images[0]
    both = run("cat <lora:ink:1> <lora:neon:1>").images[0]
    half = run("cat <lora:ink:0.5>").images[0]
    assert _max_diff(both.png, ink.png) > 5 and _max_diff(both.png, neon.png) > 5
    assert _max_diff(half.png, ink.png) > 5
    assert [a["name"] for a in both.record["adapters"]] == ["ink", "neon"]
    lora_hashes = parse_parameters(both.infotext)["lora_hashes"]
    assert set(lora_hashes) == {"inkwash", "neon"} and all(
        len(h) == 12 for h in lora_hashes.values()
    )
    loaded = generator.cache.get("tiny-sd15")
    assert len(loaded.adapters.loaded) == len(set(loaded.adapters.loaded))


def test_batched_requests_match_single_ones(generator: Any) -> None:
    from gpu_runner.generation import GenerationRequest

    requests = [
        GenerationRequest(prompt, seed=seed, **FAST)
        for prompt, seed in [("a cat", 21), ("a dog", 22), ("a red cat", 23)]
    ]
    batched = generator.generate_many(requests)
    for request, result in zip(requests, batched, strict=True):
        alone = generator.generate(request)
        assert result.images[0].seed == request.seed
        assert _max_diff(result.images[0].png, alone.images[0].png) <= 1  # DESIGN: <= 1/255


def test_batches_go_through_one_pipeline_call(generator: Any, monkeypatch: Any) -> None:
    from gpu_runner.generation import GenerationRequest, Generator

    calls: list[int] = []
    real_call = Generator._call

    def counting(self: Any, loaded: Any, chunk: list[Any], on_step: Any) -> Any:
        calls.append(len(chunk))
        return real_call(self, loaded, chunk, on_step)

    monkeypatch.setattr(Generator, "_call", counting)
    generator.generate_many(
        [
            GenerationRequest("a cat", seed=1, count=2, **FAST),
            GenerationRequest("a dog", seed=2, **FAST),
            GenerationRequest("a dog", seed=2, **{**FAST, "width": 72}),  # other size: own call
        ]
    )
    assert calls == [3, 1]


def test_count_uses_consecutive_seeds(generator: Any) -> None:
    from gpu_runner.generation import GenerationRequest

    result = generator.generate(GenerationRequest("a cat", seed=100, count=3, **FAST))
    assert result.seeds == [100, 101, 102]
    third = generator.generate(GenerationRequest("a cat", seed=102, **FAST))
    assert _max_diff(result.images[2].png, third.images[0].png) <= 1


def test_parameters_chunk_parses_back_to_request(generator: Any) -> None:
    from gpu_runner.generation import GenerationRequest

    request = GenerationRequest(
        "a blue cat", negative_prompt="blurry, dark", seed=987654, steps=4, cfg=6.5,
        width=72, height=64, sampler="euler_a",
    )  # fmt: skip
    image = generator.generate(request).images[0]
    meta = read_png_metadata(image.png)
    parsed = parse_parameters(meta.parameters or "")
    assert (parsed["seed"], parsed["steps"], parsed["cfg"]) == (987654, 4, 6.5)
    assert parsed["size"] == (72, 64) == (image.width, image.height)
    assert parsed["sampler"] == "Euler a"
    assert parsed["negative"] == "blurry, dark"
    assert parsed["model"] == "tiny-sd15"
    assert meta.record is not None and meta.record["seed"] == 987654
    assert meta.record["base_model"]["name"] == "tiny-sd15"


def test_seed_is_drawn_and_recorded_when_absent(generator: Any) -> None:
    from gpu_runner.generation import GenerationRequest

    result = generator.generate(GenerationRequest("a cat", **FAST))
    seed = result.request.seed
    assert seed is not None and result.seeds == [seed]
    assert parse_parameters(result.images[0].infotext)["seed"] == seed
    again = generator.generate(GenerationRequest("a cat", seed=seed, **FAST))
    assert again.images[0].png == result.images[0].png


def test_samplers_differ_and_unknown_is_explained(generator: Any) -> None:
    from gpu_runner.generation import GenerationRequest

    euler = generator.generate(GenerationRequest("a cat", seed=9, sampler="Euler", **FAST))
    ddim = generator.generate(GenerationRequest("a cat", seed=9, sampler="ddim", **FAST))
    assert _max_diff(euler.images[0].png, ddim.images[0].png) > 0
    with pytest.raises(InvalidRequestError, match="unknown sampler 'warp'; use one of"):
        generator.generate(GenerationRequest("a cat", sampler="warp", **FAST))


def test_compare_renders_base_and_style_side_by_side(generator: Any, sd15_lora: Path) -> None:
    from gpu_runner.generation import GenerationRequest

    ink = _lora(sd15_lora, "ink", "inkwash")
    result = generator.generate(
        GenerationRequest.from_prompt("inkwash cat", {"inkwash": ink}, seed=8, compare=True, **FAST)
    )
    (style,), (base,), (pair,) = result.images, result.base_images, result.comparisons
    assert (pair.width, pair.height) == (2 * style.width, style.height)
    assert base.seed == style.seed == pair.seed == 8
    plain = generator.generate(GenerationRequest("inkwash cat", seed=8, **FAST))
    assert _max_diff(base.png, plain.images[0].png) == 0  # base = adapters off, same seed
    assert _max_diff(base.png, style.png) > 10
    left, right = _pixels(pair.png)[:, :64], _pixels(pair.png)[:, 64:]
    assert np.array_equal(left, _pixels(base.png)) and np.array_equal(right, _pixels(style.png))


def test_compare_without_style_is_explained(generator: Any) -> None:
    from gpu_runner.generation import GenerationRequest

    with pytest.raises(InvalidRequestError, match="compare needs a style"):
        generator.generate(GenerationRequest("a cat", compare=True, **FAST))


def test_embedding_adapter_is_used_and_removable(generator: Any, embedding_file: Path) -> None:
    from gpu_runner.generation import GenerationRequest

    emb = AdapterInfo("zqx", str(embedding_file), trigger="zqxstyle", kind="embedding")
    request = GenerationRequest.from_prompt("a zqxstyle cat", {"zqxstyle": emb}, seed=4, **FAST)
    assert request.adapters == (AdapterUse(emb, 1.0),)
    with_emb = generator.generate(request)
    without = generator.generate(GenerationRequest("a zqxstyle cat", seed=4, **FAST))
    assert _max_diff(with_emb.images[0].png, without.images[0].png) > 5
    again = generator.generate(request)
    assert again.images[0].png == with_emb.images[0].png


def test_sdxl_generation_with_lora(generator: Any, sdxl_lora: Path) -> None:
    from gpu_runner.generation import GenerationRequest

    xl = _lora(sdxl_lora, "xl", "xlstyle")
    plain = generator.generate(GenerationRequest("a cat", base_model="tiny-sdxl", seed=2, **FAST))
    styled = generator.generate(
        GenerationRequest(
            "a cat", base_model="tiny-sdxl", seed=2, adapters=(AdapterUse(xl),), **FAST
        )
    )
    assert _max_diff(plain.images[0].png, styled.images[0].png) > 5
    assert styled.images[0].record["base_model"]["family"] == "sdxl"


def test_failures_are_per_request_with_clear_messages(generator: Any, sdxl_lora: Path) -> None:
    from gpu_runner.generation import GenerationError, GenerationRequest, GenerationResult
    from gpu_runner.pipelines import UnknownBaseModelError

    long_prompt = " ".join(["cat"] * 80)
    outcomes = generator.generate_many(
        [
            GenerationRequest(long_prompt, seed=1, **FAST),
            GenerationRequest("a cat", base_model="sd-real", **FAST),
            GenerationRequest("a cat", adapters=(AdapterUse(_lora(sdxl_lora, "xl", "x")),), **FAST),
            GenerationRequest("a cat", seed=1, **FAST),
        ]
    )
    too_long, unknown, wrong_family, fine = outcomes
    assert isinstance(too_long, InvalidRequestError)
    assert "prompt is 80 tokens long but the text encoder reads at most 75" in str(too_long)
    assert isinstance(unknown, UnknownBaseModelError) and "tiny-sd15, tiny-sdxl" in str(unknown)
    assert isinstance(wrong_family, GenerationError) and "made for SDXL" in str(wrong_family)
    assert isinstance(fine, GenerationResult)


def test_a_size_off_the_familys_grid_is_refused_by_the_runner(cpu_choice: Any) -> None:
    """The runner knows the family of every model it loads (the bot guesses it for a
    configured model without one): a side its pipeline would floor is refused, not drawn."""
    from gpu_runner.generation import GenerationRequest, GenerationResult, Generator
    from gpu_runner.pipelines import BaseModelSpec, PipelineCache

    specs = [BaseModelSpec(name, name) for name in ("tiny-zimage", "tiny-sd15")]
    generator = Generator(PipelineCache(specs, cpu_choice, budget_bytes=1 << 30))
    settings = {**FAST, "steps": 2, "width": 72}
    off_grid, sd = generator.generate_many(
        [
            GenerationRequest("a cat", base_model="tiny-zimage", seed=1, **settings),
            GenerationRequest("a cat", base_model="tiny-sd15", seed=1, **settings),
        ]
    )
    assert isinstance(off_grid, InvalidRequestError)
    assert str(off_grid) == "Z-Image draws sides in steps of 16: use size=64x64 or size=80x64"
    assert isinstance(sd, GenerationResult)  # SD's grid is its VAE's factor of 8
    assert (sd.images[0].width, sd.images[0].record["width"]) == (72, 72)


def test_out_of_memory_retries_singly_then_reports(generator: Any, monkeypatch: Any) -> None:
    from gpu_runner.generation import GenerationOutOfMemoryError, GenerationRequest, Generator

    real_call = Generator._call
    sizes: list[int] = []

    def batch_ooms(self: Any, loaded: Any, chunk: list[Any], on_step: Any) -> Any:
        sizes.append(len(chunk))
        if len(chunk) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, loaded, chunk, on_step)

    monkeypatch.setattr(Generator, "_call", batch_ooms)
    result = generator.generate(GenerationRequest("a cat", seed=1, count=2, **FAST))
    assert sizes == [2, 1, 1] and result.seeds == [1, 2]

    def always_oom(self: Any, loaded: Any, chunk: list[Any], on_step: Any) -> Any:
        raise RuntimeError("MPS backend out of memory")

    monkeypatch.setattr(Generator, "_call", always_oom)
    with pytest.raises(GenerationOutOfMemoryError, match="ran out of memory at 64x64"):
        generator.generate(GenerationRequest("a cat", seed=1, **FAST))


def test_progress_callback_sees_each_step(generator: Any) -> None:
    from gpu_runner.generation import GenerationRequest

    seen: list[tuple[int, int]] = []
    generator.generate(
        GenerationRequest("a cat", seed=1, **FAST), on_step=lambda s, t: seen.append((s, t))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
