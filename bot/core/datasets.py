"""Dataset versions, their images and captions.

Rules: approved versions are frozen (their content hash is recorded); a person's edit of a
version that is not a draft starts a new draft that copies the kept images and their
captions. Image numbers (positions) are never reused within a style, so "#7" means the
same picture on every sheet. A human caption always wins over an automatic one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.core import audit
from storage.models import (
    Caption,
    CaptionSource,
    DatasetStatus,
    DatasetVersion,
    ReferenceImage,
    Style,
)

FROZEN = (DatasetStatus.APPROVED,)


def latest_version(s: Session, style_id: int) -> DatasetVersion | None:
    return s.scalar(
        select(DatasetVersion)
        .where(DatasetVersion.style_id == style_id)
        .order_by(DatasetVersion.version.desc())
        .limit(1)
    )


def latest_approved(s: Session, style_id: int) -> DatasetVersion | None:
    return s.scalar(
        select(DatasetVersion)
        .where(DatasetVersion.style_id == style_id, DatasetVersion.status == DatasetStatus.APPROVED)
        .order_by(DatasetVersion.version.desc())
        .limit(1)
    )


def images_of(s: Session, dataset_id: int, *, kept_only: bool = True) -> list[ReferenceImage]:
    query = (
        select(ReferenceImage)
        .where(ReferenceImage.dataset_version_id == dataset_id)
        .order_by(ReferenceImage.position)
    )
    if kept_only:
        query = query.where(ReferenceImage.dropped.is_(False))
    return list(s.scalars(query))


def image_by_number(s: Session, dataset_id: int, number: int) -> ReferenceImage | None:
    return s.scalar(
        select(ReferenceImage).where(
            ReferenceImage.dataset_version_id == dataset_id, ReferenceImage.position == number
        )
    )


@dataclass(frozen=True)
class EffectiveCaption:
    text: str
    source: CaptionSource


def effective_captions(s: Session, image_ids: Iterable[int]) -> dict[int, EffectiveCaption]:
    """Each image's caption: its latest human caption, else its latest automatic one."""
    ids = list(image_ids)
    if not ids:
        return {}
    chosen: dict[int, EffectiveCaption] = {}
    rows = s.scalars(select(Caption).where(Caption.image_id.in_(ids)).order_by(Caption.id))
    for caption in rows:
        current = chosen.get(caption.image_id)
        source = CaptionSource(caption.source)
        if current is None or source == CaptionSource.HUMAN or current.source != "human":
            chosen[caption.image_id] = EffectiveCaption(caption.text, source)
    return chosen


def content_hash(images: Sequence[ReferenceImage], captions: dict[int, EffectiveCaption]) -> str:
    """sha256 over the kept images in number order: blob hash, tab, effective caption.

    The runner can recompute it to prove it trains exactly what a lead approved.
    """
    digest = hashlib.sha256()
    for image in sorted(images, key=lambda i: i.position):
        if image.dropped:
            continue
        caption = captions.get(image.id)
        text = caption.text if caption else ""
        digest.update(f"{image.blob_sha256}\t{text}\n".encode())
    return digest.hexdigest()


def next_number(s: Session, style_id: int) -> int:
    """The next image number in this style (numbers are never reused)."""
    highest = s.scalar(
        select(func.max(ReferenceImage.position))
        .join(DatasetVersion, ReferenceImage.dataset_version_id == DatasetVersion.id)
        .where(DatasetVersion.style_id == style_id)
    )
    return int(highest or 0) + 1


@dataclass(frozen=True)
class Editable:
    draft: DatasetVersion
    copied_from: DatasetVersion | None  # set when this edit started a new draft


def editable_draft(s: Session, style: Style, actor: str) -> Editable:
    """The draft to change: the latest version if it is a draft, else a new copy of it."""
    latest = latest_version(s, style.id)
    if latest is not None and latest.status == DatasetStatus.DRAFT:
        return Editable(latest, None)
    draft = DatasetVersion(
        style_id=style.id,
        version=(latest.version + 1) if latest else 1,
        status=DatasetStatus.DRAFT,
        created_by=actor,
    )
    s.add(draft)
    s.flush()
    if latest is not None:
        _copy_images(s, latest, draft)
        audit.record(
            s,
            team_id=style.team_id,
            actor=actor,
            action="dataset.new_version",
            object_type="dataset_version",
            object_id=draft.id,
            detail={"style": style.name, "version": draft.version, "from": latest.version},
        )
    return Editable(draft, latest)


def _copy_images(s: Session, source: DatasetVersion, draft: DatasetVersion) -> None:
    kept = images_of(s, source.id)
    captions = effective_captions(s, (i.id for i in kept))
    for old in kept:
        new = ReferenceImage(
            dataset_version_id=draft.id,
            position=old.position,
            blob_sha256=old.blob_sha256,
            source_sha256=old.source_sha256,
            phash=old.phash,
            original_name=old.original_name,
            byte_size=old.byte_size,
            width=old.width,
            height=old.height,
            uploader=old.uploader,
            warnings=list(old.warnings or []),
        )
        s.add(new)
        s.flush()
        caption = captions.get(old.id)
        if caption is not None:
            author = "copied"
            s.add(Caption(image_id=new.id, text=caption.text, source=caption.source, author=author))


def describe_version(s: Session, dataset: DatasetVersion | None) -> str:
    if dataset is None:
        return "no images yet"
    kept = len(images_of(s, dataset.id))
    return f"v{dataset.version} {dataset.status.replace('_', ' ')}, {plural(kept, 'image')}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
