"""The `caption` job: auto-caption a dataset's images that no person has captioned yet."""

from __future__ import annotations

from typing import Any

from gpu_runner.captioning import Captioner, CaptionError
from gpu_runner.services import RunnerServices
from gpu_runner.worker import JobContext, JobFailed
from storage.datasets import effective_captions, images_of
from storage.job_payloads import CaptionPayload, result_key
from storage.models import Caption, CaptionSource, DatasetVersion, Style


def run_caption(services: RunnerServices, ctx: JobContext) -> dict[str, Any]:
    payload = CaptionPayload.model_validate(ctx.job.payload)
    folder = services.settings.caption_model
    if not folder:
        raise JobFailed(
            "no captioning model is configured; set ATELIER_CAPTION_MODEL to a local BLIP "
            "folder, or caption images yourself with `/style caption`"
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
    ctx.post(
        result_key(ctx.job.id),
        f"Auto-captioned {written} of {len(images)} images of **{style.name}**; "
        f"see them with `/style review {style.name}` and fix any with `/style caption`.",
    )
    return {"captioned": written, "skipped_human": len(images) - len(todo)}
