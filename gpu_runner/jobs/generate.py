"""The `generate` job: render a /imagine request (plus compatible queued ones, batched)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from gpu_runner import failpoints
from gpu_runner.generation import USER_ERRORS, GeneratedImage, GenerationRequest, GenerationResult
from gpu_runner.prompts import AdapterInfo, AdapterUse
from gpu_runner.services import RunnerServices
from gpu_runner.worker import JobContext, JobFailed, JobStopped
from storage.job_payloads import GeneratePayload, GenerationMode, result_key
from storage.models import Generation, ModelVersion, Style
from storage.outbox import Attachment
from storage.queue import JobView, LeaseLost
from storage.result_buttons import result_buttons

log = logging.getLogger(__name__)

# Queued requests that share one pipeline call's settings (their batch key) run together,
# at most this many: a burst of /imagine requests is drawn in one go.
MAX_BATCH_JOBS = 8


def run_generate(services: RunnerServices, ctx: JobContext) -> dict[str, Any]:
    jobs = [ctx.job]
    if ctx.job.batch_key:
        ctx.extra_jobs = services.queue.claim_batch(
            ctx.worker_id,
            ctx.job.batch_key,
            limit=MAX_BATCH_JOBS - 1,
            memory_mb=services.memory_mb,
        )
        jobs += ctx.extra_jobs
    requests: list[GenerationRequest | Exception] = []
    for job in jobs:
        try:
            requests.append(_request(services, job))
        except JobFailed as exc:
            requests.append(exc)

    def on_step(step: int, total: int) -> None:
        failpoints.hit("mid_generation")
        if ctx.should_stop():
            raise JobStopped("canceled")

    valid = [r for r in requests if isinstance(r, GenerationRequest)]
    outcomes = iter(services.generator.generate_many(valid, on_step=on_step) if valid else [])
    results = [r if isinstance(r, Exception) else next(outcomes) for r in requests]

    for job, outcome in zip(jobs[1:], results[1:], strict=True):
        _settle_extra(services, ctx, job, outcome)
    own = results[0]
    if isinstance(own, Exception):
        raise JobFailed(_user_message(own))
    return _record(services, ctx.job, own)


def _request(services: RunnerServices, job: JobView) -> GenerationRequest:
    payload = GeneratePayload.model_validate(job.payload)
    team_id = payload.reply.team_id
    uses = tuple(
        AdapterUse(_adapter(services, team_id, choice.model_version_id), choice.weight)
        for choice in payload.adapters
    )
    return GenerationRequest(
        prompt=payload.prompt,
        base_model=payload.base_model,
        negative_prompt=payload.negative_prompt,
        seed=payload.seed,
        steps=payload.steps,
        cfg=payload.cfg,
        width=payload.width,
        height=payload.height,
        sampler=payload.sampler,
        count=payload.count,
        adapters=uses,
        compare=payload.compare,
        extra={
            "job_id": job.id,
            "requester": payload.reply.requester,
            "mode": str(payload.mode),
            "parent_generation_id": payload.parent_generation_id,
        },
        init_image=_init_image(services, payload),
        strength=payload.strength,
    )


def _init_image(services: RunnerServices, payload: GeneratePayload) -> bytes | None:
    if payload.init_image is None:
        return None
    if not services.blobs.exists(payload.init_image):
        raise JobFailed(
            "the picture to start from is missing from the data folder; attach it again"
        )
    return services.blobs.read_bytes(payload.init_image)


def _adapter(services: RunnerServices, team_id: int, model_version_id: int) -> AdapterInfo:
    with services.db.session() as s:
        row = s.execute(
            select(ModelVersion, Style)
            .join(Style, ModelVersion.style_id == Style.id)
            .where(ModelVersion.id == model_version_id, Style.team_id == team_id)
        ).first()
    if row is None:  # gone, or another team's: never reachable from here
        raise JobFailed(
            f"model version {model_version_id} is not available to this team; "
            "check `/style info` for the style's current model"
        )
    version, style = row
    blob = version.embedding_blob or version.kohya_blob
    if blob is None or not services.blobs.exists(blob):
        raise JobFailed(
            f"the trained files of style '{style.name}' are missing from the data folder; "
            f"train it again with `/style train {style.name}`"
        )
    render = version.diffusers_blob if not version.embedding_blob else None
    if render is not None and not services.blobs.exists(render):
        render = None
    return AdapterInfo(
        name=style.name,
        path=str(services.adapter_file(blob)),
        trigger=style.trigger,
        kind="embedding" if version.embedding_blob else "lora",
        sha256=blob,
        render_path=str(services.adapter_file(render)) if render else None,
    )


def _user_message(exc: Exception) -> str:
    if isinstance(exc, (JobFailed, *USER_ERRORS)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _settle_extra(
    services: RunnerServices,
    ctx: JobContext,
    job: JobView,
    outcome: GenerationResult | Exception,
) -> None:
    try:
        if isinstance(outcome, Exception):
            message = _user_message(outcome)
            ctx.post_for(job, result_key(job.id), f"Job {job.id} (generate) failed: {message}")
            services.queue.fail(job.id, ctx.worker_id, message, retryable=False)
        else:
            services.queue.complete(job.id, ctx.worker_id, _record(services, job, outcome))
    except LeaseLost:
        log.warning("batched job %s was taken over before it was recorded", job.id)
    finally:
        ctx.extra_jobs.remove(job)


def _record(services: RunnerServices, job: JobView, result: GenerationResult) -> dict[str, Any]:
    """Store the images, the Generation row and the result message; return the job result."""
    failpoints.hit("before_outputs")
    payload = GeneratePayload.model_validate(job.payload)
    request = result.request
    shown = result.comparisons or result.images
    stored = [_store(services, image) for image in result.images]
    compared = bool(result.comparisons)
    attachments = tuple(
        Attachment(_store(services, image), _filename(job.id, image, compared=compared))
        for image in shown
    )
    record = dict(result.images[0].record) if result.images else {}
    with services.db.session(write=True) as s:
        earlier = s.scalar(select(Generation).where(Generation.job_id == job.id))
        if earlier is not None:  # a crashed try got this far: record nothing twice
            return _job_result(earlier)
        generation = Generation(
            team_id=payload.reply.team_id,
            job_id=job.id,
            requester=payload.reply.requester,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=request.seed or 0,
            steps=request.steps,
            cfg=request.cfg,
            width=request.width,
            height=request.height,
            sampler=request.sampler,
            base_model=request.base_model,
            adapters=[a.model_dump() for a in payload.adapters],
            image_blobs=stored,
            record=record,
            mode=str(payload.mode),
            parent_generation_id=payload.parent_generation_id,
        )
        s.add(generation)
        s.flush()
        services.outbox.put(
            result_key(job.id),
            platform=payload.reply.platform,
            channel=payload.reply.channel,
            thread=payload.reply.thread,
            team_id=payload.reply.team_id,
            text=_result_text(payload, result),
            attachments=attachments,
            extra={
                "seed": result.seeds,
                "parameters": _parameters(payload, result),
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "generation_id": generation.id,
                "parent_generation_id": payload.parent_generation_id,
                "buttons": result_buttons(generation.id, len(stored)),
            },
            session=s,
        )
        result_row = _job_result(generation)
    failpoints.hit("after_outputs")
    return result_row


def _job_result(generation: Generation) -> dict[str, Any]:
    seeds = [(generation.seed + i) % 2**32 for i in range(len(generation.image_blobs))]
    return {"generation_id": generation.id, "seeds": seeds, "images": generation.image_blobs}


def _store(services: RunnerServices, image: GeneratedImage) -> str:
    return services.blobs.put_bytes(image.png).sha256


def _filename(job_id: int, image: GeneratedImage, *, compared: bool) -> str:
    suffix = "-base-vs-style" if compared else ""
    return f"atelier-{job_id}-seed{image.seed}{suffix}.png"


def _parameters(payload: GeneratePayload, result: GenerationResult) -> dict[str, Any]:
    request = result.request
    return {
        "steps": request.steps,
        "cfg": request.cfg,
        "size": f"{request.width}x{request.height}",
        "sampler": request.sampler,
        "model": request.base_model,
        "loras": ", ".join(f"{a.name}:{a.weight:g}" for a in payload.adapters) or "none",
    }


def _result_text(payload: GeneratePayload, result: GenerationResult) -> str:
    request = result.request
    seeds = ", ".join(str(seed) for seed in result.seeds)
    styles = ", ".join(f"{a.name} ({a.weight:g})" for a in payload.adapters) or "none"
    family = f" ({result.family_label})" if result.family_label else ""
    lines = [
        f"**{request.prompt}**",
        f"Seed {seeds} · {request.steps} steps · CFG {request.cfg:g} · "
        f"{request.width}x{request.height} · {request.sampler} · "
        f"model {request.base_model}{family}",
        f"Styles: {styles}",
    ]
    if request.negative_prompt:
        lines.insert(1, f"Negative: {request.negative_prompt}")
    lines.extend(result.notices)
    if result.comparisons:
        lines.append("Left: base model, right: with the style, same seed.")
    if payload.parent_generation_id is not None:
        made = _MADE_FROM.get(payload.mode, "Made")
        lines.append(f"{made} from generation #{payload.parent_generation_id}.")
    if payload.init_image is not None:
        lines.append(f"Image-to-image, strength {payload.strength or 0:g}.")
    lines.append("Buttons below (or react 🔁 for another seed).")
    return "\n".join(lines)


_MADE_FROM = {
    GenerationMode.REROLL: "Rerolled",
    GenerationMode.VARY: "Variation",
    GenerationMode.UPSCALE: "Upscaled ×2",
    GenerationMode.EDIT: "Edited",
}
