"""Durable job queue shared by the bot (enqueue, cancel, position) and runners (claim...).

One API over SQLite and PostgreSQL. A runner claims a job atomically and holds a lease
it renews with heartbeats; a job whose lease expired is queued again (or failed for
good once its attempts are spent). Within a priority, requesters are served
round-robin through a virtual-time `fair_seq` assigned at enqueue.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import Job, JobEvent, JobStatus, utcnow
from storage.queue_sql import queue_sql

NOTIFY_CHANNEL = "atelier_jobs"


class LeaseLost(RuntimeError):
    """The worker no longer holds this job (its lease expired and another took it, or it ended)."""


class JobNotFound(LookupError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 2.0
    factor: float = 2.0
    max_seconds: float = 600.0

    def delay(self, attempt: int) -> float:
        """Delay before the next try after `attempt` failed tries (1-based)."""
        return min(self.max_seconds, self.base_seconds * self.factor ** max(0, attempt - 1))


@dataclass(frozen=True)
class JobView:
    """A snapshot of a job, safe to pass around after its session closed."""

    id: int
    kind: str
    payload: dict[str, Any]
    priority: int
    requester: str
    team_id: int | None
    base_model: str | None
    min_memory_mb: int | None
    batch_key: str | None
    status: JobStatus
    attempts: int
    max_attempts: int
    cancel_requested: bool
    error: str | None
    result: dict[str, Any] | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    run_after: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job | Row[Any]) -> JobView:
        return cls(
            id=job.id,
            kind=job.kind,
            payload=dict(job.payload or {}),
            priority=job.priority,
            requester=job.requester,
            team_id=job.team_id,
            base_model=job.base_model,
            min_memory_mb=job.min_memory_mb,
            batch_key=job.batch_key,
            status=JobStatus(job.status),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            error=job.error,
            result=job.result,
            lease_owner=job.lease_owner,
            lease_expires_at=job.lease_expires_at,
            run_after=job.run_after,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


@dataclass(frozen=True)
class ProgressEvent:
    id: int
    job_id: int
    step: int | None
    total: int | None
    message: str
    data: dict[str, Any]
    created_at: datetime


class JobQueue:
    def __init__(
        self,
        db: Database,
        *,
        lease_seconds: float = 30.0,
        retry: RetryPolicy | None = None,
        recover_every_s: float = 1.0,
    ) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.retry = retry or RetryPolicy()
        self._recover_every_s = recover_every_s
        self._last_recover = 0.0
        self.sql = queue_sql(db.engine.dialect.name)

    # --- producer side ----------------------------------------------------

    def enqueue(
        self,
        kind: str,
        payload: dict[str, Any] | None = None,
        *,
        requester: str,
        priority: int = 0,
        idempotency_key: str | None = None,
        team_id: int | None = None,
        base_model: str | None = None,
        min_memory_mb: int | None = None,
        batch_key: str | None = None,
        max_attempts: int = 3,
        run_after: datetime | None = None,
        session: Session | None = None,
    ) -> JobView:
        """Add a job. The same idempotency key returns the job it first made.

        Pass `session` to enqueue inside the caller's transaction (all or nothing).
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        now = utcnow()
        params = {
            "kind": kind,
            "payload": payload or {},
            "priority": priority,
            "requester": requester,
            "team_id": team_id,
            "base_model": base_model,
            "min_memory_mb": min_memory_mb,
            "idempotency_key": idempotency_key,
            "batch_key": batch_key,
            "max_attempts": max_attempts,
            "run_after": run_after or now,
            "now": now,
        }
        try:
            with self._connection(session) as conn:
                if idempotency_key is not None:
                    existing = self._by_key(conn, idempotency_key)
                    if existing is not None:
                        return existing
                row = conn.execute(self.sql.insert, params).one()
                if not self.db.is_sqlite:
                    conn.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
                return JobView.of(row)
        except IntegrityError:
            # Two producers raced on one key (PostgreSQL); the other one won.
            if idempotency_key is None or session is not None:
                raise
            with self.db.transaction() as conn:
                found = self._by_key(conn, idempotency_key)
            if found is None:
                raise
            return found

    @staticmethod
    def _by_key(conn: Connection, key: str) -> JobView | None:
        row = conn.execute(select(Job.__table__).where(Job.idempotency_key == key)).first()
        return None if row is None else JobView.of(row)

    def cancel(self, job_id: int) -> JobView:
        """A queued job never runs; a running one sees the flag at its next heartbeat."""
        with self.db.session(write=True) as s:
            job = self._get_job(s, job_id)
            if job.status == JobStatus.QUEUED:
                job.status = JobStatus.CANCELED
                job.finished_at = utcnow()
            elif job.status == JobStatus.RUNNING:
                job.cancel_requested = True
            return JobView.of(job)

    # --- runner side ------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        *,
        kinds: Collection[str] | None = None,
        base_models: Collection[str] | None = None,
        memory_mb: int | None = None,
        lease_seconds: float | None = None,
    ) -> JobView | None:
        """Take the next job this worker can run, or None.

        `base_models` limits jobs that name a base model to those this runner can load;
        `memory_mb` skips jobs that need more device memory than the runner has.
        """
        self._maybe_recover()
        now = utcnow()
        params: dict[str, Any] = {
            "worker": worker_id,
            "now": now,
            "expires": now + timedelta(seconds=lease_seconds or self.lease_seconds),
        }
        if kinds is not None:
            params["kinds"] = list(kinds)
        if base_models is not None:
            params["models"] = list(base_models)
        if memory_mb is not None:
            params["memory_mb"] = memory_mb
        statement = self.sql.claim(
            by_kind=kinds is not None,
            by_model=base_models is not None,
            by_memory=memory_mb is not None,
        )
        with self.db.transaction(write=True) as conn:
            row = conn.execute(statement, params).first()
        return None if row is None else JobView.of(row)

    def claim_batch(
        self,
        worker_id: str,
        batch_key: str,
        *,
        limit: int,
        memory_mb: int | None = None,
        lease_seconds: float | None = None,
    ) -> list[JobView]:
        """Also take up to `limit` more queued jobs that can share one pipeline call."""
        if limit < 1:
            return []
        now = utcnow()
        params = {
            "worker": worker_id,
            "now": now,
            "expires": now + timedelta(seconds=lease_seconds or self.lease_seconds),
            "batch_key": batch_key,
            "limit": limit,
            "memory_mb": memory_mb if memory_mb is not None else 2**31 - 1,
        }
        with self.db.transaction(write=True) as conn:
            rows = conn.execute(self.sql.claim_batch, params).all()
        return sorted((JobView.of(row) for row in rows), key=lambda j: j.id)

    def heartbeat(self, job_id: int, worker_id: str, *, lease_seconds: float | None = None) -> bool:
        """Renew the lease. Returns True when cancel was requested; raises LeaseLost."""
        expires = utcnow() + timedelta(seconds=lease_seconds or self.lease_seconds)
        with self.db.transaction(write=True) as conn:
            row = conn.execute(
                self.sql.heartbeat, {"id": job_id, "worker": worker_id, "expires": expires}
            ).first()
        if row is None:
            raise LeaseLost(f"job {job_id} is no longer held by {worker_id}")
        return bool(row.cancel_requested)

    def complete(
        self, job_id: int, worker_id: str, result: dict[str, Any] | None = None
    ) -> JobView:
        return self._finish(job_id, worker_id, JobStatus.SUCCEEDED, result)

    def acknowledge_cancel(self, job_id: int, worker_id: str) -> JobView:
        """The runner stopped the job because cancel was requested."""
        return self._finish(job_id, worker_id, JobStatus.CANCELED, None)

    def release(self, job_id: int, worker_id: str) -> JobView:
        """Hand a running job back to the queue now (its runner is shutting down), instead of
        leaving it until the lease expires. Any runner may claim it at once; the attempt it
        used is given back. Raises LeaseLost if this worker no longer holds it."""
        with self.db.transaction(write=True) as conn:
            row = conn.execute(
                self.sql.release, {"id": job_id, "worker": worker_id, "now": utcnow()}
            ).first()
            if row is not None and not self.db.is_sqlite:
                conn.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))  # wake idle runners elsewhere
        if row is None:
            raise LeaseLost(f"job {job_id} is no longer held by {worker_id}")
        return JobView.of(row)

    def _finish(
        self, job_id: int, worker_id: str, status: JobStatus, result: dict[str, Any] | None
    ) -> JobView:
        params = {
            "id": job_id,
            "worker": worker_id,
            "status": str(status),
            "result": result,
            "now": utcnow(),
        }
        with self.db.transaction(write=True) as conn:
            row = conn.execute(self.sql.finish, params).first()
        if row is None:
            raise LeaseLost(f"job {job_id} is no longer held by {worker_id}")
        return JobView.of(row)

    def fail(self, job_id: int, worker_id: str, error: str, *, retryable: bool = True) -> JobView:
        """Record a failure: queued again after a backoff while attempts remain, else failed."""
        with self.db.session(write=True) as s:
            job = s.scalar(select(Job).where(self._held_by(job_id, worker_id)))
            if job is None:
                raise LeaseLost(f"job {job_id} is no longer held by {worker_id}")
            job.error = error
            job.lease_owner = None
            job.lease_expires_at = None
            if job.cancel_requested:
                job.status = JobStatus.CANCELED
                job.finished_at = utcnow()
            elif retryable and job.attempts < job.max_attempts:
                job.status = JobStatus.QUEUED
                job.run_after = utcnow() + timedelta(seconds=self.retry.delay(job.attempts))
            else:
                job.status = JobStatus.FAILED
                job.finished_at = utcnow()
            return JobView.of(job)

    @staticmethod
    def _held_by(job_id: int, worker_id: str) -> Any:
        return and_(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == worker_id)

    def recover_expired(self) -> int:
        """Return jobs whose runner stopped heartbeating to the queue. Returns how many."""
        now = utcnow()
        expired = and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        cleared = {"lease_owner": None, "lease_expires_at": None}
        with self.db.session(write=True) as s:
            canceled = s.execute(
                update(Job)
                .where(expired, Job.cancel_requested.is_(True))
                .values(status=JobStatus.CANCELED, finished_at=now, **cleared)
            ).rowcount
            exhausted = s.execute(
                update(Job)
                .where(expired, Job.attempts >= Job.max_attempts)
                .values(
                    status=JobStatus.FAILED,
                    finished_at=now,
                    error="The runner working on this job stopped responding on every try.",
                    **cleared,
                )
            ).rowcount
            requeued = s.execute(
                update(Job)
                .where(expired)
                .values(
                    status=JobStatus.QUEUED,
                    run_after=now,
                    error="The runner working on this job stopped responding; retrying.",
                    **cleared,
                )
            ).rowcount
        return int(canceled or 0) + int(exhausted or 0) + int(requeued or 0)

    def _maybe_recover(self) -> None:
        if time.monotonic() - self._last_recover >= self._recover_every_s:
            self._last_recover = time.monotonic()
            self.recover_expired()

    # --- progress and reading ---------------------------------------------

    def add_progress(
        self,
        job_id: int,
        *,
        step: int | None = None,
        total: int | None = None,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> ProgressEvent:
        with self.db.session(write=True) as s:
            event = JobEvent(
                job_id=job_id, step=step, total=total, message=message, data=data or {}
            )
            s.add(event)
            s.flush()
            return _progress_view(event)

    def progress(self, job_id: int, *, after_id: int = 0) -> list[ProgressEvent]:
        with self.db.session() as s:
            events = s.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
                .order_by(JobEvent.id)
            )
            return [_progress_view(e) for e in events]

    def get(self, job_id: int) -> JobView:
        with self.db.session() as s:
            return JobView.of(self._get_job(s, job_id))

    def position(self, job_id: int) -> int | None:
        """1-based place in line among queued jobs, or None when the job is not queued."""
        with self.db.session() as s:
            job = self._get_job(s, job_id)
            if job.status != JobStatus.QUEUED:
                return None
            ahead = s.scalar(
                select(func.count(Job.id)).where(
                    Job.status == JobStatus.QUEUED,
                    or_(
                        Job.priority > job.priority,
                        and_(
                            Job.priority == job.priority,
                            or_(
                                Job.fair_seq < job.fair_seq,
                                and_(Job.fair_seq == job.fair_seq, Job.id < job.id),
                            ),
                        ),
                    ),
                )
            )
            return int(ahead or 0) + 1

    def list_jobs(
        self,
        *,
        requester: str | None = None,
        team_id: int | None = None,
        statuses: Collection[JobStatus] | None = None,
        limit: int = 50,
    ) -> list[JobView]:
        query = select(Job).order_by(Job.priority.desc(), Job.fair_seq, Job.id).limit(limit)
        if requester is not None:
            query = query.where(Job.requester == requester)
        if team_id is not None:
            query = query.where(Job.team_id == team_id)
        if statuses is not None:
            query = query.where(Job.status.in_([str(s) for s in statuses]))
        with self.db.session() as s:
            return [JobView.of(job) for job in s.scalars(query)]

    @contextmanager
    def _connection(self, session: Session | None) -> Iterator[Connection]:
        if session is not None:
            yield session.connection()
        else:
            with self.db.transaction(write=True) as conn:
                yield conn

    @staticmethod
    def _get_job(s: Session, job_id: int) -> Job:
        job = s.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"There is no job {job_id}.")
        return job


def _progress_view(event: JobEvent) -> ProgressEvent:
    return ProgressEvent(
        id=event.id,
        job_id=event.job_id,
        step=event.step,
        total=event.total,
        message=event.message,
        data=dict(event.data or {}),
        created_at=event.created_at,
    )
