"""A lead picks the checkpoint the team uses: a run keeps its earlier checkpoints as files
with their samples in a grid (a row each), `/style use NAME STEP` makes one the style's
version, `/imagine` then draws with it, and `/style versions` lists every version with its
dataset, recipe, loss and approver. On SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bot_fixtures import png_bytes
from runner_fixtures import console_studio
from sqlalchemy import select

from storage.models import Generation, ModelVersion

pytest_plugins = ("runner_fixtures", "bot_fixtures")
pytestmark = pytest.mark.runner


def _trained_with_a_checkpoint(db_url: str, tmp_path: Path) -> tuple[Any, str]:
    """A console studio whose ink trained 100 steps, and the messages that posted. The
    built-in tiny model checkpoints every 50 steps: one earlier checkpoint, at 50."""
    studio = console_studio(db_url, tmp_path)
    studio.approved_style("tiny-sd15", {f"p{n}.png": png_bytes(n) for n in (1, 2, 3, 4)})
    studio.session.run_line("/style train ink steps=100")
    return studio, studio.work()


def test_a_lead_picks_an_earlier_checkpoint_and_imagine_draws_with_it(
    db_url: str, tmp_path: Path, tiny_builders: Any
) -> None:
    studio, trained = _trained_with_a_checkpoint(db_url, tmp_path)
    session, services, work = studio.session, studio.services, studio.work
    assert "picks an earlier checkpoint (steps 50;" in trained, trained
    assert "`/style use ink STEP`" in trained and "checkpoints.png" in trained
    with services.db.session() as s:
        (final,) = s.scalars(select(ModelVersion))
        kept = final.file_metadata["checkpoints"]
    assert [c["step"] for c in kept] == [50] and final.validation["step"] == 100
    assert kept[0]["kohya_blob"] != final.kohya_blob  # another point of the same run
    listed = "\n".join(session.run_line("/style versions ink"))
    assert "v1 · lora · tiny-sd15 · dataset v1 · step 100" in listed, listed
    assert "checkpoints at 50" in listed and "steps=100" in listed and "**in use**" in listed

    session.run_line("as sam")
    assert "Only art leads" in "\n".join(session.run_line("/style use ink 50"))
    session.run_line("as you lead")
    missing = "\n".join(session.run_line("/style use ink 70"))
    assert "no checkpoint at step 70; its steps are 50, 100" in missing
    picked = "\n".join(session.run_line("/style use ink 50"))
    assert "picked **ink** v2 (step 50 of v1's run)" in picked, picked

    session.run_line("/imagine inkstyle, a harbour seed=3 steps=2")
    work()
    session.run_line("/style use ink 100")  # back to the final version
    session.run_line("/imagine inkstyle, a harbour seed=3 steps=2")
    work()
    with services.db.session() as s:
        at_50, at_100 = s.scalars(select(Generation).order_by(Generation.id)).all()
        v1, v2 = s.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
    assert v2.kohya_blob == kept[0]["kohya_blob"] and v2.approved_by
    # Each picture names the file it drew with: the checkpoint's, then the final one's.
    (drawn_50,) = [a["sha256"] for a in at_50.record["adapters"]]
    (drawn_100,) = [a["sha256"] for a in at_100.record["adapters"]]
    assert drawn_50 in (v2.kohya_blob, v2.diffusers_blob)
    assert drawn_100 in (v1.kohya_blob, v1.diffusers_blob)
    assert services.blobs.read_bytes(at_50.image_blobs[0]) != services.blobs.read_bytes(
        at_100.image_blobs[0]
    )
    listed = "\n".join(session.run_line("/style versions ink"))
    lines = {line.split(" · ")[0]: line for line in listed.splitlines()[1:]}
    assert "**in use**" in lines["• v1"] and "**in use**" not in lines["• v2"]
    assert "step 50 of v1's run" in lines["• v2"] and "approved by" in lines["• v2"]


def test_a_lead_picks_a_checkpoint_by_reacting_with_its_row_number(
    db_url: str, tmp_path: Path, tiny_builders: Any
) -> None:
    studio, trained = _trained_with_a_checkpoint(db_url, tmp_path)
    session, services = studio.session, studio.services
    # checkpoints.png: row 1 step 50, row 2 the final step 100.
    assert "or a reaction: 1️⃣ for its first row, 2️⃣ for the last" in trained, trained
    result = next(m for m in trained.split("\n[") if "is trained" in m)
    number = result.split("]")[0].lstrip("[")

    session.run_line("as sam")
    assert "Only art leads" in "\n".join(session.run_line(f"react {number} 1️⃣"))
    session.run_line("as you lead")
    too_far = "\n".join(session.run_line(f"react {number} 3️⃣"))
    assert "has 2 rows: react 1️⃣–2️⃣, or `/style use ink STEP` with a step of 50, 100" in too_far
    picked = "\n".join(session.run_line(f"react {number} 1️⃣"))
    assert "picked **ink** v2 (step 50 of v1's run)" in picked, picked
    with services.db.session() as s:
        picked_version = s.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()[1]
        assert picked_version.validation["step"] == 50 and picked_version.approved_by == "you"
    picked = "\n".join(session.run_line(f"react {number} 2️⃣"))  # the last row: v1 itself
    assert "picked **ink** v1 (step 100 of v1's run)" in picked, picked


def test_slack_names_keycaps_as_the_core_reads_them() -> None:
    from bot.core.core import normalize_emoji
    from bot.slack.translate import emoji_of
    from storage.training_summary import row_of

    assert [row_of(normalize_emoji(emoji_of(n) or "")) for n in ("one", "five", "nine")] == [
        1, 5, 9,
    ]  # fmt: skip
    assert row_of(normalize_emoji("🔟")) is None and row_of("✅") is None
