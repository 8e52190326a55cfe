"""Learning, measured on `toy-sd15` with the toy world's metrics, through the runner's jobs:
a LoRA makes its style visible with the trigger; the exported kohya file gives the same
style score in a fresh pipeline with diffusers' own loader; a generation after training is
plain; prompts without the trigger stay plain; two styles combine. DoRA and textual
inversion: tests/test_toy_learning_methods.py.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

pytest_plugins = ("runner_fixtures", "toy_learning_fixtures")
torch = pytest.importorskip("torch")

from toy_learning_fixtures import (  # noqa: E402
    BASE,
    LEARNING,
    PROMPTS,
    SEED,
    generate,
    score,
    train_style,
    with_and_without,
)

from storage.families import generation_defaults, trigger_weight  # noqa: E402

pytestmark = LEARNING


def test_lora_shows_the_style_with_its_trigger(toy: Any, stripes: dict[str, Any]) -> None:
    with_trigger, _ = with_and_without(toy, stripes, "stripes")
    base = score(
        generate(toy, stripes["team_id"], [p.caption for p in PROMPTS], []), PROMPTS, "stripes"
    )
    assert base["style_shows"] <= 0.1, base  # the base model draws plain shapes
    # Issue 9's targets: the style in >= 80% of held-out prompts, colour right in >= 70%.
    assert with_trigger["style_shows"] >= 0.8, with_trigger
    assert with_trigger["style_score"] >= 3 * base["style_score"], (with_trigger, base)
    assert with_trigger["colour"] >= 0.7, with_trigger


def test_style_does_not_show_without_its_trigger(toy: Any, stripes: dict[str, Any]) -> None:
    # The LoRA applied with no trigger in the prompt; without output preservation in
    # toy-sd15's defaults it restyled 70% of these.
    _, without = with_and_without(toy, stripes, "stripes")
    assert without["style_shows"] <= 0.15, without


def test_kohya_file_in_diffusers_loader_scores_as_atelier_does(
    toy: Any, stripes: dict[str, Any]
) -> None:
    from safetensors.torch import load_file

    from gpu_runner.samplers import make_scheduler
    from gpu_runner.toyworld.model import build_toy_sd15_pipeline

    services, _ = toy
    prompts = [f"{p.caption}, {stripes['trigger']}" for p in PROMPTS]
    ours = score(generate(toy, stripes["team_id"], prompts, [stripes]), PROMPTS, "stripes")
    pipe = build_toy_sd15_pipeline()
    pipe.load_lora_weights(
        load_file(services.blobs.path(stripes["version"].kohya_blob)), adapter_name="kohya"
    )
    pipe.set_adapters("kohya", trigger_weight(BASE))  # the weight the infotext states
    defaults = generation_defaults(BASE, {})
    pipe.scheduler = make_scheduler(pipe.scheduler.config, defaults.sampler)
    theirs = []
    for prompt in prompts:
        gens = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)]
        out = pipe([prompt] * 2, num_inference_steps=defaults.steps, guidance_scale=defaults.cfg,
                   width=64, height=64, generator=gens)  # fmt: skip
        buffers = []
        for image in out.images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            buffers.append(buffer.getvalue())
        theirs.append(buffers)
    other = score(theirs, PROMPTS, "stripes")
    # Batched and single images differ by at most 1/255 (DESIGN.md): allow one image.
    assert abs(other["style_shows"] - ours["style_shows"]) <= 0.05, (other, ours)
    assert abs(other["style_score"] - ours["style_score"]) <= 0.01, (other, ours)


def test_the_style_shows_at_a_wide_size(toy: Any, stripes: dict[str, Any]) -> None:
    # Trained on square references; asked for a 2:1 frame the team's style must still show
    # (measured: stripes in 70% of wide images, 65% of square ones; the base 0%).
    wide = (128, 64)
    team, trigger = stripes["team_id"], stripes["trigger"]
    on = generate(toy, team, [f"{p.caption}, {trigger}" for p in PROMPTS], [stripes], wide)
    base = generate(toy, team, [p.caption for p in PROMPTS], [], wide)
    with Image.open(io.BytesIO(on[0][0])) as image:
        assert image.size == wide
    styled, plain = score(on, PROMPTS, "stripes"), score(base, PROMPTS, "stripes")
    assert styled["style_shows"] >= 0.5 and plain["style_shows"] <= 0.1, (styled, plain)
    assert styled["style_score"] >= 3 * plain["style_score"], (styled, plain)


def test_two_styles_in_one_prompt_both_show(toy: Any, stripes: dict[str, Any]) -> None:
    # Grid lines draw over stripes: `<lora:stripes:1.2> <lora:grid:0.8>` in chat (README).
    # Measured on these 20: at 1 each stripes showed in 10%, grid in 75%; at 0.8 each 20%
    # and 85%; at 1.2 and 0.8, 75% and 80%.
    grid = train_style(toy, "grid", "zxgrid", "grid", team_id=stripes["team_id"])
    prompts = [f"{p.caption}, {stripes['trigger']} {grid['trigger']}" for p in PROMPTS]
    images = generate(toy, stripes["team_id"], prompts, [stripes, grid], weight=[1.2, 0.8])
    assert score(images, PROMPTS, "stripes")["style_shows"] >= 0.6
    assert score(images, PROMPTS, "grid")["style_shows"] >= 0.6


def test_generation_after_training_without_trigger_is_plain(
    toy: Any, stripes: dict[str, Any]
) -> None:
    # `stripes` trained on this runner's warm toy-sd15 pipeline; then a plain request.
    plain = generate(toy, stripes["team_id"], [p.caption for p in PROMPTS], [])
    scores = score(plain, PROMPTS, "stripes")
    assert scores["style_shows"] <= 0.1 and scores["colour"] >= 0.9, scores


def test_png_of_a_result_reads_back(toy: Any, stripes: dict[str, Any]) -> None:
    (pngs,) = generate(toy, stripes["team_id"], [f"{PROMPTS[0].caption}, zxstripes"], [stripes])
    with Image.open(io.BytesIO(pngs[0])) as image:
        assert image.size == (64, 64) and "zxstripes" in image.text["parameters"]
