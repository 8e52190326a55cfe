"""The audit trail: who did what to which object. Written in the action's own transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.commands import Reply
from bot.core.errors import AuditNote, Refused
from bot.core.teams import get_style
from storage.models import (
    AuditEvent,
    DatasetVersion,
    Generation,
    Job,
    ModelVersion,
    ReferenceImage,
    Style,
    TrainingRun,
)

if TYPE_CHECKING:
    from bot.core.arguments import AuditArgs
    from bot.core.context import Context


def record(
    s: Session,
    *,
    team_id: int | None,
    actor: str,
    action: str,
    object_type: str,
    object_id: int | str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    s.add(
        AuditEvent(
            team_id=team_id,
            actor=actor[:128],
            action=action,
            object_type=object_type,
            object_id=None if object_id is None else str(object_id),
            detail=dict(detail or {}),
        )
    )


def events(
    s: Session, *, team_id: int | None = None, action: str | None = None
) -> list[AuditEvent]:
    """Audit rows, oldest first (for tests and `style info`)."""
    query = select(AuditEvent).order_by(AuditEvent.id)
    if team_id is not None:
        query = query.where(AuditEvent.team_id == team_id)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    return list(s.scalars(query))


# -- /audit: what a lead may read ------------------------------------------------------------

DEFAULT_SHOWN = 20
_SCANNED = 2000  # newest events searched when filtering by style


def audit_command(ctx: Context, args: AuditArgs) -> list[Reply]:
    """The team's latest audit events, newest first, optionally only one style's."""
    if not ctx.is_lead:
        raise Refused(
            "Only art leads can read the audit trail; leads are "
            f"{ctx.services.leads.describe(ctx.platform)}.",
            AuditNote("audit.refused", "team", None),
        )
    shown = args.count or DEFAULT_SHOWN
    with ctx.write() as tx:
        s, team = tx.session, tx.team
        query = (
            select(AuditEvent)
            .where(AuditEvent.team_id == team.id)
            .order_by(AuditEvent.id.desc())
            .limit(shown if args.style is None else _SCANNED)
        )
        rows = list(s.scalars(query))
        title = "the team"
        if args.style is not None:
            style = get_style(s, team.id, args.style)
            owned = _style_objects(s, style)
            rows = [r for r in rows if (r.object_type, r.object_id) in owned][:shown]
            title = f"style {style.name}"
        lines = [f"**Audit trail of {title}** (newest first, {len(rows)} shown)"]
        lines += [_line(row) for row in rows] or ["nothing recorded yet"]
    return [Reply("\n".join(lines), private=True)]


def _line(row: AuditEvent) -> str:
    when = row.created_at.strftime("%Y-%m-%d %H:%M")
    target = f"{row.object_type} {row.object_id}" if row.object_id else row.object_type
    name = row.detail.get("name") if isinstance(row.detail, dict) else None
    who = f"{name} ({row.actor})" if name and name != row.actor else row.actor
    return f"{when} · {row.action} · {target} · by {who}"


def _style_objects(s: Session, style: Style) -> set[tuple[str, str]]:
    """(object_type, object_id) of everything that belongs to a style."""
    datasets = list(s.scalars(select(DatasetVersion.id).where(DatasetVersion.style_id == style.id)))
    images = list(
        s.scalars(select(ReferenceImage.id).where(ReferenceImage.dataset_version_id.in_(datasets)))
    ) if datasets else []  # fmt: skip
    runs = list(s.execute(select(TrainingRun.id, TrainingRun.job_id).where(
        TrainingRun.style_id == style.id)))  # fmt: skip
    models = list(s.scalars(select(ModelVersion.id).where(ModelVersion.style_id == style.id)))
    owned = {("style", str(style.id))}
    owned |= {("dataset_version", str(i)) for i in datasets}
    owned |= {("reference_image", str(i)) for i in images}
    owned |= {("training_run", str(run_id)) for run_id, _ in runs}
    owned |= {("job", str(job_id)) for _, job_id in runs if job_id is not None}
    owned |= {("model_version", str(i)) for i in models}
    # Generations that used one of its model versions.
    model_ids = set(models)
    for generation_id, job_id, adapters in s.execute(
        select(Generation.id, Generation.job_id, Generation.adapters).where(
            Generation.team_id == style.team_id
        )
    ):
        if any(a.get("model_version_id") in model_ids for a in adapters or []):
            owned.add(("generation", str(generation_id)))
            if job_id is not None:
                owned.add(("job", str(job_id)))
    for job_id, payload in s.execute(
        select(Job.id, Job.payload).where(Job.team_id == style.team_id, Job.kind == "generate")
    ):
        if any(a.get("model_version_id") in model_ids for a in payload.get("adapters", [])):
            owned.add(("job", str(job_id)))
    return owned
