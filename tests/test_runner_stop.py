"""Stopping a real runner process mid-training (SIGTERM from docker stop or systemd, or
Ctrl-C): it finishes the step, writes a checkpoint there, hands the job back to the queue
and exits; the next runner resumes from that checkpoint without waiting out a lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from runner_seed import approved_style, enqueue_training

from storage.db import Database
from storage.job_payloads import ReplyTarget, progress_key
from storage.models import JobStatus, Team, TrainingRun, utcnow
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.work_signal import open_work_signal

pytest_plugins = ("runner_fixtures",)

STEPS = 200  # far more than the process reaches before the signal: it must stop mid-run


def _start_runner(data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ATELIER_DATA_DIR": str(data_dir), "ATELIER_DEVICE": "cpu"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gpu_runner", "--id", "first"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[1],
        )


def _wait_for_training(
    services: Any, job_id: int, proc: subprocess.Popen[bytes], log: Path
) -> None:
    wake = open_work_signal(services.db)  # wakes on each commit the runner makes
    deadline = time.monotonic() + 240
    try:
        while not any(e.step for e in services.queue.progress(job_id)):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the runner never started training"
            wake.wait(1.0)
    finally:
        wake.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopped_runner_checkpoints_and_hands_the_job_back(
    services: Any, data_dir: Path, tmp_path: Path, demo_items: list[tuple[Any, str]], sig: int
) -> None:
    from gpu_runner.jobs import handlers
    from gpu_runner.training.checkpoint import checkpoint_step, latest_checkpoint
    from gpu_runner.worker import Runner

    style_id = approved_style(services, demo_items)
    # No periodic checkpoint before the end: the one found afterwards is the stop's own.
    run_id, job_id = enqueue_training(services, style_id, steps=STEPS, checkpoint_every=STEPS)
    log = tmp_path / "runner.log"
    proc = _start_runner(data_dir, log)
    try:
        _wait_for_training(services, job_id, proc, log)
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]
    assert took < 30, f"exited {took:.1f} s after the signal"

    # Back in the queue at once, claimable by anyone: no lease to wait out.
    job = services.queue.get(job_id)
    assert job.status == JobStatus.QUEUED, job
    assert job.lease_owner is None and job.run_after <= utcnow() and job.attempts == 0
    reached = max(e.step for e in services.queue.progress(job_id) if e.step)
    assert 0 < reached < STEPS
    checkpoint = latest_checkpoint(services.runs_dir / str(run_id) / "checkpoints")
    assert checkpoint is not None and checkpoint_step(checkpoint) == reached
    with services.db.session() as s:
        run = s.get(TrainingRun, run_id)
        assert run.status == "queued" and run.last_checkpoint_step == reached
    message = services.outbox.get(progress_key(job_id))
    assert message is not None and "back in the queue" in message.text
    assert "stopping after the current step" in log.read_text()

    if sig != signal.SIGTERM:
        return  # resuming is the same whichever signal stopped it
    runner = Runner(
        queue=services.queue,
        outbox=services.outbox,
        handlers={kind: partial(handler, services) for kind, handler in handlers.items()},
        worker_id="second",
    )
    assert runner.run_once()  # right away: recover_expired has nothing to do with it
    done = services.queue.get(job_id)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.result["resumed_from"] == reached and done.result["final_step"] == STEPS


def test_a_stopping_runner_hands_back_its_job_and_what_it_claims_on_the_way_out(
    db: Database,
) -> None:
    """In process, with plain handlers: the stop arrives mid-step; a generation the training
    claims between steps is handed back unrun, and the runner takes nothing more."""
    from gpu_runner.worker import Runner

    with db.session(write=True) as s:
        s.add(Team(id=1, platform="console", external_id="local"))
    reply = ReplyTarget(platform="console", channel="c", team_id=1, requester="u").model_dump()
    queue = JobQueue(db, lease_seconds=3600)
    training = queue.enqueue("train", {"reply": reply}, requester="u")
    generation = queue.enqueue("generate", requester="v")
    ran: list[int] = []

    def train(ctx: Any) -> dict[str, Any]:
        runner.stop()  # what the SIGTERM handler does, while a step runs
        served = queue.claim("r1", kinds=["generate"])  # between steps, as run_train does
        assert served is not None and ctx.run_nested is not None
        ctx.run_nested(served)
        ctx.check_stop()
        return {}

    def generate(ctx: Any) -> dict[str, Any]:
        ran.append(ctx.job.id)
        return {}

    runner = Runner(
        queue=queue,
        outbox=Outbox(db),
        handlers={"train": train, "generate": generate},
        worker_id="r1",
    )
    assert runner.run_once()
    assert ran == []
    for job in (training, generation):
        back = queue.get(job.id)
        assert back.status == JobStatus.QUEUED and back.lease_owner is None and back.attempts == 0
    assert "back in the queue" in Outbox(db).get(progress_key(training.id)).text
    assert runner.run_once() is False  # a stopping runner claims nothing more
