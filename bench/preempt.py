"""Generation latency while a training runs, against the same runner when idle.

A real runner process (`python -m gpu_runner`) on the tiny pipeline: first N generations
on the idle runner, then a long training starts and N more generations are queued while it
trains. Latency is enqueue -> finished, from the job rows. Target: <= 2x the idle time.

    .venv/bin/python bench/preempt.py [--samples 5] [--steps 20] [--device cpu]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Keep bench/ off the import path: bench/queue.py would shadow the stdlib module.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # shared seeding

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
from types import SimpleNamespace

from storage.blobs import BlobStore
from storage.db import Database
from storage.job_payloads import (
    GeneratePayload,
    JobKind,
    Priority,
    ReplyTarget,
    TrainPayload,
    batch_key,
)
from storage.models import (
    DatasetVersion,
    JobStatus,
    Style,
    TrainingRun,
)
from storage.queue import JobQueue
from storage.work_signal import open_work_signal


def seed_style(db: Database, blobs: BlobStore, queue: JobQueue) -> tuple[int, int]:
    """A team and an approved 12-image style on tiny-sd15. Returns (team id, style id)."""
    from runner_seed import approved_style

    from gpu_runner.tiny_models import demo_dataset

    stores = SimpleNamespace(db=db, blobs=blobs, queue=queue)
    style_id = approved_style(stores, demo_dataset(12, 64, seed=0), "bench")
    with db.session() as s:
        style = s.get(Style, style_id)
        assert style is not None
        return style.team_id, style_id


def wait_for(db: Database, done) -> None:  # type: ignore[no-untyped-def]
    signal_ = open_work_signal(db)
    try:
        while not done():
            signal_.wait(0.2)
    finally:
        signal_.close()


def generation_latency(queue: JobQueue, reply: ReplyTarget, steps: int, seed: int) -> float:
    payload = GeneratePayload(
        prompt="a harbour at dawn",
        base_model="tiny-sd15",
        steps=steps,
        width=64,
        height=64,
        seed=seed,
        reply=reply,
    )
    job = queue.enqueue(
        JobKind.GENERATE,
        payload.model_dump(),
        requester="bench",
        priority=Priority.GENERATE,
        base_model="tiny-sd15",
        batch_key=batch_key(payload),
    )
    wait_for(queue.db, lambda: queue.get(job.id).status.is_final)
    final = queue.get(job.id)
    if final.status != JobStatus.SUCCEEDED:
        raise SystemExit(f"generation failed: {final.error}")
    assert final.finished_at is not None
    return (final.finished_at - final.created_at).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="generation steps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        db = Database(f"sqlite:///{data / 'atelier.db'}")
        db.upgrade()
        blobs = BlobStore(data / "blobs", 2_000_000_000)
        queue = JobQueue(db)
        team_id, style_id = seed_style(db, blobs, queue)
        reply = ReplyTarget(platform="console", channel="c", team_id=team_id, requester="bench")
        env = {**os.environ, "ATELIER_DATA_DIR": str(data), "ATELIER_DEVICE": args.device}
        runner = subprocess.Popen(
            [sys.executable, "-m", "gpu_runner", "--id", "bench-runner"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            generation_latency(queue, reply, args.steps, 0)  # warm-up: loads the pipeline
            idle = [generation_latency(queue, reply, args.steps, n) for n in range(args.samples)]

            with db.session(write=True) as s:
                dataset = s.query(DatasetVersion).filter_by(style_id=style_id).one()
                run = TrainingRun(
                    style_id=style_id,
                    dataset_version_id=dataset.id,
                    params={"steps": 20_000, "checkpoint_every": 20_000, "validate_every": 20_000},
                    requested_by="bench",
                )
                s.add(run)
                s.flush()
                payload = TrainPayload(training_run_id=run.id, reply=reply)
                train = queue.enqueue(
                    JobKind.TRAIN, payload.model_dump(), requester="bench", session=s
                )
            wait_for(
                db,
                lambda: len(queue.progress(train.id)) >= 5 or queue.get(train.id).status.is_final,
            )
            if queue.get(train.id).status.is_final:
                raise SystemExit(f"training did not start: {queue.get(train.id).error}")
            busy = [generation_latency(queue, reply, args.steps, n) for n in range(args.samples)]
            steps_done = queue.progress(train.id)[-1].step
            queue.cancel(train.id)
            wait_for(db, lambda: queue.get(train.id).status.is_final)
        finally:
            runner.send_signal(signal.SIGTERM)
            try:
                runner.wait(timeout=60)
            except subprocess.TimeoutExpired:
                runner.kill()
        db.dispose()

    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    print(f"tiny-sd15, 64x64, {args.steps} steps, {args.samples} samples each ({args.device})")
    print(f"{'runner state':<22} {'p50 s':>8} {'max s':>8}")
    print(f"{'idle':<22} {idle_p50:>8.2f} {max(idle):>8.2f}")
    print(f"{'training (same model)':<22} {busy_p50:>8.2f} {max(busy):>8.2f}")
    print(f"ratio training/idle (p50): {busy_p50 / idle_p50:.2f}x (target <= 2x)")
    print(f"training kept going: reached step {steps_done} and was canceled cleanly")


if __name__ == "__main__":
    main()
