"""Styles and reference images: create, add (with refusals), captions, list/info/export, teams."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import Database
from storage.models import (
    AuditEvent,
    Caption,
    CaptionSource,
    DatasetStatus,
    DatasetVersion,
    OutboxMessage,
    ReferenceImage,
    Style,
)

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import (  # noqa: E402
    LEAD,
    OTHER_TEAM,
    Rig,
    add_model_version,
    approved_style,
    build_rig,
    images,
    mem_file,
    png_bytes,
)

pytest_plugins = ("bot_fixtures",)


# -- create -------------------------------------------------------------------------------


def test_create_makes_the_style_and_its_thread_announcement(rig: Rig) -> None:
    text = rig.text("style create", {"name": "Ink", "trigger": "inkstyle", "kind": "concept"})
    assert "Created concept **ink** with trigger `inkstyle` on tiny-sd15" in text
    style = rig.style("ink")
    assert (style.trigger, style.kind, style.base_model, style.owner) == (
        "inkstyle",
        "concept",
        "tiny-sd15",
        "U1",
    )
    item = rig.outbox.get(f"style:{style.id}:thread")
    assert item is not None and item.extra["start_thread"] is True
    assert [e.object_id for e in rig.audit("style.create")] == [str(style.id)]


def test_trigger_is_unique_per_team_in_any_case(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    again = rig.run("style create", {"name": "ink2", "trigger": "InkStyle"})
    assert "already switches on style ink" in again[0].text and again[0].private
    same_name = rig.text("style create", {"name": "INK", "trigger": "other"})
    assert "already has a style named ink" in same_name
    # Another team may reuse both.
    assert "Created" in rig.text(
        "style create", {"name": "ink", "trigger": "inkstyle"}, team=OTHER_TEAM
    )
    assert rig.count(Style) == 2


def test_common_word_trigger_is_allowed_with_a_warning(rig: Rig) -> None:
    text = rig.text("style create", {"name": "ink", "trigger": "ink"})
    assert "Created" in text and "common word" in text and "`inkstyle`" in text
    plain = rig.text("style create", {"name": "zx", "trigger": "zxqink"})
    assert "common word" not in plain


def test_unknown_base_model_is_refused(rig: Rig) -> None:
    text = rig.text("style create", {"name": "ink", "trigger": "inkstyle", "base": "sd99"})
    assert "no base model 'sd99'" in text and "tiny-sd15" in text
    assert rig.count(Style) == 0


def test_configured_base_models_are_accepted(db: Database, tmp_path: Path) -> None:
    rig = build_rig(db, tmp_path, base_models={"sd15": "/models/sd15"}, default_base_model="sd15")
    assert "on sd15" in rig.text("style create", {"name": "ink", "trigger": "inkstyle"})
    assert "on tiny-sdxl" in rig.text(
        "style create", {"name": "b", "trigger": "bstyle", "base": "tiny-sdxl"}
    )


# -- add ------------------------------------------------------------------------------------


def test_add_stores_images_with_numbers_and_audit(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    text = rig.text("style add", {"name": "ink"}, files=images(1, 2))
    assert "draft v1: added 2 of 2 files" in text
    assert "✓ ref1.png → #1" in text and "✓ ref2.png → #2" in text
    (dataset,) = rig.datasets("ink")
    assert dataset.status == DatasetStatus.DRAFT
    stored = rig.images(dataset.id)
    assert [i.position for i in stored] == [1, 2]
    assert all(rig.blobs.exists(i.blob_sha256) for i in stored)
    assert len(rig.audit("image.add")) == 2


def test_oversized_and_non_image_files_store_nothing(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    blobs_before = rig.blob_count()
    declared_reads: list[int] = []
    files = [
        # Declared too big: refused before any download.
        mem_file("huge.png", b"", size=5_000_000, reads=declared_reads),
        # No declared size, but the read passes the limit.
        mem_file("big.png", png_bytes(1, (900, 900), "BMP")[:250_000]),
        mem_file("notes.pdf", b"%PDF-1.7 not an image"),
        mem_file("anim.gif", b"GIF89a" + b"\x00" * 100),
    ]
    replies = rig.run("style add", {"name": "ink"}, files=files)
    text = replies[0].text
    assert "Nothing was added to **ink**" in text
    assert "huge.png is 5.0 MB; Atelier takes images up to 0.2 MB" in text
    assert "big.png is over the 0.2 MB limit" in text
    assert "notes.pdf is a PDF, not an image" in text
    assert "anim.gif is a GIF" in text
    assert declared_reads == []
    assert rig.count(ReferenceImage) == 0 and rig.count(DatasetVersion) == 0
    assert rig.blob_count() == blobs_before
    assert rig.audit("image.add") == []


def test_mixed_batch_stores_only_the_good_files(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    files = [*images(1), mem_file("x.txt", b"hello"), *images(2)]
    text = rig.text("style add", {"name": "ink"}, files=files)
    assert "added 2 of 3 files" in text and "✗ x.txt is not an image" in text
    assert rig.count(ReferenceImage) == 2


def test_small_image_is_stored_with_a_warning(db: Database, tmp_path: Path) -> None:
    rig = build_rig(db, tmp_path, min_image_side=512)
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    text = rig.text("style add", {"name": "ink"}, files=images(1))
    assert "✓ ref1.png → #1" in text and "⚠ ref1.png is only 96×96 pixels" in text
    (image,) = rig.images(rig.datasets("ink")[0].id)
    assert any("96×96" in w for w in image.warnings)


def test_duplicates_are_flagged_or_skipped(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    rig.run("style add", {"name": "ink"}, files=images(1))
    near = mem_file("ref1.jpg", png_bytes(1, fmt="JPEG"))  # same picture, other encoding
    exact = mem_file("copy.png", png_bytes(1))
    text = rig.text("style add", {"name": "ink"}, files=[exact, near])
    assert "copy.png: already in ink as #1, not added again" in text
    assert "✓ ref1.jpg → #2" in text and "looks like #1 (near-duplicate)" in text
    assert rig.count(ReferenceImage) == 2


def test_images_posted_in_the_styles_thread_are_ingested(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    rig.deliverer.deliver_due()
    thread = rig.sender.id_of(f"style:{rig.style('ink').id}:thread")
    text = rig.text("style add", {}, thread=thread, files=images(5))
    assert "**ink** draft v1: added 1" in text
    assert rig.style("ink").thread_ref == thread  # remembered for the next image
    reads: list[int] = []
    elsewhere = [mem_file("holiday.png", png_bytes(6), reads=reads)]
    assert rig.run("style add", {}, thread="some-other-thread", files=elsewhere) == []
    assert "no style 'inc'" in rig.text("style add", {"name": "inc"}, files=elsewhere)
    assert reads == []  # never downloaded: not ours to look at
    assert rig.count(ReferenceImage) == 1


def test_add_to_an_approved_dataset_starts_a_new_draft(rig: Rig) -> None:
    approved_style(rig, seeds=(1, 2))
    v1 = rig.datasets("ink")[0]
    text = rig.text("style add", {"name": "ink"}, files=images(3))
    assert "draft v2" in text and "v1 is approved, so this started draft v2" in text
    v1_after, v2 = rig.datasets("ink")
    assert v1_after.content_hash == v1.content_hash and v1_after.status == DatasetStatus.APPROVED
    assert [i.position for i in rig.images(v1.id)] == [1, 2]  # frozen
    assert [i.position for i in rig.images(v2.id)] == [1, 2, 3]
    assert v2.status == DatasetStatus.DRAFT


def test_add_without_files_or_style_explains(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    assert "Attach at least one image" in rig.text("style add", {"name": "ink"})
    assert "no style 'nope'" in rig.text("style add", {"name": "nope"}, files=images(1))
    assert "Usage: `/style add [name]`" in rig.text("style add", {}, files=images(1))
    assert rig.count(ReferenceImage) == 0


# -- captions ---------------------------------------------------------------------------------


def test_human_caption_wins_over_auto_caption(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    rig.run("style add", {"name": "ink"}, files=images(1))
    (image,) = rig.images(rig.datasets("ink")[0].id)
    text = rig.text("style caption", {"name": "ink", "number": "1", "text": "a fox in the rain"})
    assert "Caption of ink #1 (draft v1): a fox in the rain" in text
    with rig.db.session(write=True) as s:  # the runner's auto-captioner answers later
        s.add(
            Caption(image_id=image.id, text="a picture", source=CaptionSource.AUTO, author="blip")
        )
    info = rig.text("style info", {"name": "ink"})
    assert "#1 ref1.png: a fox in the rain (human)" in info
    assert "no image #9" in rig.text("style caption", {"name": "ink", "number": "9", "text": "x"})


def test_caption_on_an_approved_version_goes_to_a_new_draft(rig: Rig) -> None:
    approved_style(rig, seeds=(1, 2))
    text = rig.text("style caption", {"name": "ink", "number": "2", "text": "two"})
    assert "(draft v2)" in text and "v1 is approved, so this edit started draft v2" in text
    _v1, v2 = rig.datasets("ink")
    with rig.db.session() as s:
        captioned = s.scalars(select(Caption).join(ReferenceImage).where(Caption.text == "two"))
        assert [c.image.dataset_version_id for c in captioned] == [v2.id]


# -- list / info / export, and teams ------------------------------------------------------------


def test_another_team_can_neither_list_nor_use_a_style(rig: Rig) -> None:
    approved_style(rig)
    add_model_version(rig, "ink")
    assert "ink" in rig.text("style list")
    other = {"team": OTHER_TEAM}
    assert "no styles yet" in rig.text("style list", **other)
    for name in ("style info", "style review", "style train", "style export"):
        assert "no style 'ink' in this team" in rig.text(name, {"name": "ink"}, **other)
    assert "no style 'ink'" in rig.text("style add", {"name": "ink"}, files=images(9), **other)
    text = rig.text("style caption", {"name": "ink", "number": "1", "text": "x"}, **other)
    assert "no style 'ink'" in text
    # The trigger word means nothing in the other team: a plain generation, no adapter.
    rig.run("imagine", {"prompt": "a cat, inkstyle"}, **other)
    (job,) = rig.jobs("generate")
    assert job.payload["adapters"] == []
    assert "<lora:ink> names no style" in rig.text("imagine", {"prompt": "<lora:ink> cat"}, **other)
    # Reactions on team one's sheet from team two do nothing.
    dataset = rig.datasets("ink")[0]
    replies = rig.react(f"review:dataset:{dataset.id}", "❌", user=LEAD, team=OTHER_TEAM)
    assert replies == []
    assert rig.datasets("ink")[0].status == DatasetStatus.APPROVED


def test_info_and_list_describe_datasets_models_and_runs(rig: Rig) -> None:
    approved_style(rig, seeds=(1, 2))
    add_model_version(rig, "ink", approved=True)
    rig.run("style train", {"name": "ink"})
    listing = rig.text("style list")
    assert (
        "**ink** `inkstyle` (style): dataset v1 approved, 2 images; model v1 (approved)" in listing
    )
    info = rig.text("style info", {"name": "ink"})
    assert "Dataset v1 approved, 2 images (approved by ULEAD)" in info
    assert "Model v1 (lora, tiny-sd15, approved by ULEAD)" in info
    assert "Last training run: queued" in info


def test_export_sends_the_files_named_for_each_tool(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    assert "no trained model yet" in rig.text("style export", {"name": "ink"})
    add_model_version(rig, "ink", version=1, kohya=b"old", diffusers=b"old-d")
    add_model_version(rig, "ink", version=2, kohya=b"kohya-bytes", diffusers=b"diffusers-bytes")
    (reply,) = rig.run("style export", {"name": "ink"})
    assert [(f.filename, f.data) for f in reply.files] == [
        ("inkstyle.safetensors", b"kohya-bytes"),
        ("inkstyle-diffusers.safetensors", b"diffusers-bytes"),
    ]
    assert "model v2" in reply.text
    assert "ComfyUI → models/loras" in reply.text and "A1111/Forge → models/Lora" in reply.text
    assert "InvokeAI" in reply.text and "DoRA" not in reply.text
    assert len(rig.audit("model.export")) == 1


def test_a_dora_export_says_which_tools_apply_it_as_trained(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    add_model_version(rig, "ink", kohya=b"k", diffusers=b"d", method="dora")
    (reply,) = rig.run("style export", {"name": "ink"})
    line = next(x for x in reply.text.splitlines() if x.startswith("• DoRA"))
    assert "ComfyUI and Forge apply" in line and "A1111 and InvokeAI do not" in line


def test_every_write_is_audited_with_its_team(rig: Rig) -> None:
    approved_style(rig)
    with rig.db.session() as s:
        actions = [(e.action, e.team_id is not None) for e in s.scalars(select(AuditEvent))]
    assert ("style.create", True) in actions and ("dataset.approve", True) in actions
    with rig.db.session() as s:
        assert s.scalar(select(OutboxMessage).where(OutboxMessage.key.like("review:%")))
