"""Dataset versions, their images and captions.

Rules: approved versions are frozen (their content hash is recorded); a person's edit of a
version that is not a draft starts a new draft that copies the kept images and their
captions. Image numbers (positions) are never reused within a style, so "#7" means the
same picture on every sheet. A human caption always wins over an automatic one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.core import audit
from storage.datasets import (
    effective_captions,
    images_of,
    latest_version,
)
from storage.models import (
    Caption,
    DatasetStatus,
    DatasetVersion,
    ReferenceImage,
    Style,
)

FROZEN = (DatasetStatus.APPROVED,)


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
