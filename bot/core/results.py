"""The buttons under a result: Reroll, Vary, Upscale, Edit and Delete (and 🔁, a reroll).

Every action starts from the Generation row the button names (its id is in the button,
storage.result_buttons), so buttons keep working after a restart. New work is queued as a
`generate` job recording its parent generation; Delete marks the row (it is kept for the
audit trail) and replaces the result message with a note saying who deleted it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.commands import Form, FormField, Reply
from bot.core import audit
from bot.core.arguments import ImagineArgs, validate_args
from bot.core.context import Context, Tx
from bot.core.errors import AuditNote, Refused, UserError
from bot.core.imagine import check_blocklist, enqueue_generation, queued_text, select_adapters
from bot.core.teams import find_team
from storage.families import aspect_size
from storage.job_payloads import GeneratePayload, GenerationMode, ReplyTarget, result_key
from storage.models import Generation, Job, OutboxMessage, Team, utcnow
from storage.result_buttons import UPSCALE_FACTOR, UPSCALE_STRENGTH, VARY_STRENGTH, ButtonId

_RESULT_KEY = re.compile(r"job:(\d+):result")
MAX_SIDE = 2048  # GeneratePayload's bound
_VERBS = {
    "reroll": "🔁",
    "vary-subtle": "🎨 Variation:",
    "vary-strong": "🎨 Variation:",
    "upscale": "🔍 Upscale ×2:",
    "edit": "✏️ Edited:",
}


def press(ctx: Context, button: ButtonId, values: Mapping[str, str]) -> list[Reply]:
    """Act on a pressed button (or a submitted edit form) in one transaction."""
    with ctx.write() as tx:
        generation = _generation(tx, button.generation_id)
        if button.action == "delete":
            return [_delete(ctx, tx, generation)]
        original = _payload(tx, generation)
        check_blocklist(ctx, values.get("prompt") or original.prompt)
        try:
            payload = _derive(ctx, tx, generation, original, button, values)
        except ValidationError as exc:
            raise UserError(f"That request can't run: {exc.errors()[0]['msg']}.") from None
        job = enqueue_generation(ctx, tx.session, tx.team.id, payload, ctx.idempotency_key)
        audit.record(
            tx.session,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action=f"generate.{payload.mode}",
            object_type="job",
            object_id=job,
            detail={
                "of_generation": generation.id,
                "of_job": generation.job_id,
                "button": button.encode(),
            },
        )
    text = queued_text(ctx, job, payload).removeprefix("🎨 ")
    return [Reply(f"{_VERBS[button.action]} {text}")]


def reroll_job(ctx: Context, job_id: int) -> list[Reply]:
    """🔁 on a result whose generation is not recorded (yet): the job's request again."""
    with ctx.write() as tx:
        job = tx.session.get(Job, job_id)
        if job is None or job.team_id != tx.team.id or job.kind != "generate":
            return []
        original = GeneratePayload.model_validate(job.payload)
        check_blocklist(ctx, original.prompt)
        reply = ReplyTarget(
            platform=ctx.platform,
            channel=original.reply.channel,
            thread=original.reply.thread,
            team_id=tx.team.id,
            requester=ctx.actor.user_id,
        )
        payload = original.model_copy(
            update={"seed": None, "mode": GenerationMode.REROLL, "reply": reply}
        )
        new_job = enqueue_generation(ctx, tx.session, tx.team.id, payload, ctx.idempotency_key)
        audit.record(
            tx.session,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action="generate.reroll",
            object_type="job",
            object_id=new_job,
            detail={"of_job": job.id},
        )
    return [Reply("🔁 " + queued_text(ctx, new_job, payload).removeprefix("🎨 "))]


def edit_form(ctx: Context, button: ButtonId) -> list[Reply]:
    """The Edit button's form, with the prompt and negative prompt filled in."""
    with ctx.services.db.session() as s:
        tx = Tx(s, _team(ctx, s))
        generation = _generation(tx, button.generation_id)
        form = Form(
            submit_id=button.encode(),
            title="Edit and run again",
            fields=(
                FormField("prompt", "Prompt", generation.prompt, multiline=True),
                FormField(
                    "negative",
                    "Negative prompt",
                    generation.negative_prompt,
                    multiline=True,
                    required=False,
                ),
            ),
        )
    return [Reply("", private=True, form=form)]


def result_job_id(key: str) -> int | None:
    """The job of a result message's outbox key (`job:N:result`)."""
    match = _RESULT_KEY.fullmatch(key)
    return int(match.group(1)) if match else None


def first_generation_of_job(ctx: Context, job_id: int) -> int | None:
    """The generation a result message (`job:N:result`) shows, for 🔁 on it."""
    with ctx.services.db.session() as s:
        team = _team(ctx, s)
        return s.scalar(
            select(Generation.id)
            .where(Generation.job_id == job_id, Generation.team_id == team.id)
            .order_by(Generation.id)
            .limit(1)
        )


# -- internals ----------------------------------------------------------------------------


def _team(ctx: Context, s: Session) -> Team:
    team = find_team(s, ctx.team_ref)
    if team is None:  # a button can only be on a message of a team Atelier knows
        raise UserError("Atelier has no records for this team yet; run `/imagine` first.")
    return team


def _generation(tx: Tx, generation_id: int) -> Generation:
    generation = tx.session.get(Generation, generation_id)
    if generation is None or generation.team_id != tx.team.id:
        raise UserError("That result is not in this team's records any more; run `/imagine` anew.")
    if generation.deleted_at is not None:
        raise UserError(
            f"That result was deleted by {generation.deleted_by}; its buttons do nothing now. "
            "Run `/imagine` for a new one."
        )
    return generation


def _payload(tx: Tx, generation: Generation) -> GeneratePayload:
    job = tx.session.get(Job, generation.job_id) if generation.job_id else None
    if job is None:
        raise UserError("That result's request is gone; run `/imagine` anew.")
    return GeneratePayload.model_validate(job.payload)


def _derive(
    ctx: Context,
    tx: Tx,
    generation: Generation,
    original: GeneratePayload,
    button: ButtonId,
    values: Mapping[str, str],
) -> GeneratePayload:
    """The new request a button makes from the result it sits under."""
    reply = ReplyTarget(
        platform=ctx.platform,
        channel=original.reply.channel,
        thread=original.reply.thread,
        team_id=tx.team.id,
        requester=ctx.actor.user_id,
    )
    base = {**original.model_dump(), "reply": reply.model_dump()}
    base["parent_generation_id"] = generation.id
    action = button.action
    if action == "reroll":
        return GeneratePayload.model_validate(
            {**base, "seed": None, "reroll_of": generation.id, "mode": GenerationMode.REROLL}
        )
    if action == "edit":
        return _edited(ctx, tx, generation, base, values)
    blobs = list(generation.image_blobs)
    if not 1 <= button.image <= len(blobs):
        raise UserError(f"That result has {len(blobs)} images; there is no image {button.image}.")
    seed = (generation.seed + button.image - 1) % 2**32
    common = {
        **base,
        "init_image": blobs[button.image - 1],
        "count": 1,
        "compare": False,
        "reroll_of": None,
    }
    if action in VARY_STRENGTH:
        return GeneratePayload.model_validate(
            {
                **common,
                "seed": None,
                "strength": VARY_STRENGTH[action],
                "mode": GenerationMode.VARY,
            }
        )
    # Upscale: the SD "hires fix" second pass at twice the size, same seed and styles.
    width, height = generation.width * UPSCALE_FACTOR, generation.height * UPSCALE_FACTOR
    if max(width, height) > MAX_SIDE:
        raise UserError(
            f"That image is {generation.width}x{generation.height}; twice that is over "
            f"{MAX_SIDE} pixels, the largest Atelier makes. Vary it instead."
        )
    return GeneratePayload.model_validate(
        {
            **common,
            "seed": seed,
            "width": width,
            "height": height,
            "strength": UPSCALE_STRENGTH,
            "mode": GenerationMode.UPSCALE,
        }
    )


def _edited(
    ctx: Context,
    tx: Tx,
    generation: Generation,
    base: dict[str, object],
    values: Mapping[str, str],
) -> GeneratePayload:
    """The request with the form's prompt: same seed and settings, styles chosen anew from
    the new prompt's trigger words (the same checks as /imagine)."""
    args = validate_args("imagine", {"prompt": values.get("prompt", ""), **_negative(values)})
    assert isinstance(args, ImagineArgs)
    chosen = select_adapters(tx.session, tx.team.id, args.prompt, ctx.services.policy)
    update: dict[str, object] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "adapters": [a.model_dump() for a in chosen.adapters],
        "base_model": chosen.base_model,
        "seed": generation.seed,
        "mode": GenerationMode.EDIT,
        "reroll_of": None,
    }
    if chosen.base_model != base["base_model"]:
        raise UserError(
            "The edited prompt picks styles on another base model than the result; "
            "use `/imagine` for that."
        )
    if args.ar is not None:
        update["width"], update["height"] = aspect_size(
            chosen.base_model, ctx.services.settings.base_models, args.ar
        )
    if base.get("compare") and not chosen.adapters:
        update["compare"] = False
    return GeneratePayload.model_validate({**base, **update})


def _negative(values: Mapping[str, str]) -> dict[str, str]:
    negative = values.get("negative")
    return {} if negative is None else {"negative": negative}


def _delete(ctx: Context, tx: Tx, generation: Generation) -> Reply:
    s = tx.session
    if generation.requester != ctx.actor.user_id and not ctx.is_lead:
        raise Refused(
            f"Only {generation.requester}, who asked for it, or an art lead can delete that "
            "result.",
            AuditNote(
                "generation.delete.refused",
                "generation",
                str(generation.id),
                {"owner": generation.requester},
            ),
        )
    generation.deleted_at = utcnow()
    generation.deleted_by = ctx.actor.user_id
    audit.record(
        s,
        team_id=tx.team.id,
        actor=ctx.actor.user_id,
        action="generation.delete",
        object_type="generation",
        object_id=generation.id,
        detail={"owner": generation.requester, "job": generation.job_id, "name": ctx.who},
    )
    note = f"🗑 This result (generation #{generation.id}) was deleted by {ctx.who}."
    if generation.job_id is not None:
        key = result_key(generation.job_id)
        row = s.scalar(select(OutboxMessage).where(OutboxMessage.key == key))
        if row is not None:
            # Edited in place: the image and its buttons leave the channel.
            ctx.services.outbox.put(
                key,
                platform=row.platform,
                channel=row.channel,
                thread=row.thread,
                team_id=row.team_id,
                text=note,
                extra={"generation_id": generation.id, "deleted": True},
                session=s,
            )
    return Reply(f"Deleted generation #{generation.id}; the record stays in the audit trail.",
                 private=True)  # fmt: skip
