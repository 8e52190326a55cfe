"""FLUX.2 [klein] through the runner's jobs on its tiny model: a style on tiny-flux2-klein
trains, and /imagine-level generation makes images with their parameters recorded, the
trained LoRA changing them and switching off again without a reload."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image
from runner_fixtures import make_runner
from runner_seed import approved_style, enqueue_generate, enqueue_training, generate_payload
from sqlalchemy import select

from storage.job_payloads import result_key
from storage.models import Generation, JobStatus, ModelVersion, Style

pytest_plugins = ("runner_fixtures",)
pytestmark = pytest.mark.runner

BASE = "tiny-flux2-klein"


def _generate(services: Any, team_id: int, version_id: int | None, **kw: Any) -> Any:
    payload = generate_payload(
        team_id, version_id, base_model=BASE, seed=7, prompt="inkstyle, a harbour", **kw
    )
    job_id = enqueue_generate(services, payload)
    assert make_runner(services).run_once()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    with services.db.session() as s:
        generation = s.scalar(select(Generation).where(Generation.job_id == job_id))
    png = Image.open(io.BytesIO(services.blobs.read_bytes(generation.image_blobs[0])))
    png.load()
    return png, services.outbox.get(result_key(job_id))


def test_style_on_tiny_flux2_klein_trains_and_its_lora_changes_generation(
    services: Any, demo_items: list[tuple[Any, str]]
) -> None:
    from gpu_runner.png_metadata import parse_parameters

    style_id = approved_style(services, demo_items, base_model=BASE)
    _, job_id = enqueue_training(services, style_id, steps=20, checkpoint_every=10)
    assert make_runner(services).run_once()
    assert services.queue.get(job_id).status == JobStatus.SUCCEEDED, services.queue.get(job_id)
    with services.db.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.style_id == style_id))
        team_id = s.get(Style, style_id).team_id
    raw = services.blobs.read_bytes(version.kohya_blob)
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert meta["modelspec.trigger_phrase"] == "inkstyle"

    base, message = _generate(services, team_id, None, negative_prompt="blurry")
    parsed = parse_parameters(base.text["parameters"])
    assert (parsed["seed"], parsed["steps"], parsed["size"]) == (7, 4, (64, 64))
    assert parsed["sampler"] == "Euler" and parsed["cfg"] == 4.0
    assert parsed["model"] == BASE
    record = json.loads(base.text["atelier"])
    assert record["base_model"]["family"] == "flux2-klein"
    # The pipeline has no negative prompt: the person is told, and the recipe omits it.
    assert "Negative prompt ignored: FLUX.2 [klein]" in message.text
    assert record["negative_prompt"] == "" and record["notices"]
    pipe = services.models.get(BASE).pipe

    styled, _ = _generate(services, team_id, version.id)
    assert json.loads(styled.text["atelier"])["adapters"][0]["name"] == "ink"
    assert "<lora:" in styled.text["parameters"]
    assert not np.array_equal(np.asarray(base), np.asarray(styled))

    again, _ = _generate(services, team_id, None)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(again))  # switched off
    assert services.models.get(BASE).pipe is pipe  # never reloaded
