"""`/style train`: a TrainingRun and its `train` job, created in one transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from bot.commands import Reply
from bot.core import audit
from bot.core.arguments import StyleTrainArgs
from bot.core.context import Context
from bot.core.datasets import plural
from bot.core.errors import UserError
from bot.core.queue_room import check_queue_room
from bot.core.teams import get_style
from storage.datasets import images_of, latest_approved, latest_version
from storage.families import (
    MethodNotSupportedError,
    check_layer_set,
    check_text_encoder_lora,
    check_training_method,
    memory_needed_mb,
    model_family,
)
from storage.job_payloads import JobKind, Priority, TrainPayload
from storage.models import (
    DatasetStatus,
    DatasetVersion,
    Job,
    JobStatus,
    RunStatus,
    Style,
    TrainingMethod,
    TrainingRun,
)


def train(ctx: Context, args: StyleTrainArgs) -> list[Reply]:
    services = ctx.services
    method = args.method or TrainingMethod.LORA
    if method == TrainingMethod.TEXTUAL_INVERSION and args.rank is not None:
        raise UserError("rank applies to LoRA and DoRA only; leave it out for method=ti.")
    if method == TrainingMethod.TEXTUAL_INVERSION and args.quantize not in (None, "none"):
        raise UserError("quantize applies to LoRA and DoRA only; leave it out for method=ti.")
    if method == TrainingMethod.TEXTUAL_INVERSION and args.layers is not None:
        raise UserError("layers applies to LoRA and DoRA only; leave it out for method=ti.")
    if method == TrainingMethod.TEXTUAL_INVERSION and args.text_encoder is not None:
        raise UserError("text_encoder applies to LoRA and DoRA only; leave it out for method=ti.")
    if method != TrainingMethod.TEXTUAL_INVERSION and args.init_word is not None:
        raise UserError(
            "init_word is the word a textual inversion's new token starts from: use it with "
            "method=ti, or leave it out."
        )
    if args.steps is not None and args.epochs is not None:
        raise UserError("Give steps or epochs, not both: epochs sets the steps from the images.")
    if args.optimizer == "prodigy" and args.lr is not None:
        raise UserError(
            "Prodigy sets its own learning rate; leave lr out, or use optimizer=adamw with it."
        )
    with ctx.write() as tx:
        s, team = tx.session, tx.team
        style = get_style(s, team.id, args.name, lock=True)
        try:
            family = model_family(style.base_model, services.settings.base_models)
            check_training_method(family, method)
            if args.layers is not None:
                check_layer_set(family, args.layers)
            if args.text_encoder == "on":
                check_text_encoder_lora(family)
        except MethodNotSupportedError as exc:
            raise UserError(f"{style.name} is on {style.base_model}: {exc}.") from None
        check_queue_room(ctx, s, team.id)
        approved = latest_approved(s, style.id)
        latest = latest_version(s, style.id)
        if approved is None:
            count = len(images_of(s, latest.id)) if latest else 0
            raise UserError(_what_is_missing(ctx, style, latest, count))
        kept = images_of(s, approved.id)
        if not kept:
            raise UserError(f"{style.name} v{approved.version} has no images left to train on.")
        active = s.scalar(
            select(TrainingRun)
            .join(Job, TrainingRun.job_id == Job.id)
            .where(
                TrainingRun.style_id == style.id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            )
        )
        if active is not None:
            raise UserError(
                f"{style.name} is already training (job #{active.job_id}); wait for it or "
                f"`/cancel {active.job_id}` first."
            )
        params: dict[str, Any] = {
            k: v
            for k, v in {
                "preset": args.preset or style.kind,
                "steps": args.steps,
                "rank": args.rank,
                "learning_rate": args.lr,
                "quantize": args.quantize,
                "layers": args.layers,
                "optimizer": args.optimizer,
                "flip": None if args.flip is None else args.flip == "on",
                "noise_offset": args.noise_offset,
                "gradient_accumulation": args.accumulate,
                "caption_shuffle": None if args.shuffle is None else args.shuffle == "on",
                "keep_tags": args.keep_tags,
                "epochs": args.epochs,
                "train_text_encoder": (
                    None if args.text_encoder is None else args.text_encoder == "on"
                ),
                "output_preservation": args.preserve,
                "min_timestep": args.min_timestep,
                "max_timestep": args.max_timestep,
                "initializer_token": args.init_word,
            }.items()
            if v is not None
        }
        run = TrainingRun(
            style_id=style.id,
            dataset_version_id=approved.id,
            method=method,
            params=params,
            status=RunStatus.QUEUED,
            requested_by=ctx.actor.user_id,
        )
        s.add(run)
        s.flush()
        payload = TrainPayload(
            reply=ctx.reply_target(team.id, thread=ctx.thread or style.thread_ref),
            training_run_id=run.id,
        )
        job = services.queue.enqueue(
            JobKind.TRAIN,
            payload.model_dump(mode="json"),
            requester=ctx.actor.user_id,
            priority=Priority.TRAIN,
            idempotency_key=f"{ctx.idempotency_key}:train",
            team_id=team.id,
            base_model=style.base_model,
            min_memory_mb=memory_needed_mb(
                JobKind.TRAIN,
                style.base_model,
                services.settings.base_models,
                method=method,
                preset=params["preset"],
                rank=params.get("rank"),
                quantize=params.get("quantize", "none"),
            ),
            session=s,
        )
        run.job_id = job.id
        audit.record(
            s,
            team_id=team.id,
            actor=ctx.actor.user_id,
            action="training.request",
            object_type="training_run",
            object_id=run.id,
            detail={
                "style": style.name,
                "dataset_version": approved.version,
                "content_hash": approved.content_hash,
                "method": method,
                "params": params,
                "job": job.id,
            },
        )
        settings = "".join(f", {k} {v}" for k, v in params.items() if k != "preset")
        head = (
            f"🏋 Training **{style.name}** ({method}, preset {params['preset']}{settings}) on "
            f"approved dataset v{approved.version} ({plural(len(kept), 'image')}), base "
            f"{style.base_model}: job #{job.id}"
        )
        note = ""
        if latest is not None and latest.id != approved.id:
            note = (
                f"\nNote: v{latest.version} ({latest.status.replace('_', ' ')}) is newer but not "
                "approved, so it is not used."
            )
    position = services.queue.position(job.id)  # after commit: other connections see the job
    where = f", {ordinal(position)} in line" if position else ""
    return [Reply(f"{head}{where}. Progress is posted as it goes.{note}")]


def _what_is_missing(ctx: Context, style: Style, latest: DatasetVersion | None, n: int) -> str:
    name = style.name
    leads = ctx.services.leads.describe(ctx.platform)
    if latest is None:
        return (
            f"{name} has no approved dataset yet (no images at all). To train: "
            f"`/style add {name}` with 10-30 images, `/style review {name}`, then an art lead "
            "reacts ✅ on the sheet."
        )
    images = plural(n, "image")
    if latest.status == DatasetStatus.DRAFT:
        return (
            f"{name} has no approved dataset: v{latest.version} is a draft with {images}. Run "
            f"`/style review {name}`, then an art lead ({leads}) reacts ✅ on the sheet."
        )
    if latest.status == DatasetStatus.IN_REVIEW:
        return (
            f"{name} has no approved dataset: v{latest.version} ({images}) is waiting for an "
            f"art lead's ✅ on its review sheet (leads: {leads})."
        )
    return (
        f"{name} has no approved dataset: v{latest.version} was rejected by "
        f"{latest.reviewed_by}. Change it (`/style add`, `/style caption`) and "
        f"`/style review {name}` again."
    )


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
