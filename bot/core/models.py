"""A lead's ✅ on a model version's message (a trained or an imported LoRA) approves it:
`/imagine` then uses it for the style's trigger word."""

from __future__ import annotations

from bot.commands import Reply
from bot.core import audit
from bot.core.context import Context
from bot.core.errors import AuditNote, Refused
from storage.models import ModelVersion, Style, utcnow


def approve(ctx: Context, model_version_id: int) -> list[Reply]:
    with ctx.write() as tx:
        s = tx.session
        model = s.get(ModelVersion, model_version_id)
        style = s.get(Style, model.style_id) if model is not None else None
        if model is None or style is None or style.team_id != tx.team.id:
            return []
        if not ctx.is_lead:
            raise Refused(
                f"Only art leads approve a model; leads are "
                f"{ctx.services.leads.describe(ctx.platform)}.",
                AuditNote("model.approve.refused", "model_version", str(model.id)),
            )
        if model.approved_at is not None:
            return [Reply(f"{style.name} v{model.version} is already approved.", private=True)]
        model.approved_at = utcnow()
        model.approved_by = ctx.actor.user_id
        audit.record(
            s,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action="model.approve",
            object_type="model_version",
            object_id=model.id,
            detail={"style": style.name, "version": model.version, "name": ctx.who},
        )
        text = (
            f"✅ {ctx.who} approved **{style.name}** model v{model.version}; `{style.trigger}` "
            "in a prompt now uses it."
        )
    return [Reply(text)]
