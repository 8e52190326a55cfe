"""Dataset review: the contact sheet, leads' ✅/❌ on it, ❌ on image cards, and who is a lead."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from bot.commands import Actor
from bot.core.auth import LeadPolicy
from storage.db import Database
from storage.models import DatasetStatus

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import (  # noqa: E402
    LEAD,
    MEMBER,
    Rig,
    approved_style,
    build_rig,
    images,
    make_settings,
    reaction,
)

pytest_plugins = ("bot_fixtures",)


def _in_review(rig: Rig, seeds: tuple[int, ...] = (1, 2, 3)) -> int:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    rig.run("style add", {"name": "ink"}, files=images(*seeds))
    rig.run("style caption", {"name": "ink", "number": "2", "text": "a blue square"})
    text = rig.text("style review", {"name": "ink"})
    assert "dataset v1 (3 images) is in review" in text
    return rig.datasets("ink")[0].id


def test_review_posts_a_contact_sheet_and_image_cards(rig: Rig) -> None:
    dataset_id = _in_review(rig)
    assert rig.datasets("ink")[0].status == DatasetStatus.IN_REVIEW
    sheet = rig.outbox.get(f"review:dataset:{dataset_id}")
    assert sheet is not None and "3 images for review" in sheet.text
    (attachment,) = sheet.attachments
    with Image.open(io.BytesIO(rig.blobs.read_bytes(attachment.blob_sha256))) as im:
        assert im.format == "PNG" and im.width >= 3 * 176
    cards = [rig.outbox.get(f"card:image:{i.id}") for i in rig.images(dataset_id)]
    assert [c.text.split(":")[0] for c in cards if c] == ["ink #1", "ink #2", "ink #3"]
    assert "a blue square" in cards[1].text  # type: ignore[union-attr]
    rig.deliverer.deliver_due()
    posted = [item.key for _, item, _ in rig.sender.posts]
    assert posted[-4:] == [f"review:dataset:{dataset_id}", *(c.key for c in cards if c)]
    assert len(rig.audit("dataset.review")) == 1


def test_review_before_images_or_after_approval_explains(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    assert "has no images yet" in rig.text("style review", {"name": "ink"})
    rig.run("style add", {"name": "ink"}, files=images(1))
    rig.run("style review", {"name": "ink"})
    rig.react(f"review:dataset:{rig.datasets('ink')[0].id}", "✅")
    assert "already approved (and frozen)" in rig.text("style review", {"name": "ink"})


def test_a_non_leads_approval_changes_nothing_and_is_audited(rig: Rig) -> None:
    dataset_id = _in_review(rig)
    replies = rig.react(f"review:dataset:{dataset_id}", "✅", user=MEMBER)
    assert len(replies) == 1 and replies[0].private
    assert "Only art leads can approve datasets" in replies[0].text
    (dataset,) = rig.datasets("ink")
    assert dataset.status == DatasetStatus.IN_REVIEW
    assert dataset.content_hash is None and dataset.reviewed_by is None
    (refusal,) = rig.audit("dataset_version.approve.refused")
    assert refusal.actor == MEMBER and refusal.object_id == str(dataset_id)
    assert rig.audit("dataset.approve") == []
    # Rejecting and dropping are just as closed to non-leads.
    rig.react(f"review:dataset:{dataset_id}", "❌", user=MEMBER)
    first = rig.images(dataset_id)[0]
    rig.react(f"card:image:{first.id}", "❌", user=MEMBER)
    assert rig.datasets("ink")[0].status == DatasetStatus.IN_REVIEW
    assert not any(i.dropped for i in rig.images(dataset_id))


def test_a_leads_approval_freezes_the_dataset_with_its_hash(rig: Rig) -> None:
    dataset_id = _in_review(rig)
    (reply,) = rig.react(f"review:dataset:{dataset_id}", "\u2705\ufe0f", user=LEAD)
    assert "approved **ink** dataset v1 (3 images)" in reply.text and not reply.private
    (dataset,) = rig.datasets("ink")
    assert dataset.status == DatasetStatus.APPROVED and dataset.reviewed_by == LEAD
    assert dataset.reviewed_at is not None
    kept = rig.images(dataset_id)
    captions = {1: "", 2: "a blue square", 3: ""}
    expected = hashlib.sha256(
        "".join(f"{i.blob_sha256}\t{captions[i.position]}\n" for i in kept).encode()
    ).hexdigest()
    assert dataset.content_hash == expected
    (event,) = rig.audit("dataset.approve")
    assert event.actor == LEAD and event.detail["content_hash"] == expected
    # The posted sheet is edited in place to show the decision.
    rig.deliverer.deliver_due()
    sheet_id = rig.sender.id_of(f"review:dataset:{dataset_id}")
    assert any(mid == sheet_id and "Approved by" in it.text for mid, it, _ in rig.sender.edits)
    # Later edits never touch the frozen version.
    rig.run("style caption", {"name": "ink", "number": "1", "text": "changed"})
    assert rig.datasets("ink")[0].content_hash == expected


def test_a_lead_can_reject(rig: Rig) -> None:
    dataset_id = _in_review(rig)
    (reply,) = rig.react(f"review:dataset:{dataset_id}", "❌", user=LEAD)
    assert "rejected **ink** dataset v1" in reply.text
    assert rig.datasets("ink")[0].status == DatasetStatus.REJECTED
    assert len(rig.audit("dataset.reject")) == 1
    assert "rejected by ULEAD" in rig.text("style train", {"name": "ink"})


def test_slack_leads_by_user_group(db: Database, tmp_path: Path) -> None:
    rig = build_rig(db, tmp_path, slack_lead_users=[], slack_lead_group="SLEADS")
    dataset_id = _in_review(rig)
    assert "Only art leads" in rig.react(f"review:dataset:{dataset_id}", "✅", user=LEAD)[0].text
    sheet = rig.sender.id_of(f"review:dataset:{dataset_id}")
    replies = rig.core.handle_reaction(reaction(sheet, "✅", user="U9", roles=["SLEADS"]))
    assert "approved" in replies[0].text


def test_lead_policy_matches_roles_by_name_or_id_and_users() -> None:
    policy = LeadPolicy.from_settings(
        make_settings(
            Path("/tmp"),
            discord_lead_roles=["Art Lead", "123456"],
            slack_lead_users=["U1"],
            slack_lead_group="S9",
        )
    )
    assert policy.is_lead("discord", Actor("u", roles=frozenset({"art lead"})))
    assert policy.is_lead("discord", Actor("u", roles=frozenset({"123456", "Painter"})))
    assert not policy.is_lead("discord", Actor("u", roles=frozenset({"Painter"})))
    assert policy.is_lead("slack", Actor("U1"))
    assert policy.is_lead("slack", Actor("U2", roles=frozenset({"S9"})))
    assert not policy.is_lead("slack", Actor("U2", roles=frozenset({"Art Lead"})))
    assert policy.is_lead("console", Actor("you", roles=frozenset({"lead"})))
    assert not policy.is_lead("console", Actor("sam"))
    nobody = LeadPolicy()
    assert "ATELIER_DISCORD_LEAD_ROLES" in nobody.describe("discord")


def test_x_on_an_image_card_drops_the_image_and_updates_the_sheet(rig: Rig) -> None:
    dataset_id = _in_review(rig)
    rig.deliverer.deliver_due()
    first = rig.images(dataset_id)[0]
    (reply,) = rig.react(f"card:image:{first.id}", "❌", user=LEAD)
    assert "dropped ink #1 from v1" in reply.text
    kept = [i.position for i in rig.images(dataset_id) if not i.dropped]
    assert kept == [2, 3]
    sheet = rig.outbox.get(f"review:dataset:{dataset_id}")
    assert sheet is not None and "2 images for review" in sheet.text and sheet.revision == 2
    assert "dropped by ulead" in rig.outbox.get(f"card:image:{first.id}").text  # type: ignore[union-attr]
    rig.react(f"review:dataset:{dataset_id}", "✅", user=LEAD)
    assert "2 images" in rig.text("style train", {"name": "ink"})
    (event,) = rig.audit("image.drop")
    assert event.detail["number"] == 1


def test_dropping_from_an_approved_version_starts_a_new_draft(rig: Rig) -> None:
    approved_style(rig, seeds=(1, 2))
    v1 = rig.datasets("ink")[0]
    card = rig.images(v1.id)[1]
    (reply,) = rig.react(f"card:image:{card.id}", "❌", user=LEAD)
    assert "from v2 (v1 is frozen, so this started draft v2)" in reply.text
    v1_after, v2 = rig.datasets("ink")
    assert not any(i.dropped for i in rig.images(v1_after.id))
    assert [i.position for i in rig.images(v2.id) if not i.dropped] == [1]


def test_other_emoji_and_removed_reactions_do_nothing(rig: Rig) -> None:
    dataset_id = _in_review(rig)
    assert rig.react(f"review:dataset:{dataset_id}", "👍") == []
    assert rig.react(f"review:dataset:{dataset_id}", "✅", added=False) == []
    assert rig.core.handle_reaction(reaction("not-ours", "✅")) == []
    assert rig.datasets("ink")[0].status == DatasetStatus.IN_REVIEW
