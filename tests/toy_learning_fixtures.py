"""Fixtures and helpers for the tests that measure learning on `toy-sd15` through the
runner's jobs (tests/test_toy_learning*.py): a runner on its own database, a style trained
from drawn references, generations scored with the toy world's metrics.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
from runner_seed import approved_style, enqueue_training, reply_to
from sqlalchemy import select

from bot.demo.references import held_out_prompts, reference_scenes
from bot.demo.scoring import Tally, panels
from storage.families import generation_defaults, trigger_weight
from storage.job_payloads import (
    AdapterChoice,
    GeneratePayload,
    JobKind,
    Priority,
    batch_key,
)
from storage.models import Generation, JobStatus, ModelVersion, Style
from storage.settings import load_settings
from toyworld.scenes import Scene
from toyworld.styles import draw

BASE = "toy-sd15"
# toy-sd15's own default (gpu_runner/jobs/train.py); the issue's budget is 300 steps.
STEPS = 60
PROMPTS = held_out_prompts(10)
SEED = 500
# Each test trains on toy-sd15 for up to 300 steps (DoRA and textual inversion more than
# STEPS): minutes on 2 busy cores, past the suite's 300 s guard against hangs.
LEARNING = [pytest.mark.runner, pytest.mark.timeout(1200)]


def reference_items(style: str) -> list[tuple[Any, str]]:
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


def drain(toy: Any) -> None:
    _, runner = toy
    while runner.run_once():
        pass


def train_style(
    toy: Any,
    name: str,
    trigger: str,
    style: str,
    method: str = "lora",
    team_id: int | None = None,
    steps: int = STEPS,
) -> dict[str, Any]:
    services, _ = toy
    style_id = approved_style(
        services, reference_items(style), team=f"team-{name}", name=name, trigger=trigger,
        base_model=BASE, team_id=team_id,
    )  # fmt: skip
    _, job_id = enqueue_training(services, style_id, method=method, steps=steps)
    drain(toy)
    job = services.queue.get(job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    with services.db.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.style_id == style_id))
        team = s.get(Style, style_id).team_id
    return {"version": version, "team_id": team, "name": name, "trigger": trigger}


def choice(trained: dict[str, Any], weight: float | None) -> AdapterChoice:
    # None: the weight a trigger word selects it with in chat (bot/core/imagine.py).
    return AdapterChoice(
        model_version_id=trained["version"].id, name=trained["name"], trigger=trained["trigger"],
        weight=trigger_weight(BASE) if weight is None else weight,
    )  # fmt: skip


def generate(
    toy: Any,
    team_id: int,
    prompts: list[str],
    adapters: list[dict[str, Any]],
    size: tuple[int, int] | None = None,
    weight: float | list[float] | None = None,
) -> list[list[bytes]]:
    """One job per prompt (2 seeds each, at the model's size unless `size` says (w, h),
    each adapter at `weight` (one for all, or one each) or else its trigger's); returns
    each job's PNGs."""
    weights = weight if isinstance(weight, list) else [weight] * len(adapters)
    services, _ = toy
    jobs = []
    width, height = size or (None, None)
    for prompt in prompts:
        payload = GeneratePayload(
            reply=reply_to(team_id), prompt=prompt, base_model=BASE, seed=SEED, count=2,
            adapters=[choice(a, w) for a, w in zip(adapters, weights, strict=True)],
            width=width, height=height,
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
    drain(toy)
    out = []
    with services.db.session() as s:
        for job_id in jobs:
            assert services.queue.get(job_id).status == JobStatus.SUCCEEDED
            row = s.scalar(select(Generation).where(Generation.job_id == job_id))
            out.append([services.blobs.read_bytes(b) for b in row.image_blobs])
    return out


def score(images: list[list[bytes]], scenes: list[Scene], style: str) -> dict[str, float]:
    tally = Tally.empty()
    for pngs, scene in zip(images, scenes, strict=True):
        for png in pngs:
            tally.add(next(iter(panels(png).values())), scene, style)
    return tally.summary()


def with_and_without(toy: Any, trained: dict[str, Any], style: str) -> tuple[dict, dict]:
    team = trained["team_id"]
    on = generate(toy, team, [f"{p.caption}, {trained['trigger']}" for p in PROMPTS], [trained])
    # The LoRA applied, but no trigger word in the text: a leak would show here.
    off = generate(toy, team, [p.caption for p in PROMPTS], [trained])
    return score(on, PROMPTS, style), score(off, PROMPTS, style)


@pytest.fixture(scope="module")
def stripes(toy: Any) -> dict[str, Any]:
    return train_style(toy, "stripes", "zxstripes", "stripes")
