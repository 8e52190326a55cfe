"""Shared pieces for the command-core, delivery and console tests.

Test files pull the fixtures in with `pytest_plugins = ("bot_fixtures",)` and import the
helpers from this module. Everything runs on the `db` fixture (SQLite and PostgreSQL).
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from sqlalchemy import func, select

from bot.commands import (
    Actor,
    Command,
    FileTooLarge,
    IncomingFile,
    OutgoingFile,
    Reaction,
    Reply,
    TeamRef,
)
from bot.core import CommandCore, CorePolicy
from bot.delivery import OutboxDeliverer
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import (
    AuditEvent,
    DatasetVersion,
    Job,
    ModelVersion,
    ReferenceImage,
    Style,
    Team,
    utcnow,
)
from storage.outbox import Outbox, OutboxItem
from storage.queue import JobQueue, RetryPolicy
from storage.settings import Settings

PLATFORM = "slack"
TEAM = TeamRef(PLATFORM, "T1", "Team One")
OTHER_TEAM = TeamRef(PLATFORM, "T2", "Team Two")
LEAD = "ULEAD"
MEMBER = "U1"
_events = itertools.count(1)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSender:
    """A MessageSender that records calls; `fail_with` makes the next calls raise."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, OutboxItem, list[OutgoingFile]]] = []
        self.edits: list[tuple[str, OutboxItem, list[OutgoingFile]]] = []
        self.fail_with: list[BaseException] = []
        self._ids = itertools.count(1)

    def post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str:
        if self.fail_with:
            raise self.fail_with.pop(0)
        message_id = f"m{next(self._ids)}"
        self.posts.append((message_id, item, list(files)))
        return message_id

    def edit(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> None:
        if self.fail_with:
            raise self.fail_with.pop(0)
        assert item.platform_message_id is not None
        self.edits.append((item.platform_message_id, item, list(files)))

    def id_of(self, key: str) -> str:
        """The platform id the message with this outbox key was posted as."""
        return next(mid for mid, item, _ in self.posts if item.key == key)


@dataclass
class Rig:
    db: Database
    blobs: BlobStore
    settings: Settings
    queue: JobQueue
    outbox: Outbox
    core: CommandCore
    clock: FakeClock
    sender: RecordingSender
    deliverer: OutboxDeliverer
    tmp: Path
    replies: list[Reply] = field(default_factory=list)

    def run(self, name: str, args: dict[str, str] | None = None, **kw: Any) -> list[Reply]:
        return self.core.handle(command(name, args, **kw))

    def text(self, name: str, args: dict[str, str] | None = None, **kw: Any) -> str:
        """The replies' text, joined (most tests read one reply)."""
        return "\n".join(r.text for r in self.run(name, args, **kw))

    def say(self, slash: str, text: str, **kw: Any) -> str:
        """A typed command through the text parser, as Slack and the console send it."""
        parsed = self.core.text_parser(slash, text)
        return "\n".join(r.text for r in self.core.handle(command(parsed.name, parsed.args, **kw)))

    def react(self, key: str, emoji: str, user: str = LEAD, **kw: Any) -> list[Reply]:
        """React to the message posted for outbox `key` (delivering it first if needed)."""
        self.deliverer.deliver_due()
        return self.core.handle_reaction(reaction(self.sender.id_of(key), emoji, user=user, **kw))

    def count(self, model: type[Any], *where: Any) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    def blob_count(self) -> int:
        return sum(1 for p in self.blobs.root.rglob("*") if p.is_file() and p.parent.name != "tmp")

    def audit(self, action: str) -> list[AuditEvent]:
        with self.db.session() as s:
            return list(
                s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by("id"))
            )

    def style(self, name: str, team: TeamRef = TEAM) -> Style:
        with self.db.session() as s:
            row = s.scalar(
                select(Style)
                .join(Team, Style.team_id == Team.id)
                .where(Style.name == name, Team.external_id == team.external_id)
            )
            assert row is not None
            return row

    def datasets(self, style_name: str, team: TeamRef = TEAM) -> list[DatasetVersion]:
        style = self.style(style_name, team)
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(DatasetVersion)
                    .where(DatasetVersion.style_id == style.id)
                    .order_by(DatasetVersion.version)
                )
            )

    def images(self, dataset_id: int) -> list[ReferenceImage]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(ReferenceImage)
                    .where(ReferenceImage.dataset_version_id == dataset_id)
                    .order_by(ReferenceImage.position)
                )
            )

    def jobs(self, kind: str | None = None) -> list[Job]:
        with self.db.session() as s:
            query = select(Job).order_by(Job.id)
            if kind:
                query = query.where(Job.kind == kind)
            return list(s.scalars(query))


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp / "data",
        "slack_lead_users": [LEAD],
        "discord_lead_roles": ["Art Lead"],
        "min_image_side": 64,
        "max_upload_bytes": 200_000,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def rig(db: Database, tmp_path: Path) -> Iterator[Rig]:
    yield build_rig(db, tmp_path)


def build_rig(db: Database, tmp: Path, *, policy: CorePolicy | None = None, **settings: Any) -> Rig:
    config = make_settings(tmp, **settings)
    blobs = BlobStore(config.blob_dir, config.max_blob_bytes)
    queue = JobQueue(db)
    outbox = Outbox(db, retry=RetryPolicy(base_seconds=5, factor=2), max_attempts=4)
    clock = FakeClock()
    core = CommandCore(db, blobs, config, queue, outbox, policy=policy, clock=clock)
    sender = RecordingSender()
    deliverer = OutboxDeliverer(outbox, blobs, sender, PLATFORM, clock=clock)
    return Rig(db, blobs, config, queue, outbox, core, clock, sender, deliverer, tmp)


# -- events -----------------------------------------------------------------------------------


def actor(user: str, roles: Sequence[str] = ()) -> Actor:
    return Actor(user, user.lower(), frozenset(roles))


def command(
    name: str,
    args: dict[str, str] | None = None,
    *,
    user: str = MEMBER,
    roles: Sequence[str] = (),
    team: TeamRef = TEAM,
    event: str | None = None,
    files: Sequence[IncomingFile] = (),
    thread: str | None = None,
    channel: str = "C1",
) -> Command:
    return Command(
        event_id=event or f"ev-{next(_events)}",
        team=team,
        channel=channel,
        user=actor(user, roles),
        name=name,
        args=args or {},
        thread=thread,
        attachments=tuple(files),
    )


def reaction(
    message_id: str,
    emoji: str,
    *,
    user: str = LEAD,
    roles: Sequence[str] = (),
    team: TeamRef = TEAM,
    event: str | None = None,
    added: bool = True,
) -> Reaction:
    return Reaction(
        event_id=event or f"re-{next(_events)}",
        team=team,
        channel="C1",
        message_id=message_id,
        emoji=emoji,
        user=actor(user, roles),
        added=added,
    )


# -- files ------------------------------------------------------------------------------------


def picture(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """Shapes on a gradient; different seeds look different (distinct perceptual hashes)."""
    rnd = random.Random(seed)
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = rnd.randrange(size[0]), rnd.randrange(size[1])
        x1, y1 = x0 + rnd.randrange(10, 60), y0 + rnd.randrange(10, 60)
        colour = tuple(rnd.randrange(256) for _ in range(3))
        (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return im


def png_bytes(seed: int, size: tuple[int, int] = (96, 96), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    picture(seed, size).save(buf, fmt)
    return buf.getvalue()


def mem_file(
    name: str, data: bytes, *, size: int | None = None, reads: list[int] | None = None
) -> IncomingFile:
    """An attachment held in memory; `reads` records each read's limit (to prove no read)."""

    def read(limit: int) -> bytes:
        if reads is not None:
            reads.append(limit)
        if len(data) > limit:
            raise FileTooLarge(f"{name} is over {limit} bytes")
        return data

    return IncomingFile(filename=name, read=read, size=size)


def images(*seeds: int) -> list[IncomingFile]:
    return [mem_file(f"ref{seed}.png", png_bytes(seed)) for seed in seeds]


# -- shortcuts --------------------------------------------------------------------------------


def approved_style(
    rig: Rig,
    name: str = "ink",
    trigger: str = "inkstyle",
    seeds=(1, 2, 3),
    base: str | None = None,
) -> None:
    """A style (on `base`, else the default model) whose dataset v1 a lead approved."""
    created = {"name": name, "trigger": trigger, **({"base": base} if base else {})}
    assert "Created" in rig.text("style create", created)
    rig.run("style add", {"name": name}, files=images(*seeds))
    rig.run("style review", {"name": name})
    dataset = rig.datasets(name)[-1]
    replies = rig.react(f"review:dataset:{dataset.id}", "✅", user=LEAD)
    assert "approved" in replies[0].text


def add_model_version(
    rig: Rig,
    style_name: str,
    *,
    version: int = 1,
    base: str = "tiny-sd15",
    approved: bool = False,
    kohya: bytes | None = None,
    diffusers: bytes | None = None,
    method: str = "lora",
) -> int:
    style = rig.style(style_name)
    with rig.db.session(write=True) as s:
        model = ModelVersion(
            style_id=style.id,
            version=version,
            method=method,
            base_model=base,
            kohya_blob=rig.blobs.put_bytes(kohya).sha256 if kohya else None,
            diffusers_blob=rig.blobs.put_bytes(diffusers).sha256 if diffusers else None,
            approved_by=LEAD if approved else None,
            approved_at=utcnow() if approved else None,
        )
        s.add(model)
        s.flush()
        return model.id
