"""The style's model versions: a lead's ✅ on a version's message (a trained or an
imported LoRA) approves it; `/style use NAME STEP`, or a keycap digit reacted on a training
result (1 for the top row of its checkpoints.png), makes one of a run's checkpoints the
team's version; `/imagine` then uses the version a lead picked last for the style's
trigger word. `/style versions NAME` lists them all."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bot.commands import Reply
from bot.core import audit
from bot.core.arguments import StyleNameArgs, StyleUseArgs
from bot.core.context import Context
from bot.core.errors import AuditNote, Refused, UserError
from bot.core.imagine import model_for
from bot.core.teams import get_style
from storage.models import DatasetVersion, ModelVersion, Style, TrainingRun, utcnow
from storage.training_summary import GRID_ROWS, keycap


def approve(ctx: Context, model_version_id: int) -> list[Reply]:
    with ctx.write() as tx:
        s = tx.session
        found = _team_version(s, tx.team.id, model_version_id)
        if found is None:
            return []
        model, style = found
        if not ctx.is_lead:
            raise Refused(
                f"Only art leads approve a model; leads are "
                f"{ctx.services.leads.describe(ctx.platform)}.",
                AuditNote("model.approve.refused", "model_version", str(model.id)),
            )
        if model.approved_at is not None:
            return [Reply(f"{style.name} v{model.version} is already approved.", private=True)]
        _mark_approved(ctx, s, tx.team.id, style, model, "model.approve", name=ctx.who)
        text = (
            f"✅ {ctx.who} approved **{style.name}** model v{model.version}; `{style.trigger}` "
            "in a prompt now uses it."
        )
    return [Reply(text)]


def _team_version(
    s: Session, team_id: int, model_version_id: int
) -> tuple[ModelVersion, Style] | None:
    """The version a reaction names, with its style, if it is this team's (else None: a
    message of another team's, or a version since deleted)."""
    model = s.get(ModelVersion, model_version_id)
    style = s.get(Style, model.style_id) if model is not None else None
    if model is None or style is None or style.team_id != team_id:
        return None
    return model, style


def _mark_approved(
    ctx: Context,
    s: Session,
    team_id: int,
    style: Style,
    model: ModelVersion,
    action: str,
    **detail: Any,
) -> None:
    """The lead's approval on the version (what `model_for` picks by), in the audit log."""
    model.approved_at = utcnow()
    model.approved_by = ctx.actor.user_id
    audit.record(
        s,
        team_id=team_id,
        actor=ctx.actor.user_id,
        action=action,
        object_type="model_version",
        object_id=model.id,
        detail={"style": style.name, "version": model.version, **detail},
    )


def use(ctx: Context, args: StyleUseArgs) -> list[Reply]:
    """Make the checkpoint at `step` of the style's latest trained version the one it uses:
    the final step approves that version; an earlier one becomes a new version, approved."""
    with ctx.write() as tx:
        s = tx.session
        style = get_style(s, tx.team.id, args.name, lock=True)
        _check_lead(ctx, style)
        # The newest version a run published (its checkpoints with it), not one picked.
        trained = next(
            (
                m
                for m in s.scalars(
                    select(ModelVersion)
                    .where(ModelVersion.style_id == style.id)
                    .order_by(ModelVersion.version.desc())
                )
                if "checkpoints" in m.file_metadata
            ),
            None,
        )
        if trained is None:
            raise UserError(
                f"{style.name} has no trained version with checkpoints yet; "
                f"`/style train {style.name}` makes one."
            )
        if args.step not in grid_steps(trained):
            steps = ", ".join(map(str, grid_steps(trained)))
            raise UserError(
                f"{style.name} v{trained.version} has no checkpoint at step {args.step}; "
                f"its steps are {steps}."
            )
        return [_pick(ctx, s, tx.team.id, style, trained, args.step)]


def use_row(ctx: Context, model_version_id: int, row: int) -> list[Reply]:
    """A lead's keycap reaction on a training result: row `row` (from 1) of its
    checkpoints.png becomes the version the style uses, as `/style use` with that step."""
    with ctx.write() as tx:
        s = tx.session
        found = _team_version(s, tx.team.id, model_version_id)
        if found is None:
            return []
        trained, style = found
        steps = grid_steps(trained)
        if len(steps) < 2:
            return []  # no grid was posted: a lone result is approved with ✅
        _check_lead(ctx, style)
        if row > len(steps):
            raise UserError(
                f"checkpoints.png of {style.name} v{trained.version} has {len(steps)} rows: "
                f"react {keycap(1)}–{keycap(min(len(steps), GRID_ROWS))}, or "
                f"`/style use {style.name} STEP` with a step of {', '.join(map(str, steps))}."
            )
        return [_pick(ctx, s, tx.team.id, style, trained, steps[row - 1])]


def grid_steps(trained: ModelVersion) -> list[int]:
    """The steps of a run's checkpoints.png rows, top to bottom: its kept checkpoints, then
    the final step (the version itself)."""
    kept = sorted(c["step"] for c in trained.file_metadata.get("checkpoints", []))
    final = trained.validation.get("step")
    return [*kept, final] if final is not None else kept


def _check_lead(ctx: Context, style: Style) -> None:
    if not ctx.is_lead:
        raise Refused(
            f"Only art leads pick the version a style uses; leads are "
            f"{ctx.services.leads.describe(ctx.platform)}.",
            AuditNote("model.use.refused", "style", str(style.id)),
        )


def _pick(
    ctx: Context, s: Session, team_id: int, style: Style, trained: ModelVersion, step: int
) -> Reply:
    """The version at `step` of `trained`'s run approved: the final step is `trained`
    itself, an earlier one a new version holding that checkpoint's files."""
    if step == trained.validation.get("step"):
        model = trained
    else:
        (checkpoint,) = [
            c for c in trained.file_metadata.get("checkpoints", []) if c["step"] == step
        ]
        model = _from_checkpoint(s, style, trained, checkpoint)
    _mark_approved(ctx, s, team_id, style, model, "model.use", step=step)
    return Reply(
        f"✅ {ctx.who} picked **{style.name}** v{model.version} (step {step} of "
        f"v{trained.version}'s run); `{style.trigger}` in a prompt now uses it."
    )


def _from_checkpoint(
    s: Session, style: Style, trained: ModelVersion, checkpoint: dict[str, Any]
) -> ModelVersion:
    """A new version holding a checkpoint's files (once: picking it again finds it)."""
    for existing in s.scalars(
        select(ModelVersion).where(ModelVersion.training_run_id == trained.training_run_id)
    ):
        if existing.validation.get("step") == checkpoint["step"]:
            return existing
    latest = s.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.style_id == style.id)
    )
    model = ModelVersion(
        style_id=style.id,
        version=(latest or 0) + 1,
        training_run_id=trained.training_run_id,
        method=trained.method,
        base_model=trained.base_model,
        kohya_blob=checkpoint.get("kohya_blob"),
        diffusers_blob=checkpoint.get("diffusers_blob"),
        embedding_blob=checkpoint.get("embedding_blob"),
        file_metadata={
            "base_model_hash": trained.file_metadata.get("base_model_hash"),
            "checkpoint_of": trained.version,
        },
        validation={
            "step": checkpoint["step"],
            "val_loss": checkpoint.get("val_loss"),
            "held_out": trained.validation.get("held_out"),
            "buckets": trained.validation.get("buckets", {}),
        },
    )
    s.add(model)
    s.flush()
    return model


def versions(ctx: Context, args: StyleNameArgs) -> list[Reply]:
    """Every version: where it came from, its recipe and loss, who approved it, which is used."""
    with ctx.write() as tx:
        s = tx.session
        style = get_style(s, tx.team.id, args.name)
        models = list(
            s.scalars(
                select(ModelVersion)
                .where(ModelVersion.style_id == style.id)
                .order_by(ModelVersion.version)
            )
        )
        if not models:
            return [Reply(f"{style.name} has no versions yet; `/style train {style.name}`.")]
        used = model_for(s, style)
        lines = [f"**{style.name}** versions:"]
        for model in models:
            lines.append(_version_line(s, model, in_use=used is not None and used.id == model.id))
    return [Reply("\n".join(lines))]


def _version_line(s: Session, model: ModelVersion, *, in_use: bool) -> str:
    parts = [f"v{model.version}", model.method, model.base_model]
    run = s.get(TrainingRun, model.training_run_id) if model.training_run_id else None
    if run is None:
        parts.append("imported")
    else:
        dataset = s.get(DatasetVersion, run.dataset_version_id)
        if dataset is not None:
            parts.append(f"dataset v{dataset.version}")
        step = model.validation.get("step")
        origin = model.file_metadata.get("checkpoint_of")
        if step is not None:
            parts.append(f"step {step}" + (f" of v{origin}'s run" if origin else ""))
        recipe = ", ".join(
            f"{k}={v}" for k, v in sorted(run.params.items()) if k not in ("preset",)
        )
        parts.append(
            f"{run.params.get('preset', 'style')} preset" + (f" ({recipe})" if recipe else "")
        )
        kept = [c["step"] for c in model.file_metadata.get("checkpoints", [])]
        if kept:
            parts.append("checkpoints at " + ", ".join(map(str, kept)))
    loss = model.validation.get("val_loss")
    if loss is not None:
        which = "held-out" if model.validation.get("held_out", True) else "training-set"
        parts.append(f"{which} loss {loss:.4f}")
    if model.approved_by:
        parts.append(f"approved by {model.approved_by}")
    return "• " + " · ".join(parts) + (" · **in use**" if in_use else "")
