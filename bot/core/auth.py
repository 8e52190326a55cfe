"""Who is an art lead: named by configuration, per platform."""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.commands import Actor
from storage.settings import Settings

# The console has no role system; its user carries this role to act as a lead.
CONSOLE_LEAD_ROLE = "lead"


@dataclass(frozen=True)
class LeadPolicy:
    """Discord: role names (any case) or ids. Slack: user ids or one user-group id."""

    discord_roles: frozenset[str] = frozenset()
    slack_users: frozenset[str] = frozenset()
    slack_group: str | None = None
    extra_roles: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> LeadPolicy:
        return cls(
            discord_roles=frozenset(r.strip().casefold() for r in settings.discord_lead_roles),
            slack_users=frozenset(settings.slack_lead_users),
            slack_group=settings.slack_lead_group or None,
        )

    def is_lead(self, platform: str, actor: Actor) -> bool:
        if platform == "discord":
            return any(r.casefold() in self.discord_roles for r in actor.roles)
        if platform == "slack":
            in_group = self.slack_group is not None and self.slack_group in actor.roles
            return actor.user_id in self.slack_users or in_group
        if platform == "console":
            return CONSOLE_LEAD_ROLE in actor.roles
        return bool(self.extra_roles.get(platform, frozenset()) & actor.roles)

    def describe(self, platform: str) -> str:
        """Who the leads are, for a refusal message; says how to configure when nobody is."""
        if platform == "discord":
            if self.discord_roles:
                return "people with the role " + " or ".join(sorted(self.discord_roles))
            return "nobody yet (set ATELIER_DISCORD_LEAD_ROLES)"
        if platform == "slack":
            if self.slack_users or self.slack_group:
                return "the users in ATELIER_SLACK_LEAD_USERS / ATELIER_SLACK_LEAD_GROUP"
            return "nobody yet (set ATELIER_SLACK_LEAD_USERS or ATELIER_SLACK_LEAD_GROUP)"
        if platform == "console":
            return f"console users with the '{CONSOLE_LEAD_ROLE}' role (`as NAME lead`)"
        return "the configured art leads"
