"""The runner loop with plain handlers: outcomes, cancel, crashes, heartbeats."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.worker import JobContext, JobFailed, Runner
from storage.db import Database
from storage.job_payloads import ReplyTarget, progress_key, result_key
from storage.models import JobStatus, Team
from storage.outbox import Outbox
from storage.queue import JobQueue, RetryPolicy

REPLY = ReplyTarget(platform="console", channel="c", team_id=1, requester="u").model_dump()


@pytest.fixture
def queue(db: Database) -> JobQueue:
    with db.session(write=True) as s:
        s.add(Team(id=1, platform="console", external_id="local"))
    return JobQueue(db, lease_seconds=0.3, retry=RetryPolicy(base_seconds=0))


def _runner(queue: JobQueue, **handlers: Any) -> Runner:
    return Runner(queue=queue, outbox=Outbox(queue.db), handlers=handlers, worker_id="r1")


def test_success_records_result(queue: JobQueue) -> None:
    job = queue.enqueue("echo", {"x": 2, "reply": REPLY}, requester="u")
    runner = _runner(queue, echo=lambda ctx: {"double": ctx.job.payload["x"] * 2})
    assert runner.run_once() is True
    assert queue.get(job.id).result == {"double": 4}
    assert runner.run_once() is False


def test_a_crashing_job_does_not_stop_the_runner(queue: JobQueue, db: Database) -> None:
    def boom(ctx: JobContext) -> dict[str, Any]:
        raise RuntimeError("CUDA error: device-side assert\ntraceback noise")

    bad = queue.enqueue("boom", {"reply": REPLY}, requester="u", max_attempts=2)
    good = queue.enqueue("echo", {"reply": REPLY}, requester="v")
    runner = _runner(queue, boom=boom, echo=lambda ctx: {"ok": True})
    while runner.run_once():
        pass
    failed = queue.get(bad.id)
    assert failed.status == JobStatus.FAILED and failed.attempts == 2
    assert failed.error == "RuntimeError: CUDA error: device-side assert"
    assert queue.get(good.id).status == JobStatus.SUCCEEDED
    message = Outbox(db).get(result_key(bad.id))
    assert message is not None and "after 2 tries" in message.text


def test_clear_failure_is_not_retried_and_tells_the_requester(
    queue: JobQueue, db: Database
) -> None:
    def refuse(ctx: JobContext) -> dict[str, Any]:
        raise JobFailed("Size 100x100 is not a multiple of 8; try 96x96 or 104x104.")

    job = queue.enqueue("gen", {"reply": REPLY}, requester="u", max_attempts=3)
    _runner(queue, gen=refuse).run_once()
    assert queue.get(job.id).status == JobStatus.FAILED
    assert queue.get(job.id).attempts == 1
    message = Outbox(db).get(result_key(job.id))
    assert message is not None and "multiple of 8" in message.text


def test_cancel_is_seen_between_steps(queue: JobQueue, db: Database) -> None:
    job = queue.enqueue("train", {"reply": REPLY}, requester="u")
    steps_done: list[int] = []

    def train(ctx: JobContext) -> dict[str, Any]:
        for step in range(10_000):
            ctx.check_stop()
            steps_done.append(step)
            if step == 3:
                queue.cancel(ctx.job.id)  # someone typed /cancel
            ctx.cancel_requested.wait(0.01)
        return {}

    _runner(queue, train=train).run_once()
    assert queue.get(job.id).status == JobStatus.CANCELED
    assert 4 <= len(steps_done) < 10_000
    message = Outbox(db).get(progress_key(job.id))
    assert message is not None and "canceled" in message.text


def test_heartbeats_keep_a_long_job_leased(queue: JobQueue) -> None:
    """A job running for several lease periods is not handed to another runner."""
    job = queue.enqueue("slow", {}, requester="u")
    stolen: list[Any] = []
    release = threading.Event()

    def slow(ctx: JobContext) -> dict[str, Any]:
        for _ in range(8):  # ~8 lease periods of 0.3 s, in heartbeat-sized waits
            release.wait(0.1 * 3)
            stolen.append(queue.claim("thief"))
        return {}

    _runner(queue, slow=slow).run_once()
    assert stolen == [None] * 8
    assert queue.get(job.id).status == JobStatus.SUCCEEDED


def test_progress_edits_one_message(queue: JobQueue, db: Database) -> None:
    job = queue.enqueue("train", {"reply": REPLY}, requester="u")

    def train(ctx: JobContext) -> dict[str, Any]:
        ctx.progress(1, 3, "step 1/3", force=True)
        ctx.progress(2, 3, "step 2/3")  # throttled: not posted
        ctx.progress(3, 3, "step 3/3", force=True)
        return {}

    _runner(queue, train=train).run_once()
    assert [e.step for e in queue.progress(job.id)] == [1, 2, 3]
    message = Outbox(db).get(progress_key(job.id))
    assert message is not None and message.text == "step 3/3" and message.revision == 2


def test_runner_waits_out_a_locked_database(tmp_path: Path, sqlite_template: Path) -> None:
    """A database locked past the busy timeout costs a retry, not the runner."""
    import sqlite3

    from storage.work_signal import open_work_signal

    path = tmp_path / "atelier.db"
    path.write_bytes(sqlite_template.read_bytes())
    queue = JobQueue(Database(f"sqlite:///{path}", busy_timeout_ms=50), recover_every_s=3600)
    job = queue.enqueue("echo", {}, requester="u")
    runner = _runner(queue, echo=lambda ctx: {"ok": True})
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # someone else holds the write lock
    stop = threading.Event()
    signal_ = open_work_signal(queue.db)
    thread = threading.Thread(target=runner.run_forever, args=(signal_, stop), daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while runner.database_errors == 0 and thread.is_alive() and time.monotonic() < deadline:
            stop.wait(0.01)
        assert runner.database_errors >= 1 and thread.is_alive()
        blocker.execute("COMMIT")  # the lock is released: the job must now run
        while queue.get(job.id).status != JobStatus.SUCCEEDED and time.monotonic() < deadline:
            stop.wait(0.01)
        assert queue.get(job.id).status == JobStatus.SUCCEEDED
    finally:
        stop.set()
        thread.join(timeout=30)
        signal_.close()
        blocker.close()
    assert runner.database_errors >= 1
