"""`/style review` (contact sheet and image cards) and the leads' reactions on them.

✅ on a sheet approves the dataset version (frozen: its content hash is recorded), ❌
rejects it; ❌ on an image card drops that image. Only art leads change anything; anyone
else's reaction is refused and the refusal audited.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.commands import Reply
from bot.core import audit
from bot.core.arguments import StyleNameArgs
from bot.core.context import Context, Services
from bot.core.datasets import editable_draft, plural
from bot.core.errors import AuditNote, Refused, UserError
from bot.core.previews import CARD_SIDE
from bot.core.sheet import SheetEntry, render_contact_sheet
from bot.core.teams import get_style
from storage.cards import card_key, card_text
from storage.datasets import (
    EffectiveCaption,
    content_hash,
    effective_captions,
    image_by_number,
    images_of,
    latest_version,
)
from storage.models import (
    CaptionSource,
    DatasetStatus,
    DatasetVersion,
    OutboxMessage,
    ReferenceImage,
    Style,
    utcnow,
)
from storage.outbox import Attachment, OutboxItem

APPROVE, REJECT = "✅", "❌"


def review_key(dataset_id: int) -> str:
    return f"review:dataset:{dataset_id}"


# -- /style review ---------------------------------------------------------------------------


def review(ctx: Context, args: StyleNameArgs) -> list[Reply]:
    services = ctx.services
    with ctx.write() as tx:
        s = tx.session
        style = get_style(s, tx.team.id, args.name, lock=True)
        dataset = latest_version(s, style.id)
        _check_reviewable(style, dataset)
        assert dataset is not None
        kept = images_of(s, dataset.id)
        if not kept:
            raise UserError(
                f"{style.name} v{dataset.version} has no images left; add some with "
                f"`/style add {style.name}`."
            )
        first_time = dataset.status == DatasetStatus.DRAFT
        dataset.status = DatasetStatus.IN_REVIEW
        thread = ctx.thread or style.thread_ref
        post_sheet(services, s, style, dataset, ctx.platform, ctx.channel, thread)
        if services.policy.image_cards and first_time:
            _post_cards(services, s, style, kept, ctx.platform, ctx.channel, thread)
        audit.record(
            s,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action="dataset.review",
            object_type="dataset_version",
            object_id=dataset.id,
            detail={"style": style.name, "version": dataset.version, "images": len(kept)},
        )
        name, version = style.name, dataset.version
    text = (
        f"**{name}** dataset v{version} ({plural(len(kept), 'image')}) is in review: the "
        f"contact sheet follows. Art leads react ✅ to approve or ❌ to reject; ❌ on an image "
        f"card drops that image. Fix a caption with `/style caption {name} N text`."
    )
    if len(kept) < services.policy.recommended_images:
        text += (
            f"\n⚠ {plural(len(kept), 'image')} is thin; a style usually wants "
            f"{services.policy.recommended_images}-30 varied images."
        )
    return [Reply(text)]


def _check_reviewable(style: Style, dataset: DatasetVersion | None) -> None:
    if dataset is None:
        raise UserError(
            f"{style.name} has no images yet; add them with `/style add {style.name}` first."
        )
    if dataset.status == DatasetStatus.APPROVED:
        raise UserError(
            f"{style.name} v{dataset.version} is already approved (and frozen); add or caption "
            "images to start a new draft, then review that."
        )
    if dataset.status == DatasetStatus.REJECTED:
        raise UserError(
            f"{style.name} v{dataset.version} was rejected by {dataset.reviewed_by}; change it "
            f"(`/style add`, `/style caption`) and review the new draft."
        )


def post_sheet(
    services: Services,
    s: Session,
    style: Style,
    dataset: DatasetVersion,
    platform: str,
    channel: str,
    thread: str | None,
    status_line: str = "",
) -> None:
    """Render the sheet and queue it (a second call edits the same message)."""
    images = images_of(s, dataset.id, kept_only=False)
    captions = effective_captions(s, (i.id for i in images))
    entries = [
        SheetEntry(
            number=i.position,
            thumbnail=services.previews.thumbnail(i.blob_sha256),
            caption=captions[i.id].text if i.id in captions else "",
            dropped=i.dropped,
        )
        for i in images
    ]
    kept = sum(not i.dropped for i in images)
    title = f"{style.name} · dataset v{dataset.version} · {plural(kept, 'image')}"
    blob = services.blobs.put_bytes(render_contact_sheet(title, entries))
    text = (
        f"📋 **{style.name}** dataset v{dataset.version}: {plural(kept, 'image')} for review "
        f"(trigger `{style.trigger}`).\nArt leads: ✅ approves, ❌ rejects; ❌ on an image "
        "card drops that image."
    )
    if status_line:
        text += "\n" + status_line
    key = review_key(dataset.id)
    services.outbox.put(
        key,
        platform=platform,
        channel=channel,
        thread=thread,
        team_id=style.team_id,
        text=text,
        attachments=[Attachment(blob.sha256, f"{style.name}-v{dataset.version}-review.png")],
        extra={"kind": "review_sheet", "dataset_version_id": dataset.id},
        session=s,
    )
    dataset.review_message_ref = key


def _post_cards(
    services: Services,
    s: Session,
    style: Style,
    images: list[ReferenceImage],
    platform: str,
    channel: str,
    thread: str | None,
) -> None:
    captions = effective_captions(s, (i.id for i in images))
    for image in images:
        preview = services.blobs.put_bytes(services.previews.png(image.blob_sha256, CARD_SIDE))
        key = card_key(image.id)
        caption = captions.get(image.id)
        services.outbox.put(
            key,
            platform=platform,
            channel=channel,
            thread=thread,
            team_id=style.team_id,
            text=_card_text(style, image, caption),
            attachments=[Attachment(preview.sha256, f"{style.name}-{image.position}.png")],
            extra={"kind": "image_card", "image_id": image.id},
            session=s,
        )
        image.card_message_ref = key


def _card_text(
    style: Style, image: ReferenceImage, caption: EffectiveCaption | None, note: str = ""
) -> str:
    return card_text(
        style.name,
        image.position,
        caption.text if caption else None,
        auto=caption is not None and caption.source == CaptionSource.AUTO,
        original_name=image.original_name,
        width=image.width,
        height=image.height,
        note=note,
    )


# -- reactions ---------------------------------------------------------------------------


def on_sheet(ctx: Context, dataset_id: int, emoji: str) -> list[Reply]:
    if emoji not in (APPROVE, REJECT):
        return []
    with ctx.write() as tx:
        s = tx.session
        dataset = s.get(DatasetVersion, dataset_id, with_for_update=True)
        if dataset is None or dataset.style.team_id != tx.team.id:
            return []
        style = dataset.style
        verb = "approve" if emoji == APPROVE else "reject"
        if not ctx.is_lead:
            raise _not_a_lead(ctx, f"{verb} datasets", "dataset_version", dataset.id, verb)
        if dataset.status == DatasetStatus.APPROVED:
            return [
                Reply(
                    f"{style.name} v{dataset.version} is already approved and frozen; "
                    "changes go into a new draft.",
                    private=True,
                )
            ]
        if dataset.status == DatasetStatus.DRAFT:
            return [Reply(f"{style.name} v{dataset.version} is not in review.", private=True)]
        if emoji == APPROVE:
            return [_approve(ctx, s, style, dataset)]
        return [_reject(ctx, s, style, dataset)]


def _approve(ctx: Context, s: Session, style: Style, dataset: DatasetVersion) -> Reply:
    kept = images_of(s, dataset.id)
    if not kept:
        raise UserError(f"{style.name} v{dataset.version} has no images left to approve.")
    captions = effective_captions(s, (i.id for i in kept))
    dataset.content_hash = content_hash(kept, captions)
    dataset.status = DatasetStatus.APPROVED
    dataset.reviewed_by = ctx.actor.user_id
    dataset.reviewed_at = utcnow()
    audit.record(
        s,
        team_id=style.team_id,
        actor=ctx.actor.user_id,
        action="dataset.approve",
        object_type="dataset_version",
        object_id=dataset.id,
        detail={
            "style": style.name,
            "version": dataset.version,
            "images": len(kept),
            "content_hash": dataset.content_hash,
        },
    )
    _restate_sheet(ctx, s, style, dataset, f"✅ Approved by {ctx.who}: frozen, ready to train.")
    return Reply(
        f"✅ {ctx.who} approved **{style.name}** dataset v{dataset.version} "
        f"({plural(len(kept), 'image')}). Train it with `/style train {style.name}`."
    )


def _reject(ctx: Context, s: Session, style: Style, dataset: DatasetVersion) -> Reply:
    dataset.status = DatasetStatus.REJECTED
    dataset.reviewed_by = ctx.actor.user_id
    dataset.reviewed_at = utcnow()
    audit.record(
        s,
        team_id=style.team_id,
        actor=ctx.actor.user_id,
        action="dataset.reject",
        object_type="dataset_version",
        object_id=dataset.id,
        detail={"style": style.name, "version": dataset.version},
    )
    _restate_sheet(ctx, s, style, dataset, f"❌ Rejected by {ctx.who}.")
    return Reply(
        f"❌ {ctx.who} rejected **{style.name}** dataset v{dataset.version}. Change it "
        f"(`/style add`, `/style caption`) and `/style review {style.name}` again."
    )


def _restate_sheet(
    ctx: Context, s: Session, style: Style, dataset: DatasetVersion, status_line: str
) -> None:
    """Edit the posted sheet to show the decision (same picture, same message)."""
    item = posted(s, review_key(dataset.id))
    if item is not None:
        post_sheet(
            ctx.services, s, style, dataset, item.platform, item.channel, item.thread, status_line
        )


def posted(s: Session, key: str) -> OutboxItem | None:
    """An outbox message, read in the caller's transaction."""
    row = s.scalar(select(OutboxMessage).where(OutboxMessage.key == key))
    return None if row is None else OutboxItem.of(row)


def on_card(ctx: Context, image_id: int, emoji: str) -> list[Reply]:
    if emoji != REJECT:
        return []
    with ctx.write() as tx:
        s = tx.session
        image = s.get(ReferenceImage, image_id)
        if image is None or image.dataset.style.team_id != tx.team.id:
            return []
        dataset = image.dataset
        style = get_style(s, tx.team.id, dataset.style.name, lock=True)
        if not ctx.is_lead:
            raise _not_a_lead(ctx, "drop images", "reference_image", image.id, "drop")
        note = ""
        if dataset.status not in (DatasetStatus.DRAFT, DatasetStatus.IN_REVIEW):
            editable = editable_draft(s, style, ctx.actor.user_id)
            target = image_by_number(s, editable.draft.id, image.position)
            if editable.copied_from is not None:
                new = editable.draft.version
                note = f" (v{dataset.version} is frozen, so this started draft v{new})"
            dataset = editable.draft
        else:
            target = image
        if target is None or target.dropped:
            return [Reply(f"{style.name} #{image.position} is already dropped.", private=True)]
        target.dropped = True
        target.dropped_by = ctx.actor.user_id
        audit.record(
            s,
            team_id=tx.team.id,
            actor=ctx.actor.user_id,
            action="image.drop",
            object_type="reference_image",
            object_id=target.id,
            detail={"style": style.name, "version": dataset.version, "number": target.position},
        )
        sheet = posted(s, review_key(dataset.id))
        if dataset.status == DatasetStatus.IN_REVIEW and sheet is not None:
            post_sheet(ctx.services, s, style, dataset, sheet.platform, sheet.channel, sheet.thread)
        _mark_card(ctx, s, style, image, f"❌ dropped by {ctx.who}")
        return [
            Reply(
                f"❌ {ctx.who} dropped {style.name} #{target.position} "
                f"from v{dataset.version}{note}."
            )
        ]


def _mark_card(ctx: Context, s: Session, style: Style, image: ReferenceImage, note: str) -> None:
    item = posted(s, card_key(image.id))
    if item is None:
        return
    caption = effective_captions(s, [image.id]).get(image.id)
    ctx.services.outbox.put(
        item.key,
        platform=item.platform,
        channel=item.channel,
        thread=item.thread,
        team_id=item.team_id,
        text=_card_text(style, image, caption, note),
        attachments=item.attachments,
        extra=item.extra,
        session=s,
    )


def _not_a_lead(ctx: Context, what: str, object_type: str, object_id: int, verb: str) -> Refused:
    leads = ctx.services.leads.describe(ctx.platform)
    return Refused(
        f"Only art leads can {what}; your reaction changed nothing. Leads here: {leads}.",
        AuditNote(
            f"{object_type}.{verb}.refused", object_type, str(object_id), {"reason": "not a lead"}
        ),
    )
