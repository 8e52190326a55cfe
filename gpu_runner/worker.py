"""The runner loop: claim a job, keep its lease alive, run its handler, report the outcome.

Handlers are plain callables `(JobContext) -> result dict`. Anything they raise ends that
job (retried or failed, with a message to the requester) and never the runner.

Stopping the runner (SIGTERM from `docker stop` or systemd, or Ctrl-C) sets `stopping`:
handlers see it between steps like a cancel, a training writes a checkpoint there, and the
job goes straight back to the queue for any runner, with no lease to wait out.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from gpu_runner import failpoints
from storage.job_payloads import ReplyTarget, progress_key, result_key
from storage.outbox import Attachment, Outbox
from storage.queue import JobQueue, JobView, LeaseLost
from storage.work_signal import WorkSignal

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A failure the requester can act on; the message says what to do. Not retried."""


class JobStopped(Exception):
    """Raised inside a handler when it noticed cancel, a lost lease or the runner stopping
    between steps."""


@dataclass
class JobContext:
    """What a handler gets: its job, a way to report progress, and the stop flag."""

    job: JobView
    queue: JobQueue
    outbox: Outbox
    worker_id: str
    # Jobs the handler claimed on top of `job` to share its pipeline call (generation
    # batches); the heartbeat keeps them leased and the handler settles each itself.
    extra_jobs: list[JobView] = field(default_factory=list)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    # The runner is shutting down: stop at the next step, the job goes back to the queue.
    runner_stopping: threading.Event = field(default_factory=threading.Event)
    # Runs another claimed job to completion inside this one (a generation served while a
    # training pauses between steps).
    run_nested: Callable[[JobView], None] | None = None
    progress_every_s: float = 2.0
    _last_progress_post: float = 0.0

    def should_stop(self) -> bool:
        return (
            self.cancel_requested.is_set()
            or self.lease_lost.is_set()
            or self.runner_stopping.is_set()
        )

    def check_stop(self) -> None:
        if self.should_stop():
            raise JobStopped(self.stop_reason)

    @property
    def stop_reason(self) -> str:
        if self.cancel_requested.is_set():
            return "canceled"
        return "lease lost" if self.lease_lost.is_set() else "runner stopping"

    def progress(
        self,
        step: int | None,
        total: int | None,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        attachments: tuple[Attachment, ...] = (),
        force: bool = False,
    ) -> None:
        """Record progress; edit the job's one progress message, at most every few seconds."""
        self.queue.add_progress(self.job.id, step=step, total=total, message=message, data=data)
        now = time.monotonic()
        if not force and now - self._last_progress_post < self.progress_every_s:
            return
        self._last_progress_post = now
        self.post(progress_key(self.job.id), message, attachments=attachments)

    def post(
        self,
        key: str,
        text: str,
        *,
        attachments: tuple[Attachment, ...] = (),
        session: Session | None = None,
        **extra: Any,
    ) -> None:
        """Queue a chat message to this job's requester (a later `post` with the key edits it).

        Pass `session` to write it in the same transaction as the outputs it reports.
        """
        self.post_for(self.job, key, text, attachments=attachments, session=session, **extra)

    def post_for(
        self,
        job: JobView,
        key: str,
        text: str,
        *,
        attachments: tuple[Attachment, ...] = (),
        session: Session | None = None,
        **extra: Any,
    ) -> None:
        raw = job.payload.get("reply")
        if not raw:
            return
        reply = ReplyTarget.model_validate(raw)
        self.outbox.put(
            key,
            platform=reply.platform,
            channel=reply.channel,
            thread=reply.thread,
            team_id=reply.team_id,
            text=text,
            attachments=attachments,
            extra=extra or None,
            session=session,
        )


Handler = Callable[[JobContext], dict[str, Any]]


class Runner:
    def __init__(
        self,
        *,
        queue: JobQueue,
        outbox: Outbox,
        handlers: Mapping[str, Handler],
        worker_id: str,
        base_models: list[str] | None = None,
        memory_mb: int | Callable[[], int | None] | None = None,
        heartbeat_every_s: float | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.queue = queue
        self.outbox = outbox
        self.handlers = dict(handlers)
        self.worker_id = worker_id
        self.base_models = base_models
        # A number, or a function read at each claim (free GPU memory changes over time).
        self.memory_mb = memory_mb
        self.database_errors = 0
        self.heartbeat_every_s = heartbeat_every_s or max(0.05, queue.lease_seconds / 3)
        # Set by a signal handler: the running job stops at its next step and is released.
        self.stopping = stopping or threading.Event()

    def stop(self) -> None:
        """Stop soon: the current job at its next step (back to the queue), then the loop."""
        self.stopping.set()

    def run_forever(
        self, signal: WorkSignal, stop: threading.Event, *, max_backoff_s: float = 30.0
    ) -> None:
        log.info("runner %s serving %s", self.worker_id, ", ".join(sorted(self.handlers)))
        backoff = 0.0
        while not stop.is_set():
            try:
                worked = self.run_once()
            except DBAPIError as exc:  # locked past the busy timeout, or unreachable
                self.database_errors += 1
                backoff = min(max_backoff_s, max(0.05, backoff * 2))
                log.warning("database unavailable (%s); retrying in %.1f s", exc.orig, backoff)
                stop.wait(backoff)
                continue
            backoff = 0.0
            if not worked:
                signal.wait(1.0)

    def run_once(self) -> bool:
        """Claim and run one job. Returns False when there was nothing to do."""
        if self.stopping.is_set():
            return False
        job = self.claim()
        if job is None:
            return False
        self.run_job(job)
        return True

    def claim(self) -> JobView | None:
        """The next job this runner can take, given the memory it has free right now."""
        memory = self.memory_mb() if callable(self.memory_mb) else self.memory_mb
        return self.queue.claim(
            self.worker_id,
            kinds=list(self.handlers),
            base_models=self.base_models,
            memory_mb=memory,
        )

    def run_job(self, job: JobView) -> None:
        failpoints.hit("after_claim")
        if self.stopping.is_set():  # claimed on the way out (a training serving a generation)
            self._settle(lambda: self.queue.release(job.id, self.worker_id))
            return
        ctx = JobContext(
            job=job,
            queue=self.queue,
            outbox=self.outbox,
            worker_id=self.worker_id,
            runner_stopping=self.stopping,
            run_nested=self.run_job,
        )
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, done), daemon=True)
        beat.start()
        try:
            self._run_and_settle(ctx)
        except Exception:  # even reporting failed (database gone): the lease will expire
            log.exception("could not record the outcome of job %s", job.id)
        finally:
            done.set()
            beat.join()

    def _run_and_settle(self, ctx: JobContext) -> None:
        job = ctx.job
        try:
            result = self.handlers[job.kind](ctx)
        except JobStopped:
            self._stopped(ctx)
        except JobFailed as exc:
            self._failed(ctx, str(exc), retryable=False)
        except Exception as exc:  # a crashing job must not take the runner down
            log.error("job %s (%s) raised:\n%s", job.id, job.kind, traceback.format_exc())
            self._failed(ctx, _describe(exc), retryable=True)
        else:
            self._settle(lambda: self.queue.complete(job.id, self.worker_id, result))

    def _heartbeat(self, ctx: JobContext, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_every_s):
            try:
                if self.queue.heartbeat(ctx.job.id, self.worker_id):
                    ctx.cancel_requested.set()
            except LeaseLost:
                ctx.lease_lost.set()
                return
            except Exception:  # database briefly unreachable: try again next beat
                log.warning("heartbeat for job %s failed", ctx.job.id, exc_info=True)
            for extra in list(ctx.extra_jobs):
                try:
                    self.queue.heartbeat(extra.id, self.worker_id)
                except Exception:  # its outcome is recorded (or refused) by the handler
                    log.debug("heartbeat for batched job %s failed", extra.id, exc_info=True)

    def _stopped(self, ctx: JobContext) -> None:
        if ctx.lease_lost.is_set():
            log.warning("job %s was taken over by another runner; dropped it", ctx.job.id)
            return
        self._release_extras(ctx)
        if not ctx.cancel_requested.is_set():  # the runner is stopping: any runner may resume
            log.info("runner stopping: job %s goes back to the queue", ctx.job.id)
            if ctx.job.kind == "train":  # its progress message would otherwise look stuck
                ctx.post(
                    progress_key(ctx.job.id),
                    f"Training job {ctx.job.id} is back in the queue: its runner is shutting "
                    "down. It resumes from its last checkpoint on the next free runner.",
                )
            self._settle(lambda: self.queue.release(ctx.job.id, self.worker_id))
            return
        # Message first: a crash before the state change re-runs the job, and the same key
        # then edits the message rather than losing it.
        ctx.post(progress_key(ctx.job.id), f"Job {ctx.job.id} was canceled.")
        self._settle(lambda: self.queue.acknowledge_cancel(ctx.job.id, self.worker_id))

    def _release_extras(self, ctx: JobContext) -> None:
        """Jobs claimed to share this one's pipeline call that it never settled: back to
        the queue now rather than after their leases run out."""
        for extra in list(ctx.extra_jobs):
            with contextlib.suppress(LeaseLost):  # another runner has it: nothing to hand back
                self.queue.release(extra.id, self.worker_id)
            ctx.extra_jobs.remove(extra)

    def _failed(self, ctx: JobContext, message: str, *, retryable: bool) -> None:
        job = ctx.job
        if ctx.lease_lost.is_set():
            log.warning("job %s failed after another runner took it over: %s", job.id, message)
            return
        final = not retryable or job.attempts >= job.max_attempts
        if final and not ctx.cancel_requested.is_set():  # message first, as in _stopped
            said = message
            if retryable:
                said += f" (after {job.attempts} tries; the runner's log has details)"
            ctx.post(result_key(job.id), f"Job {job.id} ({job.kind}) failed: {said}")
        self._settle(lambda: self.queue.fail(job.id, self.worker_id, message, retryable=retryable))

    def _settle(self, action: Callable[[], JobView]) -> JobView | None:
        try:
            return action()
        except LeaseLost:
            log.warning("lost the lease before recording the outcome; another runner has it")
            return None


def _describe(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
