"""`/style create`, `/style list`, `/style info`, `/style export`, `/style caption`."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.commands import OutgoingFile, Reply
from bot.core import audit
from bot.core.arguments import AUTO, StyleCaptionArgs, StyleCreateArgs, StyleNameArgs
from bot.core.confusables import looks_like
from bot.core.context import Context
from bot.core.datasets import describe_version, editable_draft
from bot.core.errors import UserError
from bot.core.policy import known_base_models
from bot.core.queue_room import check_queue_room
from bot.core.teams import find_style, get_style, team_styles
from bot.core.wordlist import is_common_word
from storage.blobs import BlobNotFound
from storage.datasets import effective_captions, image_by_number, images_of, latest_version
from storage.job_payloads import CaptionPayload, JobKind, Priority
from storage.models import (
    Caption,
    CaptionSource,
    DatasetVersion,
    ModelVersion,
    Style,
    TrainingRun,
)
from storage.training_summary import buckets_text


def thread_key(style_id: int) -> str:
    """Outbox key of a style's announcement; its message becomes the style's thread."""
    return f"style:{style_id}:thread"


def create(ctx: Context, args: StyleCreateArgs) -> list[Reply]:
    base = check_base(ctx, args.base)
    with ctx.write() as tx:
        new_style(ctx, tx.session, tx.team.id, args.name, args.trigger, args.kind, base)
    text = (
        f"Created {args.kind} **{args.name}** with trigger `{args.trigger}` on {base}. "
        f"Next: `/style add {args.name}` with 10-30 images (or post them in its thread)."
    )
    if is_common_word(args.trigger):
        text += (
            f"\n⚠ `{args.trigger}` is a common word, so the style will switch on whenever "
            f"someone writes it; a made-up word such as `{args.trigger}style` or "
            f"`zx{args.trigger}` is safer (create the style again under another name to change)."
        )
    return [Reply(text)]


def check_base(ctx: Context, base: str | None) -> str:
    """The base model named (or the team default), refused when this Atelier lacks it."""
    base = base or ctx.services.policy.default_base_model
    known = known_base_models(ctx.services.settings)
    if base not in known:
        raise UserError(
            f"There is no base model '{base}' here; this Atelier knows "
            f"{', '.join(sorted(known))} (ATELIER_BASE_MODELS names more)."
        )
    return base


def new_style(
    ctx: Context, s: Session, team_id: int, name: str, trigger: str, kind: str, base: str
) -> Style:
    """Create a style (name and trigger unique in the team, also to the eye) and post its
    announcement, whose thread takes its reference images."""
    if find_style(s, team_id, name) is not None:
        raise UserError(
            f"This team already has a style named {name}; pick another name, "
            f"or see it with `/style info {name}`."
        )
    clash = s.scalar(
        select(Style).where(Style.team_id == team_id, func.lower(Style.trigger) == trigger.lower())
    )
    if clash is not None:
        raise UserError(
            f"The trigger {trigger} already switches on style {clash.name}; each "
            "trigger must be unique in the team, so pick another made-up word."
        )
    for other in team_styles(s, team_id):
        if looks_like(name, other.name):
            raise UserError(
                f"The name {name} looks the same as the style {other.name} (letters from "
                "another alphabet or full-width forms); pick a name that reads differently."
            )
        if looks_like(trigger, other.trigger):
            raise UserError(
                f"The trigger {trigger} looks the same as {other.trigger}, the trigger of "
                f"{other.name} (letters from another alphabet or full-width forms); pick a "
                "made-up word that reads differently."
            )
    style = Style(
        team_id=team_id,
        name=name,
        trigger=trigger,
        kind=kind,
        base_model=base,
        owner=ctx.actor.user_id,
        channel_ref=ctx.channel,
    )
    s.add(style)
    s.flush()
    ctx.services.outbox.put(
        thread_key(style.id),
        platform=ctx.platform,
        channel=ctx.channel,
        thread=ctx.thread,
        team_id=team_id,
        text=(
            f"🎨 **{style.name}** ({style.kind}, trigger `{style.trigger}`, base "
            f"{style.base_model}). Post reference images in this thread, or use "
            f"`/style add {style.name}` with attachments."
        ),
        extra={
            "kind": "style_thread",
            "style_id": style.id,
            "start_thread": True,
            "thread_name": f"{style.name} references",
        },
        session=s,
    )
    audit.record(
        s,
        team_id=team_id,
        actor=ctx.actor.user_id,
        action="style.create",
        object_type="style",
        object_id=style.id,
        detail={"name": style.name, "trigger": style.trigger, "base": base},
    )
    return style


def caption(ctx: Context, args: StyleCaptionArgs) -> list[Reply]:
    if args.number == AUTO:
        return auto_caption(ctx, args.name)
    assert isinstance(args.number, int)
    with ctx.write() as tx:
        s = tx.session
        style = get_style(s, tx.team.id, args.name, lock=True)
        latest = latest_version(s, style.id)
        image = None if latest is None else image_by_number(s, latest.id, args.number)
        if latest is None or image is None or image.dropped:
            where = f"v{latest.version}" if latest else "its dataset"
            raise UserError(
                f"{style.name} {where} has no image #{args.number}; `/style info {style.name}` "
                "or the review sheet shows the numbers."
            )
        editable = editable_draft(s, style, ctx.actor.user_id)
        target = image_by_number(s, editable.draft.id, args.number)
        assert target is not None  # the draft copies every kept image with its number
        s.add(
            Caption(
                image_id=target.id,
                text=args.text,
                source=CaptionSource.HUMAN,
                author=ctx.actor.user_id,
            )
        )
        audit.record(
            s,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action="caption.set",
            object_type="reference_image",
            object_id=target.id,
            detail={"style": style.name, "number": args.number, "text": args.text},
        )
        text = (
            f"Caption of {style.name} #{args.number} (draft v{editable.draft.version}): {args.text}"
        )
        if editable.copied_from is not None:
            old = editable.copied_from
            text += (
                f"\nv{old.version} is {old.status.replace('_', ' ')}, so this edit started "
                f"draft v{editable.draft.version}."
            )
    return [Reply(text)]


def auto_caption(ctx: Context, name: str) -> list[Reply]:
    """Queue the captioning model on the draft's images that no person captioned."""
    if not ctx.services.settings.caption_model:
        raise UserError(
            "No captioning model is set up: set ATELIER_CAPTION_MODEL to a local captioning "
            f"model folder, or caption images yourself with `/style caption {name} N text`."
        )
    with ctx.write() as tx:
        s = tx.session
        style = get_style(s, tx.team.id, name, lock=True)
        if latest_version(s, style.id) is None:
            raise UserError(f"{style.name} has no images yet; add some with `/style add {name}`.")
        check_queue_room(ctx, s, tx.team.id)  # before editable_draft may open a new draft
        editable = editable_draft(s, style, ctx.actor.user_id)
        kept = images_of(s, editable.draft.id)
        captions = effective_captions(s, (i.id for i in kept))
        todo = [i for i in kept if captions.get(i.id) is None or captions[i.id].source != "human"]
        if not todo:
            raise UserError(
                f"Every image of {style.name} has a person's caption already; auto captions "
                "never replace those."
            )
        payload = CaptionPayload(
            reply=ctx.reply_target(tx.team.id), dataset_version_id=editable.draft.id
        )
        job = ctx.services.queue.enqueue(
            JobKind.CAPTION,
            payload.model_dump(mode="json"),
            requester=ctx.actor.user_id,
            priority=Priority.CAPTION,
            idempotency_key=ctx.idempotency_key,
            team_id=tx.team.id,
            session=s,
        )
        audit.record(
            s,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action="caption.auto.request",
            object_type="dataset_version",
            object_id=editable.draft.id,
            detail={"style": style.name, "images": len(todo), "job": job.id},
        )
        version = editable.draft.version
    return [
        Reply(
            f"🏷 Queued auto captions for {len(todo)} image(s) of {style.name} draft v{version}: "
            f"job #{job.id}. Captions people wrote stay; auto ones are marked on the cards."
        )
    ]


def list_styles(ctx: Context, _args: object) -> list[Reply]:
    with ctx.write() as tx:
        s = tx.session
        styles = team_styles(s, tx.team.id)
        lines = [_summary_line(s, style) for style in styles]
    if not lines:
        return [Reply("This team has no styles yet: `/style create name trigger` starts one.")]
    return [Reply("Styles:\n" + "\n".join(lines))]


def _latest_model(s: Session, style_id: int) -> ModelVersion | None:
    return s.scalar(
        select(ModelVersion)
        .where(ModelVersion.style_id == style_id)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )


def _summary_line(s: Session, style: Style) -> str:
    model = _latest_model(s, style.id)
    model_text = "not trained yet" if model is None else f"model v{model.version}"
    if model is not None and model.approved_by:
        model_text += " (approved)"
    dataset = describe_version(s, latest_version(s, style.id))
    return f"• **{style.name}** `{style.trigger}` ({style.kind}): dataset {dataset}; {model_text}"


def info(ctx: Context, args: StyleNameArgs) -> list[Reply]:
    with ctx.write() as tx:
        s = tx.session
        style = get_style(s, tx.team.id, args.name)
        lines = [
            f"**{style.name}**: {style.kind}, trigger `{style.trigger}`, base {style.base_model}, "
            f"owner {style.owner}"
        ]
        datasets = list(
            s.scalars(
                select(DatasetVersion)
                .where(DatasetVersion.style_id == style.id)
                .order_by(DatasetVersion.version)
            )
        )
        for dataset in datasets[-5:]:
            lines.append("Dataset " + describe_version(s, dataset) + _reviewed(dataset))
        if datasets:
            latest = datasets[-1]
            kept = images_of(s, latest.id)
            captions = effective_captions(s, (i.id for i in kept))
            for image in kept[:30]:
                cap = captions.get(image.id)
                cap_text = f"{cap.text} ({cap.source})" if cap else "no caption"
                lines.append(f"  #{image.position} {image.original_name}: {cap_text}")
            if len(kept) > 30:
                lines.append(f"  … and {len(kept) - 30} more")
        models = list(
            s.scalars(
                select(ModelVersion)
                .where(ModelVersion.style_id == style.id)
                .order_by(ModelVersion.version)
            )
        )
        for model in models[-5:]:
            approved = f", approved by {model.approved_by}" if model.approved_by else ""
            buckets = buckets_text(model.validation.get("buckets", {}))
            lines.append(
                f"Model v{model.version} ({model.method}, {model.base_model}{approved})"
                + (f": {buckets}" if buckets else "")
            )
        run = s.scalar(
            select(TrainingRun)
            .where(TrainingRun.style_id == style.id)
            .order_by(TrainingRun.id.desc())
            .limit(1)
        )
        if run is not None:
            detail = f": {run.error}" if run.error else ""
            job = f", job #{run.job_id}" if run.job_id else ""
            lines.append(f"Last training run: {run.status}{job}{detail}")
    return [Reply("\n".join(lines))]


def _reviewed(dataset: DatasetVersion) -> str:
    if dataset.reviewed_by:
        return f" ({dataset.status.replace('_', ' ')} by {dataset.reviewed_by})"
    return ""


# Where each tool wants the files (stated once, shown with every export).
_KOHYA_HELP = (
    "kohya format: ComfyUI → models/loras; A1111/Forge → models/Lora; "
    "InvokeAI → Model Manager → Import (path to the file)"
)
_DIFFUSERS_HELP = (
    "diffusers format: pipe.load_lora_weights(folder, weight_name=...) in your own scripts"
)
# Which tools apply a DoRA as trained (gpu_runner/training/dora.py says why).
_DORA_HELP = (
    "DoRA: ComfyUI and Forge apply the kohya file's weight decomposition as trained, and "
    "the diffusers file keeps it exactly; A1111 and InvokeAI do not render a DoRA as "
    "trained, so use ComfyUI or Forge there"
)
_EMBEDDING_HELP = (
    "textual-inversion embedding: ComfyUI → models/embeddings; A1111/Forge → embeddings; "
    "InvokeAI → Model Manager → Import"
)


def export(ctx: Context, args: StyleNameArgs) -> list[Reply]:
    with ctx.write() as tx:
        s = tx.session
        style = get_style(s, tx.team.id, args.name)
        model = _latest_model(s, style.id)
        if model is None:
            raise UserError(
                f"{style.name} has no trained model yet; `/style train {style.name}` makes one "
                "once its dataset is approved."
            )
        wanted = [
            (model.kohya_blob, f"{style.trigger}.safetensors", _KOHYA_HELP),
            (model.diffusers_blob, f"{style.trigger}-diffusers.safetensors", _DIFFUSERS_HELP),
            (model.embedding_blob, f"{style.trigger}-embedding.safetensors", _EMBEDDING_HELP),
        ]
        audit.record(
            s,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action="model.export",
            object_type="model_version",
            object_id=model.id,
            detail={"style": style.name, "version": model.version},
        )
        version, name, trigger = model.version, style.name, style.trigger
        is_dora = model.method == "dora"
    files: list[OutgoingFile] = []
    lines = [f"**{name}** model v{version} (trigger `{trigger}`):"]
    for blob, filename, where in wanted:
        if not blob:
            continue
        try:
            files.append(OutgoingFile(filename, ctx.services.blobs.read_bytes(blob)))
        except BlobNotFound:
            lines.append(f"• {filename}: missing from storage; ask whoever runs Atelier")
            continue
        lines.append(f"• {filename}: {where}")
    if is_dora and files:
        lines.append(f"• {_DORA_HELP}")
    if not files:
        raise UserError(
            f"{name} model v{version} has no files in storage; train it again with "
            f"`/style train {name}`."
        )
    return [Reply("\n".join(lines), files=files)]
