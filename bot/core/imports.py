"""`/style import NAME TRIGGER` with a LoRA file attached: the team's existing LoRA becomes
a model version of the style (created if new), which an art lead approves with ✅ like a
trained one.

The bot takes only files named .safetensors and stores the bytes; the runner's import job
reads the header (refusing pickles in disguise and other families than the style's base),
shows what the header says and publishes the version.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.commands import FileTooLarge, FileUnavailable, IncomingFile, Reply
from bot.core import audit
from bot.core.arguments import StyleImportArgs, with_usage
from bot.core.context import Context
from bot.core.errors import UserError
from bot.core.queue_room import check_queue_room
from bot.core.styles import check_base, new_style
from bot.core.teams import find_style
from storage.ingest import safe_display_name
from storage.job_payloads import ImportPayload, JobKind, Priority
from storage.models import StyleKind

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def import_lora(ctx: Context, args: StyleImportArgs, files: Sequence[IncomingFile]) -> list[Reply]:
    if len(files) != 1:
        raise UserError(
            with_usage(
                "attach exactly one LoRA .safetensors file (Slack: post it in a thread with "
                "this command as the message text)",
                "style import",
            )
        )
    file = files[0]
    name = safe_display_name(file.filename)
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix in PICKLE_SUFFIXES:
        raise UserError(
            f"{name} is a pickle-based file, which can run code on the machine that loads "
            "it; convert it to .safetensors on a machine you trust and import that."
        )
    if suffix != ".safetensors":
        raise UserError(f"{name} is not a .safetensors file; Atelier imports only those.")
    data = _read(file, name, ctx.services.settings.max_blob_bytes)
    blob = ctx.services.blobs.put_bytes(data)
    with ctx.write() as tx:
        s, team = tx.session, tx.team
        style = find_style(s, team.id, args.name, lock=True)
        created = style is None
        if style is None:
            base = check_base(ctx, args.base)
            style = new_style(ctx, s, team.id, args.name, args.trigger, StyleKind.STYLE, base)
        elif style.trigger.lower() != args.trigger.lower():
            raise UserError(
                f"{style.name}'s trigger is {style.trigger}, not {args.trigger}; import with "
                f"`/style import {style.name} {style.trigger}`, or under a new name."
            )
        elif args.base and args.base != style.base_model:
            raise UserError(
                f"{style.name} is on {style.base_model}; leave base out (it is for new styles)."
            )
        check_queue_room(ctx, s, team.id)
        payload = ImportPayload(
            reply=ctx.reply_target(team.id),
            style_id=style.id,
            blob_sha256=blob.sha256,
            filename=name,
        )
        job = ctx.services.queue.enqueue(
            JobKind.IMPORT,
            payload.model_dump(mode="json"),
            requester=ctx.actor.user_id,
            priority=Priority.IMPORT,
            idempotency_key=ctx.idempotency_key,
            team_id=team.id,
            session=s,
        )
        audit.record(
            s,
            team_id=team.id,
            actor=ctx.actor.user_id,
            action="model.import.request",
            object_type="style",
            object_id=style.id,
            detail={"file": name, "sha256": blob.sha256, "bytes": len(data), "job": job.id},
        )
        style_name, base_model = style.name, style.base_model
    made = f"Created style **{style_name}** on {base_model}; " if created else ""
    return [
        Reply(
            f"📦 {made}checking {name} ({len(data) / 1e6:.1f} MB) for {style_name}: job "
            f"#{job.id}. The runner reads its header and posts what it says; an art lead then "
            "approves it with ✅ on that message."
        )
    ]


def _read(file: IncomingFile, name: str, limit: int) -> bytes:
    if file.size is not None and file.size > limit:
        raise UserError(f"{name} is {file.size / 1e6:.0f} MB, over the {limit / 1e6:.0f} MB limit.")
    try:
        return file.read(limit)
    except FileTooLarge:
        raise UserError(f"{name} is over the {limit / 1e6:.0f} MB limit.") from None
    except FileUnavailable as exc:
        raise UserError(f"{name}: {exc.reason}") from None
