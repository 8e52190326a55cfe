"""The durable job queue, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from storage.db import Database
from storage.models import Job, JobStatus, utcnow
from storage.queue import JobNotFound, JobQueue, LeaseLost, RetryPolicy
from storage.work_signal import open_work_signal

WORKER = Path(__file__).parent / "helpers" / "queue_worker.py"


@pytest.fixture
def queue(db: Database) -> JobQueue:
    return JobQueue(db, lease_seconds=30, retry=RetryPolicy(base_seconds=10, factor=2))


def _expire_lease(db: Database, job_id: int) -> None:
    """Move a lease into the past, as if its runner stopped heartbeating long ago."""
    with db.session(write=True) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def _make_due(db: Database, job_id: int) -> None:
    with db.session(write=True) as s:
        s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow()))


def test_enqueue_claim_complete(queue: JobQueue) -> None:
    job = queue.enqueue("generate", {"prompt": "a cat"}, requester="u1", team_id=None)
    assert job.status == JobStatus.QUEUED
    claimed = queue.claim("w1")
    assert claimed is not None and claimed.id == job.id
    assert claimed.status == JobStatus.RUNNING and claimed.attempts == 1
    assert claimed.lease_owner == "w1" and claimed.payload == {"prompt": "a cat"}
    assert queue.claim("w2") is None
    done = queue.complete(job.id, "w1", {"images": 4})
    assert done.status == JobStatus.SUCCEEDED and done.result == {"images": 4}
    assert done.finished_at is not None


def test_idempotency_key_returns_the_same_job(queue: JobQueue) -> None:
    first = queue.enqueue("train", {"a": 1}, requester="u1", idempotency_key="slack:Ev123")
    again = queue.enqueue("train", {"a": 2}, requester="u1", idempotency_key="slack:Ev123")
    other = queue.enqueue("train", {"a": 3}, requester="u1", idempotency_key="slack:Ev124")
    assert again.id == first.id and again.payload == {"a": 1}
    assert other.id != first.id
    assert len(queue.list_jobs()) == 2


def test_priority_before_fifo(queue: JobQueue) -> None:
    low = queue.enqueue("train", requester="u1", priority=0)
    high = queue.enqueue("generate", requester="u1", priority=10)
    assert queue.claim("w").id == high.id
    assert queue.claim("w").id == low.id


def test_round_robin_between_requesters(queue: JobQueue) -> None:
    hog = [queue.enqueue("generate", requester="hog").id for _ in range(20)]
    first_two = [queue.claim("w").id for _ in range(2)]
    assert first_two == hog[:2]
    # Two people arrive while the hog still has 18 waiting: they are not served last.
    alice = queue.enqueue("generate", requester="alice").id
    bob = queue.enqueue("generate", requester="bob").id
    order = [queue.claim("w").id for _ in range(6)]
    assert alice in order[:3] and bob in order[:4]
    assert order.count(alice) == 1 and order.count(bob) == 1


def test_round_robin_interleaves_queued_batches(queue: JobQueue) -> None:
    ids = {name: [queue.enqueue("g", requester=name).id for _ in range(3)] for name in "abc"}
    owner = {job_id: name for name, job_ids in ids.items() for job_id in job_ids}
    served = [owner[queue.claim("w").id] for _ in range(9)]
    assert served == ["a", "b", "c"] * 3


def test_queue_position(queue: JobQueue) -> None:
    a1 = queue.enqueue("g", requester="a")
    a2 = queue.enqueue("g", requester="a")
    b1 = queue.enqueue("g", requester="b")
    urgent = queue.enqueue("g", requester="c", priority=5)
    assert queue.position(urgent.id) == 1
    assert queue.position(a1.id) == 2
    assert queue.position(b1.id) == 3  # b's first job goes before a's second
    assert queue.position(a2.id) == 4
    queue.claim("w")
    assert queue.position(urgent.id) is None
    assert queue.position(a1.id) == 1


def test_cancel_queued_job_never_runs(queue: JobQueue) -> None:
    job = queue.enqueue("train", requester="u")
    assert queue.cancel(job.id).status == JobStatus.CANCELED
    assert queue.claim("w") is None
    assert queue.position(job.id) is None


def test_cancel_running_job_is_seen_at_heartbeat(queue: JobQueue) -> None:
    job = queue.enqueue("train", requester="u")
    queue.claim("w")
    assert queue.heartbeat(job.id, "w") is False
    assert queue.cancel(job.id).status == JobStatus.RUNNING
    assert queue.heartbeat(job.id, "w") is True
    assert queue.acknowledge_cancel(job.id, "w").status == JobStatus.CANCELED


def test_cancel_unknown_job(queue: JobQueue) -> None:
    with pytest.raises(JobNotFound):
        queue.cancel(999)


def test_retry_with_exponential_backoff_then_failed(db: Database, queue: JobQueue) -> None:
    job = queue.enqueue("generate", requester="u", max_attempts=3)
    delays = []
    for attempt in (1, 2):
        claimed = queue.claim("w")
        assert claimed is not None and claimed.attempts == attempt
        before = utcnow()
        failed = queue.fail(job.id, "w", f"boom {attempt}")
        assert failed.status == JobStatus.QUEUED and failed.error == f"boom {attempt}"
        delays.append((failed.run_after - before).total_seconds())
        assert queue.claim("w") is None  # waiting out its backoff
        _make_due(db, job.id)
    assert 9 <= delays[0] <= 11 and 19 <= delays[1] <= 21
    queue.claim("w")
    final = queue.fail(job.id, "w", "boom 3")
    assert final.status == JobStatus.FAILED and final.attempts == 3
    assert queue.claim("w") is None


def test_non_retryable_failure_is_final(queue: JobQueue) -> None:
    job = queue.enqueue("generate", requester="u", max_attempts=5)
    queue.claim("w")
    assert queue.fail(job.id, "w", "bad prompt", retryable=False).status == JobStatus.FAILED


def test_expired_lease_is_claimable_again_and_counts_attempts(
    db: Database, queue: JobQueue
) -> None:
    job = queue.enqueue("train", requester="u")
    queue.claim("dead-runner")
    _expire_lease(db, job.id)
    assert queue.recover_expired() == 1
    again = queue.claim("w2")
    assert again is not None and again.id == job.id and again.attempts == 2
    # The dead runner's late calls are refused: it no longer holds the job.
    with pytest.raises(LeaseLost):
        queue.heartbeat(job.id, "dead-runner")
    with pytest.raises(LeaseLost):
        queue.complete(job.id, "dead-runner")
    assert queue.complete(job.id, "w2").status == JobStatus.SUCCEEDED


def test_expired_lease_after_last_attempt_fails_for_good(db: Database, queue: JobQueue) -> None:
    job = queue.enqueue("train", requester="u", max_attempts=1)
    queue.claim("w")
    _expire_lease(db, job.id)
    queue.recover_expired()
    final = queue.get(job.id)
    assert final.status == JobStatus.FAILED and "stopped responding" in (final.error or "")


def test_claim_filters_by_kind_and_base_model(queue: JobQueue) -> None:
    sdxl = queue.enqueue("generate", requester="u", base_model="sdxl-base")
    sd15 = queue.enqueue("generate", requester="u", base_model="sd15")
    caption = queue.enqueue("caption", requester="u")
    got = queue.claim("w", kinds={"generate"}, base_models={"sd15"})
    assert got is not None and got.id == sd15.id
    assert queue.claim("w", kinds={"generate"}, base_models={"sd15"}) is None
    assert queue.claim("w", kinds={"caption"}).id == caption.id
    assert queue.claim("w").id == sdxl.id


def test_progress_events(queue: JobQueue) -> None:
    job = queue.enqueue("train", requester="u")
    queue.claim("w")
    first = queue.add_progress(job.id, step=10, total=100, message="loss 0.2")
    queue.add_progress(job.id, step=20, total=100, message="loss 0.1", data={"loss": 0.1})
    events = queue.progress(job.id)
    assert [(e.step, e.total, e.message) for e in events] == [
        (10, 100, "loss 0.2"),
        (20, 100, "loss 0.1"),
    ]
    assert [e.step for e in queue.progress(job.id, after_id=first.id)] == [20]


def test_work_signal_wakes_on_enqueue(queue: JobQueue, db: Database) -> None:
    signal_ = open_work_signal(db)
    try:
        assert signal_.wait(0.01) is False
        queue.enqueue("generate", requester="u")
        assert signal_.wait(5.0) is True
    finally:
        signal_.close()


def _spawn(mode: str, url: str, worker: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, url, worker, *extra],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


def test_four_processes_complete_each_job_exactly_once(db_url: str, db: Database) -> None:
    queue = JobQueue(db)
    ids = {queue.enqueue("generate", {"n": n}, requester=f"u{n % 7}").id for n in range(1000)}
    workers = [_spawn("drain", db_url, f"w{n}") for n in range(4)]
    completed: list[int] = []
    for proc in workers:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0
        completed += [int(line) for line in out.split()]
    assert sorted(completed) == sorted(ids)  # none lost, none twice
    jobs = queue.list_jobs(limit=2000)
    assert all(j.status == JobStatus.SUCCEEDED and j.attempts == 1 for j in jobs)
    assert len({j.result["by"] for j in jobs}) >= 2  # the work really was shared


def test_sigkilled_claimer_loses_its_lease_and_job_completes_elsewhere(
    db_url: str, db: Database
) -> None:
    queue = JobQueue(db, lease_seconds=0.5, recover_every_s=0)
    job = queue.enqueue("train", requester="u")
    holder = _spawn("hold", db_url, "doomed", "0.5")
    assert holder.stdout is not None
    assert int(holder.stdout.readline()) == job.id
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    # No one heartbeats the job any more: once its lease runs out it is claimable.
    deadline = time.monotonic() + 30
    claimed = None
    wake = open_work_signal(db)
    try:
        while claimed is None and time.monotonic() < deadline:
            claimed = queue.claim("survivor")
            if claimed is None:
                wake.wait(0.1)
    finally:
        wake.close()
    assert claimed is not None and claimed.id == job.id and claimed.attempts == 2
    assert queue.complete(job.id, "survivor").status == JobStatus.SUCCEEDED


def test_claim_batch_takes_compatible_jobs_only(queue: JobQueue) -> None:
    first = queue.enqueue("generate", requester="a", batch_key="tiny|512x512|25")
    same = [queue.enqueue("generate", requester=r, batch_key="tiny|512x512|25").id for r in "bc"]
    queue.enqueue("generate", requester="d", batch_key="tiny|768x768|25")
    claimed = queue.claim("w")
    assert claimed is not None and claimed.id == first.id
    extra = queue.claim_batch("w", claimed.batch_key or "", limit=3)
    assert [j.id for j in extra] == same
    assert all(j.status == JobStatus.RUNNING and j.lease_owner == "w" for j in extra)
    assert queue.claim_batch("w", "tiny|512x512|25", limit=3) == []


def test_claim_skips_jobs_needing_more_memory_than_the_runner_has(queue: JobQueue) -> None:
    big = queue.enqueue("train", requester="u", base_model="sdxl", min_memory_mb=16_000)
    small = queue.enqueue("train", requester="u", base_model="sd15", min_memory_mb=8_000)
    anything = queue.enqueue("caption", requester="u")
    assert queue.claim("12gb", memory_mb=12_000).id == small.id
    assert queue.claim("12gb", memory_mb=12_000).id == anything.id
    assert queue.claim("12gb", memory_mb=12_000) is None
    assert queue.claim("24gb", memory_mb=24_000).id == big.id


def test_memory_needs_by_family() -> None:
    from storage.families import memory_needed_mb
    from storage.job_payloads import JobKind

    configured = {"sd15": "/m/sd15", "big": {"source": "/m/x.safetensors", "family": "sdxl"}}
    assert memory_needed_mb(JobKind.TRAIN, "tiny-sd15", configured) is None
    sd15 = memory_needed_mb(JobKind.TRAIN, "sd15", configured)
    sdxl = memory_needed_mb(JobKind.TRAIN, "big", configured)
    assert sd15 is not None and sdxl is not None and sd15 < sdxl
    assert memory_needed_mb(JobKind.GENERATE, "juggernaut-xl", {}) == memory_needed_mb(
        JobKind.GENERATE, "big", configured
    )


def test_claim_batch_respects_memory(queue: JobQueue) -> None:
    first = queue.enqueue("generate", requester="a", batch_key="k")
    heavy = queue.enqueue("generate", requester="b", batch_key="k", min_memory_mb=99_999)
    assert queue.claim("w", memory_mb=8_000).id == first.id
    assert queue.claim_batch("w", "k", limit=3, memory_mb=8_000) == []
    assert [j.id for j in queue.claim_batch("w2", "k", limit=3)] == [heavy.id]
