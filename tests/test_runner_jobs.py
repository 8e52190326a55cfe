"""The runner's jobs end to end on the tiny pipeline: train -> model version -> generate."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from runner_fixtures import make_runner
from runner_seed import approved_style, enqueue_generate, enqueue_training, generate_payload
from sqlalchemy import select, update

from storage.job_payloads import (
    progress_key,
    result_key,
)
from storage.models import (
    Generation,
    Job,
    JobStatus,
    ModelVersion,
    Style,
    Team,
    TrainingRun,
    utcnow,
)

pytest_plugins = ("runner_fixtures",)


@pytest.fixture
def trained(services: Any, demo_items: list[tuple[Any, str]]) -> dict[str, Any]:
    style_id = approved_style(services, demo_items)
    run_id, job_id = enqueue_training(services, style_id, steps=60, checkpoint_every=30)
    assert make_runner(services).run_once()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    with services.db.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.style_id == style_id))
        team_id = s.get(Style, style_id).team_id
        run = s.get(TrainingRun, run_id)
        assert run.status == "succeeded" and run.last_checkpoint_step == 60
    return {"job": job, "version": version, "team_id": team_id, "style_id": style_id}


def test_training_job_publishes_a_model_version(services: Any, trained: dict[str, Any]) -> None:
    version = trained["version"]
    assert version.kohya_blob and version.diffusers_blob
    raw = services.blobs.read_bytes(version.kohya_blob)
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["modelspec.trigger_phrase"] == "inkstyle"
    assert version.validation["val_loss"] < version.validation["base_val_loss"]
    result = services.outbox.get(result_key(trained["job"].id))
    assert result is not None and "ink" in result.text
    # The loss curve, base vs style, and (the run kept an earlier checkpoint) a row each.
    names = [a.filename for a in result.attachments]
    assert names == ["loss-curve.png", "base-vs-style.png", "checkpoints.png"]
    progress = services.outbox.get(progress_key(trained["job"].id))
    assert progress is not None and "done" in progress.text
    assert len(services.queue.progress(trained["job"].id)) >= 60


def test_generation_job_records_seed_and_parameters(services: Any, trained: dict[str, Any]) -> None:
    from gpu_runner.png_metadata import parse_parameters

    payload = generate_payload(trained["team_id"], trained["version"].id, seed=1234)
    job_id = enqueue_generate(services, payload)
    assert make_runner(services).run_once()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    with services.db.session() as s:
        generation = s.scalar(select(Generation).where(Generation.job_id == job_id))
    assert generation.seed == 1234 and generation.adapters[0]["name"] == "ink"
    png = Image.open(io.BytesIO(services.blobs.read_bytes(generation.image_blobs[0])))
    parsed = parse_parameters(png.text["parameters"])
    assert parsed["seed"] == 1234 and parsed["steps"] == 4
    message = services.outbox.get(result_key(job_id))
    assert message is not None and "Seed 1234" in message.text
    assert message.extra["seed"] == [1234] and len(message.attachments) == 1


def test_compatible_generations_run_as_one_batch(services: Any, trained: dict[str, Any]) -> None:
    ids = [
        enqueue_generate(services, generate_payload(trained["team_id"], None, prompt=f"boat {n}"))
        for n in range(3)
    ]
    assert make_runner(services).run_once()  # one claim serves all three
    assert [services.queue.get(i).status for i in ids] == [JobStatus.SUCCEEDED] * 3
    assert make_runner(services).run_once() is False


def test_another_teams_model_is_refused(
    services: Any, trained: dict[str, Any], demo_items: list[tuple[Any, str]]
) -> None:
    with services.db.session(write=True) as s:
        other = Team(platform="console", external_id="intruders")
        s.add(other)
        s.flush()
        other_id = other.id
    payload = generate_payload(other_id, trained["version"].id)
    job_id = enqueue_generate(services, payload)
    make_runner(services).run_once()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.FAILED and "not available to this team" in (job.error or "")
    message = services.outbox.get(result_key(job_id))
    assert message is not None and message.team_id == other_id


def test_bad_request_ends_with_a_clear_message(services: Any, trained: dict[str, Any]) -> None:
    payload = generate_payload(trained["team_id"], None, prompt="word " * 120)
    job_id = enqueue_generate(services, payload)
    make_runner(services).run_once()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 1
    assert "prompt" in (job.error or "") and "token" in (job.error or "")


def _run_until_killed(
    data_dir: Path, failpoint: str, database_url: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "ATELIER_DATA_DIR": str(data_dir),
        "ATELIER_DEVICE": "cpu",
        "ATELIER_FAILPOINTS": failpoint,
        # None: the data folder's SQLite database.
        **({"ATELIER_DATABASE_URL": database_url} if database_url else {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "gpu_runner", "--until-idle", "--id", "doomed"],
        env=env,
        capture_output=True,
        cwd=Path(__file__).parents[1],
        timeout=300,
        check=False,
    )


def _restart_after_crash(services: Any, job_id: int) -> Any:
    """What happens after a crash: the lease runs out, another runner takes the job."""
    with services.db.session(write=True) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
    services.queue.recover_expired()
    assert make_runner(services).run_once()
    assert make_runner(services).run_once() is False
    return services.queue.get(job_id)


def _assert_blobs_whole(services: Any) -> None:
    import hashlib

    services.blobs.remove_stale_temp(older_than_s=0)
    for path in services.blobs.root.rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path


@pytest.mark.parametrize(
    "failpoint",
    ["after_claim", "mid_training:5", "after_checkpoint", "before_outputs", "after_outputs"],
)
def test_training_survives_sigkill(
    services: Any, data_dir: Path, demo_items: list[tuple[Any, str]], failpoint: str
) -> None:
    style_id = approved_style(services, demo_items)
    run_id, job_id = enqueue_training(services, style_id, steps=20, checkpoint_every=10)
    crashed = _run_until_killed(data_dir, failpoint)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    job = _restart_after_crash(services, job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 2, job.error
    with services.db.session() as s:
        versions = s.scalars(select(ModelVersion).where(ModelVersion.training_run_id == run_id))
        assert len(list(versions)) == 1
    if failpoint in ("after_checkpoint", "before_outputs"):
        assert job.result.get("resumed_from") in (10, 20)  # not from step 0
    assert services.outbox.get(result_key(job_id)) is not None
    _assert_blobs_whole(services)


@pytest.mark.parametrize("failpoint", ["mid_generation:2", "before_outputs", "after_outputs"])
def test_generation_survives_sigkill(services: Any, data_dir: Path, failpoint: str) -> None:
    with services.db.session(write=True) as s:
        team = Team(platform="console", external_id="t")
        s.add(team)
        s.flush()
        team_id = team.id
    payload = generate_payload(team_id, None, seed=5, count=2)
    job_id = enqueue_generate(services, payload)
    crashed = _run_until_killed(data_dir, failpoint)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    job = _restart_after_crash(services, job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 2, job.error
    with services.db.session() as s:
        rows = list(s.scalars(select(Generation).where(Generation.job_id == job_id)))
    assert len(rows) == 1 and rows[0].seed == 5 and len(rows[0].image_blobs) == 2
    message = services.outbox.get(result_key(job_id))
    assert message is not None and message.revision == 1  # posted once, not twice
    _assert_blobs_whole(services)


def test_generation_is_served_while_training_pauses(
    services: Any, demo_items: list[tuple[Any, str]]
) -> None:
    """A generation queued mid-training runs between two steps, on the training's base model
    with the training adapter off, and the training then finishes as usual."""
    import threading

    from storage.work_signal import open_work_signal

    style_id = approved_style(services, demo_items)
    with services.db.session() as s:
        team_id = s.get(Style, style_id).team_id
    _, train_id = enqueue_training(services, style_id, steps=40, checkpoint_every=40)
    runner = make_runner(services)
    worker = threading.Thread(target=runner.run_once)
    worker.start()
    wake = open_work_signal(services.db)
    try:
        while not services.queue.progress(train_id) and worker.is_alive():
            wake.wait(0.5)
    finally:
        wake.close()
    payload = generate_payload(team_id, None, prompt="a quiet harbour", seed=99)
    gen_id = enqueue_generate(services, payload)
    worker.join(timeout=300)
    training, generation = services.queue.get(train_id), services.queue.get(gen_id)
    assert training.status == JobStatus.SUCCEEDED, training.error
    assert generation.status == JobStatus.SUCCEEDED, generation.error
    assert training.started_at < generation.finished_at < training.finished_at
    assert training.result["final_step"] == 40
    # Served with the training adapter off: the same pixels an idle runner makes.
    again = enqueue_generate(services, payload)
    assert make_runner(services).run_once()

    def pixels(job_id: int) -> bytes:
        blob = services.queue.get(job_id).result["images"][0]
        return Image.open(io.BytesIO(services.blobs.read_bytes(blob))).tobytes()

    assert pixels(again) == pixels(gen_id)
