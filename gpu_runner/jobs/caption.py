"""The `caption` job: auto-caption a dataset's images that no person has captioned yet."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpu_runner.captioning import Captioner, CaptionError, supported
from gpu_runner.services import RunnerServices
from gpu_runner.worker import JobContext, JobFailed
from storage.cards import card_key, card_text
from storage.datasets import effective_captions, images_of
from storage.job_payloads import CaptionPayload, result_key
from storage.models import (
    Caption,
    CaptionSource,
    DatasetVersion,
    OutboxMessage,
    ReferenceImage,
    Style,
)
from storage.outbox import Attachment


def run_caption(services: RunnerServices, ctx: JobContext) -> dict[str, Any]:
    payload = CaptionPayload.model_validate(ctx.job.payload)
    folder = services.settings.caption_model
    if not folder:
        raise JobFailed(
            "no captioning model is configured; set ATELIER_CAPTION_MODEL to a local model "
            f"folder of one of these kinds: {supported()}; or caption images yourself with "
            "`/style caption`"
        )
    with services.db.session() as s:
        dataset = s.get(DatasetVersion, payload.dataset_version_id)
        if dataset is None:
            raise JobFailed(f"dataset {payload.dataset_version_id} no longer exists")
        style = s.get(Style, dataset.style_id)
        assert style is not None
        images = images_of(s, dataset.id)
        existing = effective_captions(s, [image.id for image in images])
    # A person's caption is never replaced by a machine's.
    todo = [
        image
        for image in images
        if image.id not in existing or existing[image.id].source != CaptionSource.HUMAN
    ]
    captioner = Captioner(folder, services.device)
    try:
        captions = captioner.caption([services.blobs.read_bytes(i.blob_sha256) for i in todo])
    except CaptionError as exc:
        raise JobFailed(str(exc)) from None
    written = 0
    with services.db.session(write=True) as s:
        current = effective_captions(s, [image.id for image in todo])
        for image, caption in zip(todo, captions, strict=True):
            human = image.id in current and current[image.id].source == CaptionSource.HUMAN
            if caption.error or not caption.text or human:
                continue
            s.add(
                Caption(
                    image_id=image.id,
                    text=caption.text,
                    source=CaptionSource.AUTO,
                    author=f"auto:{caption.model}",
                )
            )
            written += 1
            _update_cards(services, s, style, image, caption.text)
    ctx.post(
        result_key(ctx.job.id),
        f"Auto-captioned {written} of {len(images)} images of **{style.name}**; "
        f"see them with `/style review {style.name}` and fix any with `/style caption`.",
    )
    return {"captioned": written, "skipped_human": len(images) - len(todo)}


def _update_cards(
    services: RunnerServices, s: Session, style: Style, image: ReferenceImage, text: str
) -> None:
    """Edit in place the posted cards showing this picture (its number in any version of the
    style's dataset: a review shows one version, captions go to the draft)."""
    same_number = s.scalars(
        select(ReferenceImage.id)
        .join(DatasetVersion, ReferenceImage.dataset_version_id == DatasetVersion.id)
        .where(DatasetVersion.style_id == style.id, ReferenceImage.position == image.position)
    )
    for image_id in list(same_number):
        row = s.scalar(select(OutboxMessage).where(OutboxMessage.key == card_key(image_id)))
        if row is None:  # never reviewed: no card to edit
            continue
        services.outbox.put(
            row.key,
            platform=row.platform,
            channel=row.channel,
            thread=row.thread,
            team_id=row.team_id,
            text=card_text(
                style.name,
                image.position,
                text,
                auto=True,
                original_name=image.original_name,
                width=image.width,
                height=image.height,
            ),
            attachments=[Attachment(**a) for a in row.attachments or []],
            extra=dict(row.extra or {}),
            session=s,
        )
