"""Seeding the database for runner tests: a team with an approved style, and jobs to run.

Shared by the runner job tests and the several-runners test. Only storage is touched, so a
test process can seed a database that runner processes then work on.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

from sqlalchemy import select

from storage.blobs import BlobStore
from storage.datasets import content_hash, effective_captions, images_of
from storage.db import Database
from storage.families import generation_defaults
from storage.job_payloads import (
    AdapterChoice,
    GeneratePayload,
    JobKind,
    Priority,
    ReplyTarget,
    TrainPayload,
    batch_key,
)
from storage.models import (
    Caption,
    DatasetStatus,
    DatasetVersion,
    ReferenceImage,
    Style,
    Team,
    TrainingRun,
)
from storage.queue import JobQueue


class Stores(Protocol):
    """What seeding needs; `RunnerServices` has it, so does a plain dataclass."""

    db: Database
    blobs: BlobStore
    queue: JobQueue


def reply_to(team_id: int, requester: str = "ana") -> ReplyTarget:
    return ReplyTarget(platform="console", channel="c", team_id=team_id, requester=requester)


def approved_style(
    stores: Stores,
    demo_items: list[tuple[Any, str]],
    team: str = "t1",
    *,
    name: str = "ink",
    trigger: str = "inkstyle",
    base_model: str = "tiny-sd15",
    team_id: int | None = None,
) -> int:
    """A style (default 'ink', trigger inkstyle) with an approved dataset of `demo_items`,
    in a new team `team`, or in the existing team `team_id`. Returns the style id."""
    with stores.db.session(write=True) as s:
        if team_id is None:
            team_row = Team(platform="console", external_id=team)
            s.add(team_row)
            s.flush()
            team_id = team_row.id
        style = Style(
            team_id=team_id, name=name, trigger=trigger, base_model=base_model, owner="ana"
        )
        s.add(style)
        s.flush()
        dataset = DatasetVersion(style_id=style.id, version=1, created_by="ana")
        s.add(dataset)
        s.flush()
        for number, (image, caption) in enumerate(demo_items, start=1):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            blob = stores.blobs.put_bytes(buffer.getvalue())
            ref = ReferenceImage(
                dataset_version_id=dataset.id,
                position=number,
                blob_sha256=blob.sha256,
                source_sha256=blob.sha256,
                phash="0" * 16,
                original_name=f"{number}.png",
                byte_size=blob.size,
                width=64,
                height=64,
                uploader="ana",
            )
            s.add(ref)
            s.flush()
            text = caption if "[trigger]" in caption else f"[trigger], {caption}"
            s.add(Caption(image_id=ref.id, text=text, author="ana"))
        s.flush()
        images = images_of(s, dataset.id)
        dataset.status = DatasetStatus.APPROVED
        dataset.content_hash = content_hash(images, effective_captions(s, [i.id for i in images]))
        return style.id


def enqueue_training(
    stores: Stores, style_id: int, method: str = "lora", **params: Any
) -> tuple[int, int]:
    """A training run of the style's dataset and its job. Returns (run id, job id)."""
    with stores.db.session(write=True) as s:
        style = s.get(Style, style_id)
        dataset = s.scalar(select(DatasetVersion).where(DatasetVersion.style_id == style_id))
        assert style is not None and dataset is not None
        run = TrainingRun(
            style_id=style_id,
            dataset_version_id=dataset.id,
            method=method,
            params=params,
            requested_by="ana",
        )
        s.add(run)
        s.flush()
        payload = TrainPayload(training_run_id=run.id, reply=reply_to(style.team_id))
        job = stores.queue.enqueue(
            JobKind.TRAIN,
            payload.model_dump(),
            requester="ana",
            priority=Priority.TRAIN,
            base_model=style.base_model,
            session=s,
        )
        run.job_id = job.id
        return run.id, job.id


def generate_payload(
    team_id: int, model_version_id: int | None = None, **kw: Any
) -> GeneratePayload:
    """A small /imagine request (64x64, 4 steps on tiny-sd15 unless `kw` says otherwise)."""
    adapters = (
        [AdapterChoice(model_version_id=model_version_id, name="ink", trigger="inkstyle")]
        if model_version_id
        else []
    )
    settings: dict[str, Any] = {
        "prompt": "inkstyle, a harbour",
        "base_model": "tiny-sd15",
        "steps": 4,
        "width": 64,
        "height": 64,
        **kw,
    }
    requester = settings.pop("requester", "ana")
    payload = GeneratePayload(adapters=adapters, reply=reply_to(team_id, requester), **settings)
    return payload.with_defaults(generation_defaults(payload.base_model, {}))


def enqueue_generate(
    stores: Stores, payload: GeneratePayload, *, min_memory_mb: int | None = None
) -> int:
    return stores.queue.enqueue(
        JobKind.GENERATE,
        payload.model_dump(),
        requester=payload.reply.requester,
        priority=Priority.GENERATE,
        base_model=payload.base_model,
        min_memory_mb=min_memory_mb,
        batch_key=batch_key(payload),
    ).id
