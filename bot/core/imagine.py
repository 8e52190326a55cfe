"""`/imagine`: choose the styles' model versions and queue a `generate` job, from a text
prompt or image-to-image from an attached picture. Buttons and 🔁 on results: bot.core.results.

A style's trigger word in the prompt (whole word, any case) applies its model at weight 1;
A1111's `<lora:name:0.8>` applies a style by name or trigger with a weight (the rules are
storage.prompt_rules, shared with the runner). Each style uses its latest approved model
version, else its latest one. The prompt goes to the runner as written; the adapter list is
authoritative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.commands import IncomingFile, Reply
from bot.core import audit
from bot.core.arguments import ImagineArgs
from bot.core.context import Context
from bot.core.errors import AuditNote, Refused, UserError
from bot.core.policy import CorePolicy
from bot.core.queue_room import check_queue_room
from bot.core.teams import team_styles
from bot.core.training import ordinal
from bot.core.uploads import check_file
from storage.families import (
    SizeOffGridError,
    aspect_size,
    check_size,
    generation_defaults,
    memory_needed_mb,
    model_family,
    trigger_weight,
)
from storage.ingest import PreparedImage
from storage.job_payloads import (
    AdapterChoice,
    GeneratePayload,
    GenerationMode,
    JobKind,
    Priority,
    batch_key,
)
from storage.models import ModelVersion, Style
from storage.prompt_rules import PromptError, find_trigger, lora_tags, strip_lora_tags, tag_names

REROLL = "🔁"
# Image-to-image from an attached picture without strength=: repaint a bit over half of it.
DEFAULT_STRENGTH = 0.6


@dataclass(frozen=True)
class Selection:
    adapters: list[AdapterChoice]
    base_model: str


def imagine(ctx: Context, args: ImagineArgs, files: Sequence[IncomingFile] = ()) -> list[Reply]:
    services = ctx.services
    check_blocklist(ctx, args.prompt)
    init = _init_image(ctx, args, files)
    with ctx.write() as tx:
        s, team = tx.session, tx.team
        chosen = select_adapters(s, team.id, args.prompt, services.policy)
        if args.compare and not chosen.adapters:
            raise UserError(
                "compare puts the base model and a style side by side: put a style's trigger "
                "word in the prompt (`/style list` shows them)."
            )
        options: dict[str, object] = {
            "seed": args.seed,
            "steps": args.steps,
            "cfg": args.cfg,
            "count": args.count,
        }
        if args.size is not None:
            family = model_family(chosen.base_model, services.settings.base_models)
            try:
                check_size(family, *args.size)
            except SizeOffGridError as exc:
                raise UserError(f"{exc}.") from None
            options["width"], options["height"] = args.size
        elif args.ar is not None or init is not None:
            # The family's native size at the requested shape, or at the picture's own.
            ratio = args.ar or (init.width, init.height)  # type: ignore[union-attr]
            options["width"], options["height"] = aspect_size(
                chosen.base_model, services.settings.base_models, ratio
            )
        if init is not None:
            options["init_image"] = init.png_sha256
            options["strength"] = args.strength or DEFAULT_STRENGTH
            options["mode"] = GenerationMode.IMG2IMG
        try:
            payload = GeneratePayload(
                reply=ctx.reply_target(team.id),
                prompt=args.prompt,
                negative_prompt=args.negative,
                base_model=chosen.base_model,
                adapters=chosen.adapters,
                compare=args.compare,
                **{k: v for k, v in options.items() if v is not None},
            ).with_defaults(generation_defaults(chosen.base_model, services.settings.base_models))
        except ValidationError as exc:
            raise UserError(f"That request can't run: {exc.errors()[0]['msg']}.") from None
        job = enqueue_generation(ctx, s, team.id, payload, ctx.idempotency_key)
        audit.record(
            s,
            team_id=team.id,
            actor=ctx.actor.user_id,
            action="generate.request",
            object_type="job",
            object_id=job,
            detail={"prompt": args.prompt[:500], "adapters": [a.name for a in chosen.adapters]},
        )
    return [Reply(queued_text(ctx, job, payload))]


def enqueue_generation(
    ctx: Context, s: Session, team_id: int, payload: GeneratePayload, key: str
) -> int:
    check_queue_room(ctx, s, team_id)
    job = ctx.services.queue.enqueue(
        JobKind.GENERATE,
        payload.model_dump(mode="json"),
        requester=ctx.actor.user_id,
        priority=Priority.GENERATE,
        idempotency_key=key,
        team_id=team_id,
        base_model=payload.base_model,
        min_memory_mb=memory_needed_mb(
            JobKind.GENERATE,
            payload.base_model,
            ctx.services.settings.base_models,
            width=payload.width,
            height=payload.height,
            count=payload.count,
        ),
        batch_key=batch_key(payload),
        session=s,
    )
    return job.id


def queued_text(ctx: Context, job_id: int, payload: GeneratePayload) -> str:
    position = ctx.services.queue.position(job_id)
    where = f", {ordinal(position)} in line" if position else ""
    styles = ", ".join(f"{a.name} ×{a.weight:g}" for a in payload.adapters) or "no style"
    images = "1 image" if payload.count == 1 else f"{payload.count} images"
    seed = "random seed" if payload.seed is None else f"seed {payload.seed}"
    prompt = payload.prompt if len(payload.prompt) <= 80 else payload.prompt[:79] + "…"
    parent = (
        f" from generation #{payload.parent_generation_id}" if payload.parent_generation_id else ""
    )
    size = f"{payload.width}x{payload.height}"
    init = f", strength {payload.strength:g}" if payload.init_image else ""
    return (
        f"🎨 Queued {images} of “{prompt}”{parent} ({styles}; {payload.base_model}, {size}, "
        f"{seed}{init}): job #{job_id}{where}. Results are posted here with their seed and "
        "settings."
    )


def _init_image(
    ctx: Context, args: ImagineArgs, files: Sequence[IncomingFile]
) -> PreparedImage | None:
    """The attached starting picture, through the same intake checks as references, stored
    as a blob before the transaction; None without one."""
    if not files:
        if args.strength is not None:
            raise UserError(
                "strength is for image-to-image: attach an image (Slack: post it in a thread "
                "with the command as its text), or leave strength out."
            )
        return None
    if len(files) > 1:
        raise UserError("Attach one image to start from; that was several.")
    checked = check_file(files[0], ctx.services.limits)
    if checked.prepared is None:
        raise UserError(f"{checked.refusal} (no image was queued)")
    ctx.services.blobs.put_bytes(checked.prepared.png)
    return checked.prepared


def check_blocklist(ctx: Context, prompt: str) -> None:
    term = ctx.services.blocklist.find(prompt)
    if term is not None:
        raise Refused(
            f"That prompt uses “{term}”, which this team's blocklist does not allow; "
            "rephrase it and try again.",
            AuditNote("generate.refused", "prompt", None, {"term": term, "prompt": prompt[:500]}),
        )


def select_adapters(s: Session, team_id: int, prompt: str, policy: CorePolicy) -> Selection:
    """The team's styles the prompt asks for, with their model versions and the base model.

    By the rules the runner captions and renders with (storage.prompt_rules): a trigger as
    a whole word in any case (at its base model's trigger weight), or `<lora:NAME:w>`
    naming a style's name or trigger (the trigger is what Atelier's own infotext writes, so
    a pasted result selects its style).
    """
    styles = team_styles(s, team_id)
    weights: dict[int, float | None] = {}  # None: chosen by its trigger word
    try:
        tags = lora_tags(prompt)
    except PromptError as exc:
        raise UserError(f"{exc}.") from None
    for tag in tags:
        style = next((x for x in styles if tag_names(tag, x.name, x.trigger)), None)
        if style is None:
            raise UserError(f"{tag.text} names no style in this team; `/style list` shows them.")
        if style.id in weights:
            raise UserError(f"{style.name} is named twice in <lora:...> tags; keep one.")
        weights[style.id] = tag.weight
    plain = strip_lora_tags(prompt)
    for style in styles:
        if style.id not in weights and find_trigger(style.trigger, plain) is not None:
            weights[style.id] = None
    if len(weights) > policy.max_adapters:
        raise UserError(
            f"That prompt selects {len(weights)} styles; combine at most {policy.max_adapters}."
        )
    by_id = {style.id: style for style in styles}
    adapters: list[AdapterChoice] = []
    bases: dict[str, str] = {}
    for style_id, weight in weights.items():
        style = by_id[style_id]
        model = model_for(s, style)
        if model is None:
            raise UserError(
                f"`{style.trigger}` is the trigger of {style.name}, which has no trained model "
                f"yet; train it with `/style train {style.name}` (once its dataset is approved), "
                "or leave the word out."
            )
        if weight is None:  # a trigger word: the weight its base model's styles take
            weight = trigger_weight(model.base_model)
        adapters.append(
            AdapterChoice(
                model_version_id=model.id, name=style.name, trigger=style.trigger, weight=weight
            )
        )
        bases[style.name] = model.base_model
    if len(set(bases.values())) > 1:
        detail = ", ".join(f"{name} on {base}" for name, base in bases.items())
        raise UserError(
            f"Those styles were trained on different base models ({detail}); combine styles "
            "trained on the same one."
        )
    base = next(iter(bases.values())) if bases else policy.default_base_model
    return Selection(adapters, base)


def model_for(s: Session, style: Style) -> ModelVersion | None:
    """The model version a lead approved (or picked with `/style use`) last, else the
    style's latest one."""
    newest_first = (ModelVersion.version.desc(),)
    approved = s.scalar(
        select(ModelVersion)
        .where(ModelVersion.style_id == style.id, ModelVersion.approved_at.is_not(None))
        .order_by(ModelVersion.approved_at.desc(), *newest_first)
        .limit(1)
    )
    if approved is not None:
        return approved
    return s.scalar(
        select(ModelVersion)
        .where(ModelVersion.style_id == style.id)
        .order_by(*newest_first)
        .limit(1)
    )
