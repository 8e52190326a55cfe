"""The audit trail: who did what to which object. Written in the action's own transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, String, and_, cast, or_, select, true
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
# Ids of a style's generations are bound as parameters; chunks keep each statement well
# under SQLite's and PostgreSQL's limits on bound parameters.
_IDS_PER_QUERY = 2000


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
        if args.style is None:
            rows = _newest(s, team.id, [true()], shown)
            title = "the team"
        else:
            style = get_style(s, team.id, args.style)
            rows = _newest(s, team.id, _style_conditions(s, style), shown)
            title = f"style {style.name}"
        lines = [f"**Audit trail of {title}** (newest first, {len(rows)} shown)"]
        lines += [_line(row) for row in rows] or ["nothing recorded yet"]
    return [Reply("\n".join(lines), private=True)]


def _newest(
    s: Session, team_id: int, conditions: list[ColumnElement[bool]], shown: int
) -> list[AuditEvent]:
    """The newest `shown` events of the team matching any of `conditions`, each condition
    filtered by the database (one query per condition, merged by id)."""
    found: dict[int, AuditEvent] = {}
    for condition in conditions:
        query = (
            select(AuditEvent)
            .where(AuditEvent.team_id == team_id, condition)
            .order_by(AuditEvent.id.desc())
            .limit(shown)
        )
        found.update((row.id, row) for row in s.scalars(query))
    return [found[i] for i in sorted(found, reverse=True)[:shown]]


def _line(row: AuditEvent) -> str:
    when = row.created_at.strftime("%Y-%m-%d %H:%M")
    target = f"{row.object_type} {row.object_id}" if row.object_id else row.object_type
    name = row.detail.get("name") if isinstance(row.detail, dict) else None
    who = f"{name} ({row.actor})" if name and name != row.actor else row.actor
    return f"{when} · {row.action} · {target} · by {who}"


def _about(object_type: str, ids: Any) -> ColumnElement[bool]:
    return and_(AuditEvent.object_type == object_type, AuditEvent.object_id.in_(ids))


def _as_text(column: Any) -> Any:
    return cast(column, String)  # audit object ids are text: they name rows of any table


def _style_conditions(s: Session, style: Style) -> list[ColumnElement[bool]]:
    """Conditions on audit events about everything that belongs to a style: its datasets,
    images, trainings, models (subqueries), and the generations and their jobs that used
    one of its models (ids found from their adapters, which are JSON)."""
    datasets = select(DatasetVersion.id).where(DatasetVersion.style_id == style.id)
    runs = select(TrainingRun).where(TrainingRun.style_id == style.id).subquery()
    models = select(ModelVersion.id).where(ModelVersion.style_id == style.id)
    owned = or_(
        and_(AuditEvent.object_type == "style", AuditEvent.object_id == str(style.id)),
        _about("dataset_version", select(_as_text(DatasetVersion.id)).where(
            DatasetVersion.style_id == style.id)),
        _about("reference_image", select(_as_text(ReferenceImage.id)).where(
            ReferenceImage.dataset_version_id.in_(datasets))),
        _about("training_run", select(_as_text(runs.c.id))),
        _about("job", select(_as_text(runs.c.job_id)).where(runs.c.job_id.is_not(None))),
        _about("model_version", select(_as_text(ModelVersion.id)).where(
            ModelVersion.style_id == style.id)),
    )  # fmt: skip
    model_ids = set(s.scalars(models))
    if not model_ids:
        return [owned]
    used: dict[str, set[str]] = {"generation": set(), "job": set()}
    for generation_id, job_id, adapters in s.execute(
        select(Generation.id, Generation.job_id, Generation.adapters).where(
            Generation.team_id == style.team_id
        )
    ):
        if any(a.get("model_version_id") in model_ids for a in adapters or []):
            used["generation"].add(str(generation_id))
            if job_id is not None:
                used["job"].add(str(job_id))
    for job_id, payload in s.execute(
        select(Job.id, Job.payload).where(Job.team_id == style.team_id, Job.kind == "generate")
    ):
        if any(a.get("model_version_id") in model_ids for a in payload.get("adapters", [])):
            used["job"].add(str(job_id))
    conditions = [owned]
    for object_type, ids in used.items():
        ordered = sorted(ids)
        for start in range(0, len(ordered), _IDS_PER_QUERY):
            conditions.append(_about(object_type, ordered[start : start + _IDS_PER_QUERY]))
    return conditions
