"""Handing a running job back to the queue (a runner shutting down), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from storage.db import Database
from storage.models import JobStatus
from storage.queue import JobQueue, LeaseLost


@pytest.fixture
def queue(db: Database) -> JobQueue:
    return JobQueue(db, lease_seconds=3600)  # a lease nobody waits out in a test


def test_released_job_is_claimable_at_once_in_its_place(queue: JobQueue) -> None:
    first = queue.enqueue("train", requester="ana")
    later = queue.enqueue("train", requester="ana")
    held = queue.claim("stopping-runner")
    assert held is not None and held.id == first.id and held.attempts == 1

    released = queue.release(first.id, "stopping-runner")
    assert released.status == JobStatus.QUEUED
    assert released.lease_owner is None and released.lease_expires_at is None
    assert released.attempts == 0  # a stop is not a failed try
    assert queue.position(first.id) == 1  # still ahead of the job queued after it

    # Another runner takes it now, not when the hour-long lease would have run out.
    again = queue.claim("next-runner")
    assert again is not None and again.id == first.id and again.lease_owner == "next-runner"
    assert queue.get(later.id).status == JobStatus.QUEUED


def test_release_needs_the_lease_and_keeps_a_cancel(queue: JobQueue) -> None:
    job = queue.enqueue("train", requester="ana")
    queue.claim("r1")
    with pytest.raises(LeaseLost):
        queue.release(job.id, "someone-else")
    queue.cancel(job.id)  # asked while it was stopping
    assert queue.release(job.id, "r1").status == JobStatus.CANCELED
    with pytest.raises(LeaseLost):
        queue.release(job.id, "r1")
