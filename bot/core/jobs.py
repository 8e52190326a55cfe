"""`/jobs` (mine and the team's queue, with places in line) and `/cancel`."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select, update

from bot.commands import Reply
from bot.core import audit
from bot.core.arguments import CancelArgs
from bot.core.context import Context
from bot.core.errors import AuditNote, Refused, UserError
from bot.core.training import ordinal
from storage.job_payloads import JobKind
from storage.models import Job, JobStatus, RunStatus, Style, TrainingRun, utcnow
from storage.queue import JobView

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
FINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


def jobs(ctx: Context, _args: object) -> list[Reply]:
    queue = ctx.services.queue
    with ctx.write() as tx:
        team_id = tx.team.id
    me = ctx.actor.user_id
    active = queue.list_jobs(team_id=team_id, statuses=ACTIVE, limit=30)
    finished = queue.list_jobs(team_id=team_id, requester=me, statuses=FINAL, limit=200)
    recent = sorted(finished, key=lambda j: j.finished_at or j.created_at, reverse=True)[:3]
    labels = _labels(ctx, [*active, *recent])
    places = _places_in_line(ctx)
    mine = [j for j in active if j.requester == me]
    lines = ["**Your jobs**"]
    lines += [_line(j, labels, places) for j in [*mine, *recent]] or ["none"]
    lines.append("**Team queue**")
    lines += [_line(j, labels, places, who=True) for j in active] or ["empty"]
    return [Reply("\n".join(lines), private=True)]


def _places_in_line(ctx: Context, limit: int = 10_000) -> dict[int, int]:
    """Every queued job's 1-based place, in the queue's own order (JobQueue.position's)."""
    with ctx.services.db.session() as s:
        ids = s.scalars(
            select(Job.id)
            .where(Job.status == JobStatus.QUEUED)
            .order_by(Job.priority.desc(), Job.fair_seq, Job.id)
            .limit(limit)
        )
        return {job_id: place for place, job_id in enumerate(ids, start=1)}


def _labels(ctx: Context, views: Iterable[JobView]) -> dict[int, str]:
    """A short description per job: the style being trained, or the prompt."""
    views = list(views)
    labels: dict[int, str] = {}
    train_ids = [v.id for v in views if v.kind == JobKind.TRAIN]
    if train_ids:
        with ctx.services.db.session() as s:
            rows = s.execute(
                select(TrainingRun.job_id, Style.name)
                .join(Style, TrainingRun.style_id == Style.id)
                .where(TrainingRun.job_id.in_(train_ids))
            )
            labels.update({job_id: name for job_id, name in rows if job_id is not None})
    for view in views:
        if view.kind == JobKind.GENERATE:
            prompt = str(view.payload.get("prompt", ""))
            labels[view.id] = "“" + (prompt if len(prompt) <= 40 else prompt[:39] + "…") + "”"
    return labels


def _line(
    view: JobView, labels: dict[int, str], places: dict[int, int], *, who: bool = False
) -> str:
    status = str(view.status)
    if view.status == JobStatus.QUEUED and view.id in places:
        status = f"queued, {ordinal(places[view.id])} in line"
    elif view.status == JobStatus.RUNNING and view.cancel_requested:
        status = "running, cancel requested"
    by = f" by {view.requester}" if who else ""
    label = labels.get(view.id, "")
    return f"#{view.id} {view.kind} {label} {status}{by}".replace("  ", " ")


def cancel(ctx: Context, args: CancelArgs) -> list[Reply]:
    with ctx.write() as tx:
        s = tx.session
        job = s.get(Job, args.job)
        if job is None or job.team_id != tx.team.id:
            raise UserError(f"There is no job #{args.job} in this team; `/jobs` lists them.")
        if job.requester != ctx.actor.user_id and not ctx.is_lead:
            raise Refused(
                f"Job #{job.id} is {job.requester}'s; only they or an art lead can cancel it.",
                AuditNote("job.cancel.refused", "job", str(job.id), {"owner": job.requester}),
            )
        if JobStatus(job.status).is_final:
            raise UserError(f"Job #{job.id} has already ended ({job.status}).")
        audit.record(
            s,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action="job.cancel",
            object_type="job",
            object_id=job.id,
            detail={"kind": job.kind, "owner": job.requester},
        )
    view = ctx.services.queue.cancel(args.job)
    if view.status == JobStatus.CANCELED and view.kind == JobKind.TRAIN:
        # A queued run never reaches a runner, so nobody else would close it.
        with ctx.services.db.session(write=True) as s:
            s.execute(
                update(TrainingRun)
                .where(TrainingRun.job_id == view.id, TrainingRun.status == RunStatus.QUEUED)
                .values(status=RunStatus.CANCELED, finished_at=utcnow())
            )
    if view.status == JobStatus.CANCELED:
        return [Reply(f"Canceled job #{view.id} ({view.kind}).")]
    return [Reply(f"Job #{view.id} is running; it stops at its next step.")]
