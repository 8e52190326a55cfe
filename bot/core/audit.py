"""The audit trail: who did what to which object. Written in the action's own transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import AuditEvent


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
