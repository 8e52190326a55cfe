"""Reading dataset versions: their images, effective captions and content hash.

Shared by the bot (review, approval) and the runner (training reads exactly what a lead
approved). A human caption always wins over an automatic one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Caption, CaptionSource, DatasetStatus, DatasetVersion, ReferenceImage


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
