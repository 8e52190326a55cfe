"""What a handler gets: the shared services and one command's who/where, plus its transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.orm import Session

from bot.commands import Actor, TeamRef
from bot.core.auth import LeadPolicy
from bot.core.errors import DuplicateEvent
from bot.core.guard import PromptBlocklist, RateLimiter, claim_event
from bot.core.policy import CorePolicy
from bot.core.previews import PreviewCache
from bot.core.teams import ensure_team
from storage.blobs import BlobStore
from storage.db import Database
from storage.ingest import IngestLimits
from storage.job_payloads import ReplyTarget
from storage.models import Team
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.settings import Settings


@dataclass(frozen=True)
class Services:
    db: Database
    blobs: BlobStore
    settings: Settings
    queue: JobQueue
    outbox: Outbox
    policy: CorePolicy
    leads: LeadPolicy
    limiter: RateLimiter
    blocklist: PromptBlocklist
    previews: PreviewCache
    limits: IngestLimits


@dataclass
class Tx:
    """One write transaction of a command, with its team resolved."""

    session: Session
    team: Team


@dataclass(frozen=True)
class Context:
    services: Services
    platform: str
    team_ref: TeamRef
    actor: Actor
    channel: str
    thread: str | None
    event_id: str

    @property
    def is_lead(self) -> bool:
        return self.services.leads.is_lead(self.platform, self.actor)

    @property
    def who(self) -> str:
        """How the actor is named in replies and the audit log."""
        return self.actor.display_name or self.actor.user_id

    @property
    def idempotency_key(self) -> str:
        return f"{self.platform}:{self.event_id}"

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """The command's transaction: claims the event id first, so a repeat does nothing."""
        with self.services.db.session(write=True) as s:
            if not claim_event(s, self.platform, self.event_id):
                raise DuplicateEvent(self.event_id)
            yield Tx(s, ensure_team(s, self.team_ref))

    def reply_target(self, team_id: int, thread: str | None = None) -> ReplyTarget:
        return ReplyTarget(
            platform=self.platform,
            channel=self.channel,
            thread=thread if thread is not None else self.thread,
            team_id=team_id,
            requester=self.actor.user_id,
        )
