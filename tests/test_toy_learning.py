"""Learning, measured on `toy-sd15` with the toy world's metrics, through the runner's jobs:
a LoRA makes its style visible with the trigger; the exported kohya file gives the same
style score in a fresh pipeline with diffusers' own loader; a generation after training is
plain; prompts without the trigger stay plain; DoRA and textual inversion learn too; two
styles combine.
"""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

pytest_plugins = ("runner_fixtures",)
# Each test trains on toy-sd15 for up to 300 steps: minutes on 2 busy cores, past the
# suite's 300 s guard against hangs.
pytestmark = [pytest.mark.runner, pytest.mark.timeout(1200)]
torch = pytest.importorskip("torch")

from runner_seed import approved_style, enqueue_training, reply_to  # noqa: E402

from bot.demo.references import held_out_prompts, reference_scenes  # noqa: E402
from bot.demo.scoring import Tally, panels  # noqa: E402
from storage.families import generation_defaults, trigger_weight  # noqa: E402
from storage.job_payloads import (  # noqa: E402
    AdapterChoice,
    GeneratePayload,
    JobKind,
    Priority,
    batch_key,
)
from storage.models import Generation, JobStatus, ModelVersion, Style  # noqa: E402
from storage.settings import load_settings  # noqa: E402
from toyworld.scenes import Scene  # noqa: E402
from toyworld.styles import draw  # noqa: E402

BASE = "toy-sd15"
STEPS = 300  # the budget: the style must show within this many steps
PROMPTS = held_out_prompts(10)
SEED = 500


def _items(style: str) -> list[tuple[Any, str]]:
    # The trigger last, as the demo writes it (see bot/demo/story.py PROMPT).
    return [
        (draw(scene, (style,)), f"{scene.caption}, [trigger]") for scene in reference_scenes(12)
    ]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path, tiny_builders: Any) -> Any:
    from gpu_runner.jobs import handlers
    from gpu_runner.services import open_services
    from gpu_runner.worker import Runner

    data = tmp_path_factory.mktemp("toy")
    (data / "atelier.db").write_bytes(sqlite_template.read_bytes())
    services = open_services(load_settings(data_dir=data, device="cpu"))
    runner = Runner(
        queue=services.queue,
        outbox=services.outbox,
        handlers={kind: partial(handler, services) for kind, handler in handlers.items()},
        worker_id="toy-runner",
    )
    return services, runner


def _drain(toy: Any) -> None:
    _, runner = toy
    while runner.run_once():
        pass


def _train(
    toy: Any, name: str, trigger: str, style: str, method: str = "lora", team_id: int | None = None
) -> dict[str, Any]:
    services, _ = toy
    style_id = approved_style(
        services, _items(style), team=f"team-{name}", name=name, trigger=trigger,
        base_model=BASE, team_id=team_id,
    )  # fmt: skip
    _, job_id = enqueue_training(services, style_id, method=method, steps=STEPS)
    _drain(toy)
    job = services.queue.get(job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    with services.db.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.style_id == style_id))
        team = s.get(Style, style_id).team_id
    return {"version": version, "team_id": team, "name": name, "trigger": trigger}


def _choice(trained: dict[str, Any], weight: float | None) -> AdapterChoice:
    # None: the weight a trigger word selects it with in chat (bot/core/imagine.py).
    return AdapterChoice(
        model_version_id=trained["version"].id, name=trained["name"], trigger=trained["trigger"],
        weight=trigger_weight(BASE) if weight is None else weight,
    )  # fmt: skip


def _generate(
    toy: Any,
    team_id: int,
    prompts: list[str],
    adapters: list[dict[str, Any]],
    size: tuple[int, int] | None = None,
    weight: float | None = None,
) -> list[list[bytes]]:
    """One job per prompt (2 seeds each, at the model's size unless `size` says (w, h),
    each adapter at `weight` or else its trigger's); returns each job's PNGs."""
    services, _ = toy
    jobs = []
    width, height = size or (None, None)
    for prompt in prompts:
        payload = GeneratePayload(
            reply=reply_to(team_id), prompt=prompt, base_model=BASE, seed=SEED, count=2,
            adapters=[_choice(a, weight) for a in adapters], width=width, height=height,
        ).with_defaults(generation_defaults(BASE, {}))  # fmt: skip
        jobs.append(
            services.queue.enqueue(
                JobKind.GENERATE,
                payload.model_dump(mode="json"),
                requester="ana",
                priority=Priority.GENERATE,
                base_model=BASE,
                batch_key=batch_key(payload),
            ).id
        )
    _drain(toy)
    out = []
    with services.db.session() as s:
        for job_id in jobs:
            assert services.queue.get(job_id).status == JobStatus.SUCCEEDED
            row = s.scalar(select(Generation).where(Generation.job_id == job_id))
            out.append([services.blobs.read_bytes(b) for b in row.image_blobs])
    return out


def _score(images: list[list[bytes]], scenes: list[Scene], style: str) -> dict[str, float]:
    tally = Tally.empty()
    for pngs, scene in zip(images, scenes, strict=True):
        for png in pngs:
            tally.add(next(iter(panels(png).values())), scene, style)
    return tally.summary()


def _with_and_without(toy: Any, trained: dict[str, Any], style: str) -> tuple[dict, dict]:
    team = trained["team_id"]
    on = _generate(toy, team, [f"{p.caption}, {trained['trigger']}" for p in PROMPTS], [trained])
    # The LoRA applied, but no trigger word in the text: a leak would show here.
    off = _generate(toy, team, [p.caption for p in PROMPTS], [trained])
    return _score(on, PROMPTS, style), _score(off, PROMPTS, style)


@pytest.fixture(scope="module")
def stripes(toy: Any) -> dict[str, Any]:
    return _train(toy, "stripes", "zxstripes", "stripes")


def test_lora_shows_the_style_with_its_trigger(toy: Any, stripes: dict[str, Any]) -> None:
    with_trigger, _ = _with_and_without(toy, stripes, "stripes")
    base = _score(
        _generate(toy, stripes["team_id"], [p.caption for p in PROMPTS], []), PROMPTS, "stripes"
    )
    assert base["style_shows"] <= 0.1, base  # the base model draws plain shapes
    # Issue 9's targets: the style in >= 80% of held-out prompts, colour right in >= 70%.
    assert with_trigger["style_shows"] >= 0.8, with_trigger
    assert with_trigger["style_score"] >= 3 * base["style_score"], (with_trigger, base)
    assert with_trigger["colour"] >= 0.7, with_trigger


def test_style_does_not_show_without_its_trigger(toy: Any, stripes: dict[str, Any]) -> None:
    # The LoRA applied with no trigger in the prompt; without output preservation in
    # toy-sd15's defaults it restyled 70% of these.
    _, without = _with_and_without(toy, stripes, "stripes")
    assert without["style_shows"] <= 0.15, without


# Textual inversion trains one embedding, so it can only find a look the base model can
# already draw: toy-sd15 draws "outlined" (pretraining's outlined_share) but no stripes
# (measured: stripes in 5% after 300 steps). DoRA learns stripes as a LoRA does.
_TI_MISSES = "measured: outlines in 5% after 300 steps at lr 5e-3 and at 1e-2"


@pytest.mark.parametrize(
    ("method", "style"),
    [
        ("dora", "stripes"),
        pytest.param(
            "textual_inversion", "outline", marks=pytest.mark.xfail(strict=True, reason=_TI_MISSES)
        ),
    ],
)
def test_dora_and_textual_inversion_show_the_style(toy: Any, method: str, style: str) -> None:
    trained = _train(toy, f"{style}-{method}", f"zx{method[:4]}", style, method)
    with_trigger, without = _with_and_without(toy, trained, style)
    assert with_trigger["style_shows"] >= 0.8, with_trigger
    assert without["style_shows"] <= 0.15, without


def test_kohya_file_in_diffusers_loader_scores_as_atelier_does(
    toy: Any, stripes: dict[str, Any]
) -> None:
    from safetensors.torch import load_file

    from gpu_runner.samplers import make_scheduler
    from gpu_runner.toyworld.model import build_toy_sd15_pipeline

    services, _ = toy
    prompts = [f"{p.caption}, {stripes['trigger']}" for p in PROMPTS]
    ours = _score(_generate(toy, stripes["team_id"], prompts, [stripes]), PROMPTS, "stripes")
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
    other = _score(theirs, PROMPTS, "stripes")
    # Batched and single images differ by at most 1/255 (DESIGN.md): allow one image.
    assert abs(other["style_shows"] - ours["style_shows"]) <= 0.05, (other, ours)
    assert abs(other["style_score"] - ours["style_score"]) <= 0.01, (other, ours)


def test_the_style_shows_at_a_wide_size(toy: Any, stripes: dict[str, Any]) -> None:
    # Trained on square references; asked for a 2:1 frame the team's style must still show
    # (measured: stripes in 70% of wide images, 65% of square ones; the base 0%).
    wide = (128, 64)
    team, trigger = stripes["team_id"], stripes["trigger"]
    on = _generate(toy, team, [f"{p.caption}, {trigger}" for p in PROMPTS], [stripes], wide)
    base = _generate(toy, team, [p.caption for p in PROMPTS], [], wide)
    with Image.open(io.BytesIO(on[0][0])) as image:
        assert image.size == wide
    styled, plain = _score(on, PROMPTS, "stripes"), _score(base, PROMPTS, "stripes")
    assert styled["style_shows"] >= 0.5 and plain["style_shows"] <= 0.1, (styled, plain)
    assert styled["style_score"] >= 3 * plain["style_score"], (styled, plain)


def test_two_styles_in_one_prompt_both_show(toy: Any, stripes: dict[str, Any]) -> None:
    # Two styles combine at full weight, `<lora:stripes:1> <lora:grid:1>` in chat (README):
    # at the trigger weight each, stripes showed in 45% of these, grid in 85%; at 1, 95%
    # and 85%.
    grid = _train(toy, "grid", "zxgrid", "grid", team_id=stripes["team_id"])
    prompts = [f"{p.caption}, {stripes['trigger']} {grid['trigger']}" for p in PROMPTS]
    images = _generate(toy, stripes["team_id"], prompts, [stripes, grid], weight=1.0)
    assert _score(images, PROMPTS, "stripes")["style_shows"] >= 0.7
    assert _score(images, PROMPTS, "grid")["style_shows"] >= 0.7


def test_generation_after_training_without_trigger_is_plain(
    toy: Any, stripes: dict[str, Any]
) -> None:
    # `stripes` trained on this runner's warm toy-sd15 pipeline; then a plain request.
    plain = _generate(toy, stripes["team_id"], [p.caption for p in PROMPTS], [])
    scores = _score(plain, PROMPTS, "stripes")
    assert scores["style_shows"] <= 0.1 and scores["colour"] >= 0.9, scores


def test_png_of_a_result_reads_back(toy: Any, stripes: dict[str, Any]) -> None:
    (pngs,) = _generate(toy, stripes["team_id"], [f"{PROMPTS[0].caption}, zxstripes"], [stripes])
    with Image.open(io.BytesIO(pngs[0])) as image:
        assert image.size == (64, 64) and "zxstripes" in image.text["parameters"]
