"""Teams (a Discord guild, a Slack workspace, the console) and styles scoped to them."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bot.commands import TeamRef
from bot.core.errors import UserError
from storage.models import Style, Team


def ensure_team(s: Session, ref: TeamRef) -> Team:
    """The team row for `ref`, created on first contact (race-safe)."""
    team = find_team(s, ref)
    if team is not None:
        if ref.name and team.name != ref.name:
            team.name = ref.name[:200]
        return team
    try:
        with s.begin_nested():
            team = Team(platform=ref.platform, external_id=ref.external_id, name=ref.name[:200])
            s.add(team)
    except IntegrityError:
        team = find_team(s, ref)
        if team is None:
            raise
    return team


def find_team(s: Session, ref: TeamRef) -> Team | None:
    return s.scalar(
        select(Team).where(Team.platform == ref.platform, Team.external_id == ref.external_id)
    )


def find_style(s: Session, team_id: int, name: str, *, lock: bool = False) -> Style | None:
    """A style of this team by name. Every style lookup goes through a team id."""
    query = select(Style).where(Style.team_id == team_id, func.lower(Style.name) == name.lower())
    if lock:
        # PostgreSQL: serialise edits of one style (new draft versions, positions).
        query = query.with_for_update()
    return s.scalar(query)


def get_style(s: Session, team_id: int, name: str, *, lock: bool = False) -> Style:
    style = find_style(s, team_id, name, lock=lock)
    if style is None:
        raise UserError(
            f"There is no style '{name}' in this team; `/style list` shows the team's styles."
        )
    return style


def team_styles(s: Session, team_id: int) -> list[Style]:
    return list(s.scalars(select(Style).where(Style.team_id == team_id).order_by(Style.name)))
