"""The per-person cap on queued jobs (ATELIER_MAX_QUEUED_JOBS_PER_USER), checked by every
command that queues work for someone: generations, button presses, trainings, auto captions
and imports."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.core.context import Context
from bot.core.errors import UserError
from storage.models import Job, JobStatus


def check_queue_room(ctx: Context, s: Session, team_id: int) -> None:
    """Refuse a new job when the person already has the most queued jobs allowed
    (ATELIER_MAX_QUEUED_JOBS_PER_USER), showing their queue so they can cancel some."""
    limit = ctx.services.settings.max_queued_jobs_per_user
    me = ctx.actor.user_id
    queued = s.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.team_id == team_id, Job.requester == me, Job.status == JobStatus.QUEUED)
    )
    if (queued or 0) < limit:
        return
    rows = list(
        s.scalars(
            select(Job)
            .where(Job.team_id == team_id, Job.requester == me, Job.status == JobStatus.QUEUED)
            .order_by(Job.id)
            .limit(10)
        )
    )
    shown = ", ".join(f"#{job.id} {job.kind}" for job in rows)
    more = f" and {queued - len(rows)} more" if queued and queued > len(rows) else ""
    raise UserError(
        f"You already have {queued} jobs queued, the most one person may; wait for them or "
        f"cancel some with `/cancel N` (yours: {shown}{more}; `/jobs` shows the queue)."
    )
