"""`/style add` and images posted in a style's thread: intake into the current draft.

Files are read and checked before the database transaction starts (a download or a big
decode must not hold the write lock); only files that pass are stored and recorded. A
refused file stores nothing: no blob, no row.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.commands import FileTooLarge, FileUnavailable, IncomingFile, Reply
from bot.core import audit
from bot.core.arguments import StyleAddArgs, with_usage
from bot.core.context import Context
from bot.core.datasets import Editable, editable_draft, next_number, plural
from bot.core.errors import UserError
from bot.core.teams import find_team, get_style
from storage.blobs import BlobRef, BlobTooLarge
from storage.datasets import images_of, latest_version
from storage.ingest import (
    ImageRefused,
    IngestLimits,
    KnownImage,
    PreparedImage,
    find_duplicates,
    prepare_image,
    safe_display_name,
)
from storage.models import OutboxMessage, ReferenceImage, Style

log = logging.getLogger(__name__)
_THREAD_KEY = re.compile(r"style:(\d+):thread")


@dataclass
class FileResult:
    name: str
    prepared: PreparedImage | None = None  # its png dropped once stored (see _keep)
    blob: BlobRef | None = None
    refusal: str | None = None
    number: int | None = None  # set once stored
    duplicate_of: int | None = None  # exact copy of this number: not stored again
    near: tuple[int, ...] = ()


def add(ctx: Context, args: StyleAddArgs, files: Sequence[IncomingFile]) -> list[Reply]:
    policy = ctx.services.policy
    if args.name is None and ctx.thread is None:
        raise UserError(with_usage("name the style, or post the images in its thread", "style add"))
    if not files:
        if args.name is None:
            return []  # a plain message in a thread: nothing for us
        raise UserError(with_usage("attach at least one image (JPEG, PNG or WebP)", "style add"))
    if len(files) > policy.max_files_per_add:
        raise UserError(
            f"That is {len(files)} files; add at most {policy.max_files_per_add} at a time."
        )
    # Find the style before touching any file: images in some other thread are none of
    # our business, and a mistyped name should not cost a download.
    style_id = _find_style_id(ctx, args.name)
    if style_id is None:
        return []
    results = [_keep(ctx, check_file(f, ctx.services.limits)) for f in files]
    with ctx.write() as tx:
        s = tx.session
        style = s.get(Style, style_id, with_for_update=True)
        if style is None or style.team_id != tx.team.id:
            raise UserError("That style was removed meanwhile; `/style list` shows the styles.")
        if args.name is None and ctx.thread and style.thread_ref != ctx.thread:
            style.thread_ref = ctx.thread  # remembered: the next image here is one query
        editable = _store(ctx, s, style, results)
        kept = 0 if editable is None else len(images_of(s, editable.draft.id))
        name = style.name
    return [Reply(_report(name, results, editable, kept))]


def check_file(file: IncomingFile, limits: IngestLimits) -> FileResult:
    """Read within the size limit and validate; a refusal carries its one-line reason."""
    name = safe_display_name(file.filename)
    limit_mb = f"{limits.max_bytes / 1e6:g} MB"
    if file.size is not None and file.size > limits.max_bytes:
        return FileResult(
            name,
            refusal=f"{name} is {file.size / 1e6:.1f} MB; Atelier takes images up to {limit_mb}, "
            "so export a smaller copy and try again.",
        )
    try:
        data = file.read(limits.max_bytes)
    except FileTooLarge:
        return FileResult(
            name,
            refusal=f"{name} is over the {limit_mb} limit; export a smaller copy and try again.",
        )
    except FileUnavailable as exc:
        # The platform said why (a link off its file servers, a missing scope): pass it on,
        # under the name as the core shows it rather than the platform's raw one.
        log.warning("reading %s failed: %s", name, exc.reason)
        return FileResult(name, refusal=f"{name}: {exc.reason}")
    except Exception as exc:  # a failed download: the person can simply post it again
        log.warning("reading %s failed: %s", name, exc)
        return FileResult(name, refusal=f"{name} could not be downloaded; post it again.")
    try:
        return FileResult(name, prepared=prepare_image(data, file.filename, limits))
    except ImageRefused as refused:
        return FileResult(name, refusal=refused.reason)


def _keep(ctx: Context, result: FileResult) -> FileResult:
    """Store an accepted image's blob and previews now, so its pixels leave memory.

    Blobs are content-addressed: one whose row is never written (an exact duplicate, a
    failed transaction) is an unreferenced file, never a wrong one.
    """
    prepared = result.prepared
    if prepared is None:
        return result
    try:
        result.blob = ctx.services.blobs.put_bytes(prepared.png)
    except BlobTooLarge as exc:
        return FileResult(result.name, refusal=f"{result.name}: {exc}")
    try:
        ctx.services.previews.warm(prepared.png_sha256, prepared.png)
    except Exception:  # previews are a cache; the review makes them again if needed
        log.exception("could not make previews of %s", prepared.display_name)
    result.prepared = replace(prepared, png=b"")
    return result


def _find_style_id(ctx: Context, name: str | None) -> int | None:
    """The style named, or the one whose thread this is (None: not a style's thread)."""
    with ctx.services.db.session() as s:
        team = find_team(s, ctx.team_ref)
        if name is not None:
            return get_style(s, team.id if team else -1, name).id
        if team is None:
            return None
        style = _style_for_thread(ctx, s, team.id, ctx.thread or "")
        return None if style is None else style.id


def _style_for_thread(ctx: Context, s: Session, team_id: int, thread: str) -> Style | None:
    """The style whose thread this is: by Style.thread_ref, else by its announcement post."""
    style = s.scalar(select(Style).where(Style.team_id == team_id, Style.thread_ref == thread))
    if style is not None:
        return style
    posted = s.scalar(
        select(OutboxMessage).where(
            OutboxMessage.platform == ctx.platform,
            OutboxMessage.platform_message_id == thread,
            OutboxMessage.team_id == team_id,
        )
    )
    match = _THREAD_KEY.fullmatch(posted.key) if posted is not None else None
    if match is None:
        return None
    style = s.get(Style, int(match.group(1)))
    if style is None or style.team_id != team_id:
        return None
    return style


def _store(ctx: Context, s: Session, style: Style, results: list[FileResult]) -> Editable | None:
    """Store the files that passed into the editable draft; None when nothing was stored."""
    latest = latest_version(s, style.id)
    known = [
        KnownImage(i.position, i.source_sha256, i.blob_sha256, i.phash)
        for i in (images_of(s, latest.id) if latest else [])
    ]
    to_store: list[FileResult] = []
    for result in results:
        if result.prepared is None:
            continue
        flags = find_duplicates(result.prepared, known)
        exact = [f for f in flags if f.kind == "exact"]
        if exact:
            result.duplicate_of = int(exact[0].image_id)
            continue
        result.near = tuple(int(f.image_id) for f in flags if f.kind == "near")
        to_store.append(result)
        # Later files in the same batch are compared with this one too (by a placeholder).
        known.append(
            KnownImage(
                -len(to_store),
                result.prepared.source_sha256,
                result.prepared.png_sha256,
                result.prepared.phash,
            )
        )
    if not to_store:
        return None
    editable = editable_draft(s, style, ctx.actor.user_id)
    number = next_number(s, style.id)
    numbers: dict[int, int] = {}
    for index, result in enumerate(to_store, start=1):
        prepared, blob = result.prepared, result.blob
        assert prepared is not None and blob is not None
        numbers[-index] = number
        result.number = number
        result.near = tuple(numbers.get(n, n) for n in result.near)
        warnings = list(prepared.warnings) + [
            f"looks like #{n} (near-duplicate)" for n in result.near
        ]
        image = ReferenceImage(
            dataset_version_id=editable.draft.id,
            position=number,
            blob_sha256=blob.sha256,
            source_sha256=prepared.source_sha256,
            phash=prepared.phash,
            original_name=prepared.display_name[:255],
            byte_size=prepared.source_size,
            width=prepared.width,
            height=prepared.height,
            uploader=ctx.actor.user_id,
            warnings=warnings,
        )
        s.add(image)
        s.flush()
        audit.record(
            s,
            team_id=style.team_id,
            actor=ctx.actor.user_id,
            action="image.add",
            object_type="reference_image",
            object_id=image.id,
            detail={
                "style": style.name,
                "number": number,
                "file": prepared.display_name,
                "blob": blob.sha256,
                "bytes": prepared.source_size,
            },
        )
        number += 1
    for result in results:  # exact copies of a file earlier in this same batch
        if result.duplicate_of is not None and result.duplicate_of < 0:
            result.duplicate_of = numbers.get(result.duplicate_of, result.duplicate_of)
    return editable


def _report(name: str, results: list[FileResult], editable: Editable | None, kept: int) -> str:
    stored = [r for r in results if r.number is not None]
    lines: list[str] = []
    if editable is not None:
        draft = editable.draft
        lines.append(
            f"**{name}** draft v{draft.version}: added {len(stored)} of "
            f"{plural(len(results), 'file')}; the draft has {plural(kept, 'image')}."
        )
        if editable.copied_from is not None:
            old = editable.copied_from
            lines.append(
                f"(v{old.version} is {old.status.replace('_', ' ')}, "
                f"so this started draft v{draft.version}.)"
            )
    else:
        lines.append(f"Nothing was added to **{name}**:")
    for r in results:
        if r.number is not None:
            assert r.prepared is not None
            notes = [*r.prepared.warnings, *(f"looks like #{n} (near-duplicate)" for n in r.near)]
            suffix = "".join(f"\n   ⚠ {n}" for n in notes)
            lines.append(f"✓ {r.name} → #{r.number}{suffix}")
        elif r.duplicate_of is not None:
            lines.append(f"• {r.name}: already in {name} as #{r.duplicate_of}, not added again")
        else:
            lines.append(f"✗ {r.refusal}")
    if stored:
        lines.append(f"Next: `/style review {name}` when the set is ready.")
    return "\n".join(lines)
