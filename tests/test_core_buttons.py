"""The chat surface in the core: result buttons, aspect ratios, image-to-image, queue
limits, /audit, /style import, auto captions and look-alike names (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
from bot_fixtures import (
    LEAD,
    MEMBER,
    Rig,
    add_model_version,
    approved_style,
    build_rig,
    images,
    mem_file,
    png_bytes,
)
from sqlalchemy import select

from bot.commands import Press
from bot.core.parsing import COMMANDS, help_text
from storage.families import ASPECT_RATIOS, aspect_size
from storage.job_payloads import GeneratePayload, result_key
from storage.models import Generation, Job
from storage.result_buttons import ACTIONS, ButtonId, result_buttons

pytest_plugins = ("bot_fixtures",)
_presses = iter(range(1, 10_000))


def finish(rig: Rig, job_id: int, *, seed: int = 7, count: int = 1, side: int = 64) -> int:
    """Play the runner: record the generation and post its result with its buttons."""
    job = next(j for j in rig.jobs() if j.id == job_id)
    payload = GeneratePayload.model_validate(job.payload)
    blobs = [rig.blobs.put_bytes(png_bytes(seed + i, (side, side))).sha256 for i in range(count)]
    with rig.db.session(write=True) as s:
        generation = Generation(
            team_id=job.team_id,
            job_id=job.id,
            requester=job.requester,
            prompt=payload.prompt,
            negative_prompt=payload.negative_prompt,
            seed=seed,
            steps=payload.steps or 4,
            cfg=payload.cfg or 7.0,
            width=payload.width or side,
            height=payload.height or side,
            sampler=payload.sampler or "Euler",
            base_model=payload.base_model,
            adapters=[a.model_dump() for a in payload.adapters],
            image_blobs=blobs,
            mode=str(payload.mode),
            parent_generation_id=payload.parent_generation_id,
        )
        s.add(generation)
        s.flush()
        generation_id = generation.id
    rig.outbox.put(
        result_key(job_id),
        platform="slack",
        channel="C1",
        team_id=job.team_id,
        text=f"Seed {seed}",
        extra={"generation_id": generation_id, "buttons": result_buttons(generation_id, count)},
    )
    rig.deliverer.deliver_due()
    return generation_id


def press(
    rig: Rig,
    action: str,
    generation_id: int,
    *,
    user: str = MEMBER,
    roles: tuple[str, ...] = (),
    image: int = 1,
    event: str | None = None,
    values: dict[str, str] | None = None,
) -> list[Any]:
    from bot_fixtures import TEAM, actor

    return rig.core.handle_press(
        Press(
            event_id=event or f"press-{next(_presses)}",
            team=TEAM,
            channel="C1",
            user=actor(user, roles),
            button=ButtonId(action, generation_id, image).encode(),
            values=values or {},
        )
    )


def payload_of(job: Job) -> GeneratePayload:
    return GeneratePayload.model_validate(job.payload)


@pytest.fixture
def result(rig: Rig) -> int:
    """A finished /imagine inkstyle result: its generation id."""
    approved_style(rig)
    add_model_version(rig, "ink")
    rig.run("imagine", {"prompt": "inkstyle cat", "seed": "7", "steps": "12"})
    (job,) = rig.jobs("generate")
    return finish(rig, job.id)


# -- the buttons on a result -----------------------------------------------------------------


def test_every_result_message_carries_every_button_with_its_generation(
    rig: Rig, result: int
) -> None:
    (_, item, _) = rig.sender.posts[-1]
    ids = [b["id"] for row in item.extra["buttons"] for b in row]
    assert {i.split(":")[1] for i in ids} == set(ACTIONS)
    assert all(i.split(":")[2] == str(result) for i in ids)
    # A grid gets an Upscale, a subtle and a strong Vary per image...
    rows = result_buttons(5, 4)
    assert [b["label"] for b in rows[1]] == ["U1", "U2", "U3", "U4"]
    assert rows[2][3]["id"] == "atelier:vary-subtle:5:4"
    assert [b["id"] for b in rows[3]] == [f"atelier:vary-strong:5:{i}" for i in range(1, 5)]
    # ... within Discord's 5 rows of 5: 8 images keep Upscale and subtle Vary.
    big = result_buttons(5, 8)
    assert len(big) == 3 and [len(r) for r in big[1:]] == [8, 8]


def test_reroll_button_queues_a_new_seed_recording_its_parent(rig: Rig, result: int) -> None:
    (reply,) = press(rig, "reroll", result, user="U2")
    assert reply.text.startswith("🔁 Queued 1 image") and f"from generation #{result}" in reply.text
    new = payload_of(rig.jobs("generate")[-1])
    assert new.seed is None and new.parent_generation_id == result and new.mode == "reroll"
    assert new.reply.requester == "U2"


def test_the_same_press_delivered_twice_makes_one_job(rig: Rig, result: int) -> None:
    before = len(rig.jobs())
    assert press(rig, "vary-subtle", result, event="ix-1")
    assert press(rig, "vary-subtle", result, event="ix-1") == []
    assert len(rig.jobs()) == before + 1


def test_a_button_from_before_a_restart_still_works(rig: Rig, result: int, tmp_path) -> None:
    again = build_rig(rig.db, tmp_path / "after-restart")  # a new core, nothing in memory
    (reply,) = press(again, "upscale", result)
    assert "Upscale ×2" in reply.text and f"generation #{result}" in reply.text


def test_vary_and_upscale_are_image_to_image_from_the_result(rig: Rig, result: int) -> None:
    with rig.db.session() as s:
        generation = s.get(Generation, result)
    press(rig, "vary-strong", result)
    press(rig, "upscale", result)
    vary, upscale = (payload_of(j) for j in rig.jobs("generate")[-2:])
    assert vary.mode == "vary" and vary.init_image == generation.image_blobs[0]
    assert vary.strength == 0.75 and vary.parent_generation_id == result and vary.seed is None
    assert (vary.width, vary.height) == (generation.width, generation.height)
    assert upscale.mode == "upscale" and upscale.parent_generation_id == result
    assert (upscale.width, upscale.height) == (generation.width * 2, generation.height * 2)
    assert upscale.seed == generation.seed and upscale.adapters == vary.adapters
    assert upscale.strength is not None and upscale.strength < 0.5


def test_a_grids_strong_vary_starts_from_its_own_image(rig: Rig) -> None:
    approved_style(rig)
    add_model_version(rig, "ink")
    rig.run("imagine", {"prompt": "inkstyle cat", "count": "4"})
    (job,) = rig.jobs("generate")
    grid = finish(rig, job.id, count=4)
    (_, item, _) = rig.sender.posts[-1]
    strong = item.extra["buttons"][3]
    assert [b["label"] for b in strong] == [f"V{i} strong" for i in range(1, 5)]
    press(rig, "vary-strong", grid, image=3)
    vary = payload_of(rig.jobs("generate")[-1])
    with rig.db.session() as s:
        generation = s.get(Generation, grid)
    assert vary.init_image == generation.image_blobs[2] and vary.strength == 0.75
    assert vary.parent_generation_id == grid and vary.mode == "vary"


def test_an_image_button_past_the_grid_says_what_exists(rig: Rig, result: int) -> None:
    (reply,) = press(rig, "vary-subtle", result, image=3)
    assert reply.private and "has 1 images; there is no image 3" in reply.text


def test_edit_opens_a_form_then_runs_the_edited_prompt(rig: Rig, result: int) -> None:
    (form_reply,) = press(rig, "edit", result)
    form = form_reply.form
    assert form is not None and form.submit_id == f"atelier:edit:{result}"
    assert [(f.name, f.value) for f in form.fields] == [
        ("prompt", "inkstyle cat"),
        ("negative", ""),
    ]
    jobs_before = len(rig.jobs())
    assert len(rig.jobs()) == jobs_before  # opening the form queues nothing
    (reply,) = press(rig, "edit", result, values={"prompt": "inkstyle dog --ar 16:9"})
    edited = payload_of(rig.jobs("generate")[-1])
    assert "✏️ Edited" in reply.text and edited.prompt == "inkstyle dog"
    assert edited.mode == "edit" and edited.parent_generation_id == result and edited.seed == 7
    assert (edited.width, edited.height) == aspect_size("tiny-sd15", {}, (16, 9))
    assert [a.name for a in edited.adapters] == ["ink"]


def test_delete_by_someone_else_is_refused_privately_and_changes_nothing(
    rig: Rig, result: int
) -> None:
    (reply,) = press(rig, "delete", result, user="U2")
    assert reply.private and f"Only {MEMBER}, who asked for it, or an art lead" in reply.text
    with rig.db.session() as s:
        assert s.get(Generation, result).deleted_at is None
    assert len(rig.audit("generation.delete.refused")) == 1
    assert rig.outbox.get(result_key(rig.jobs("generate")[0].id)).attachments == []


def test_delete_by_the_requester_marks_the_row_and_edits_the_message(rig: Rig, result: int) -> None:
    (reply,) = press(rig, "delete", result, user=MEMBER)
    assert reply.private and f"Deleted generation #{result}" in reply.text
    with rig.db.session() as s:
        generation = s.get(Generation, result)
        assert generation.deleted_by == MEMBER and generation.deleted_at is not None
    (event,) = rig.audit("generation.delete")
    assert event.actor == MEMBER and event.object_id == str(result)
    rig.deliverer.deliver_due()
    (_, edited, files) = rig.sender.edits[-1]
    assert "deleted by" in edited.text and files == [] and "buttons" not in edited.extra
    # Its buttons and 🔁 do nothing any more, and say so.
    (again,) = press(rig, "reroll", result)
    assert "was deleted by" in again.text


def test_a_lead_may_delete_anyones_result(rig: Rig, result: int) -> None:
    (reply,) = press(rig, "delete", result, user=LEAD)
    assert "Deleted" in reply.text


def test_the_reaction_still_rerolls(rig: Rig, result: int) -> None:
    (reply,) = rig.react(result_key(rig.jobs("generate")[0].id), "🔁", user="U2")
    assert reply.text.startswith("🔁 Queued") and payload_of(rig.jobs()[-1]).mode == "reroll"


def test_another_teams_generation_is_not_reachable_by_its_id(rig: Rig, result: int) -> None:
    from bot_fixtures import OTHER_TEAM, actor

    replies = rig.core.handle_press(
        Press("p-other", OTHER_TEAM, "C9", actor("U9"), ButtonId("reroll", result).encode())
    )
    assert "not in this team's records" in replies[0].text


# -- aspect ratios and image-to-image -----------------------------------------------------------


def test_ar_in_the_prompt_or_as_an_option_picks_the_family_size(rig: Rig) -> None:
    rig.run("imagine", {"prompt": "a harbour --ar 16:9"})
    rig.say("/imagine", "a harbour ar=9:16")
    wide, tall = (payload_of(j) for j in rig.jobs("generate"))
    assert wide.prompt == "a harbour" and (wide.width, wide.height) == (112, 64)
    assert (tall.width, tall.height) == (64, 112)
    assert aspect_size("sdxl", {}, (16, 9)) == (1344, 768)
    assert aspect_size("sd15", {}, (3, 2)) == (640, 448)


def test_an_unknown_ratio_lists_the_accepted_ones_and_queues_nothing(rig: Rig) -> None:
    text = rig.text("imagine", {"prompt": "x --ar 7:1"})
    assert "7:1 is not one Atelier accepts" in text
    assert all(f"{w}:{h}" in text for w, h in ASPECT_RATIOS)
    assert (
        "give size or ar, not both"
        in rig.text("imagine", {"prompt": "x", "ar": "1:1", "size": "64x64"}).lower()
    )
    assert rig.jobs() == []


def test_imagine_with_an_attached_image_is_image_to_image(rig: Rig) -> None:
    start = mem_file("start.png", png_bytes(3, (96, 64)))
    (reply,) = rig.run("imagine", {"prompt": "a red boat", "strength": "0.4"}, files=[start])
    job = payload_of(rig.jobs("generate")[0])
    assert job.mode == "img2img" and job.strength == 0.4 and rig.blobs.exists(job.init_image)
    assert (job.width, job.height) == aspect_size("tiny-sd15", {}, (96, 64))
    assert "strength 0.4" in reply.text
    refused = rig.text("imagine", {"prompt": "x"}, files=[mem_file("a.txt", b"not an image")])
    assert "no image was queued" in refused and len(rig.jobs()) == 1
    assert "attach an image" in rig.text("imagine", {"prompt": "x", "strength": "0.5"})


# -- leads' tools -------------------------------------------------------------------------------


def test_a_persons_queued_jobs_are_capped_with_their_queue_shown(db, tmp_path) -> None:
    rig = build_rig(db, tmp_path, max_queued_jobs_per_user=2)
    rig.run("imagine", {"prompt": "one"})
    rig.run("imagine", {"prompt": "two"})
    text = rig.text("imagine", {"prompt": "three"})
    first, second = rig.jobs("generate")
    assert "You already have 2 jobs queued" in text
    assert f"#{first.id} generate, #{second.id} generate" in text and "/cancel" in text
    assert len(rig.jobs()) == 2
    assert "Queued" in rig.text("imagine", {"prompt": "someone else's"}, user="U2")


def test_the_cap_covers_trainings_and_auto_captions_and_stores_nothing(db, tmp_path) -> None:
    from storage.models import TrainingRun

    rig = build_rig(db, tmp_path, max_queued_jobs_per_user=2, caption_model=str(tmp_path / "m"))
    approved_style(rig)
    rig.run("imagine", {"prompt": "one"})
    rig.run("imagine", {"prompt": "two"})
    first, second = rig.jobs("generate")
    drafts = len(rig.datasets("ink"))
    train = rig.text("style train", {"name": "ink"})
    caption = rig.say("/style", "caption ink auto")
    for refusal in (train, caption):
        assert "You already have 2 jobs queued" in refusal
        assert f"#{first.id} generate, #{second.id} generate" in refusal and "/cancel" in refusal
    assert len(rig.jobs()) == 2 and len(rig.datasets("ink")) == drafts
    with rig.db.session() as s:
        assert list(s.scalars(select(TrainingRun))) == []
    # A canceled job frees its place: the training is queued and counts toward the cap.
    rig.run("cancel", {"job": str(first.id)})
    assert "Training **ink**" in rig.text("style train", {"name": "ink"})
    assert "2 jobs queued" in rig.say("/style", "caption ink auto")


def test_audit_is_for_leads_and_filters_by_style(rig: Rig, result: int) -> None:
    (refused,) = rig.run("audit", user=MEMBER)
    assert refused.private and "Only art leads" in refused.text
    rig.run("style create", {"name": "oil", "trigger": "oilstyle"})
    (everything,) = rig.run("audit", {"count": "50"}, user=LEAD)
    assert everything.private and "style.create" in everything.text
    assert "dataset.approve" in everything.text and "generate.request" in everything.text
    (ink,) = rig.run("audit", {"style": "ink"}, user=LEAD)
    assert "Audit trail of style ink" in ink.text and "image.add" in ink.text
    assert "generate.request" in ink.text  # its model was used
    assert "oilstyle" not in ink.text and ink.text.count("style.create") == 1


def test_audit_of_a_style_finds_its_events_behind_thousands_of_newer_ones(
    rig: Rig, result: int
) -> None:
    from storage.models import AuditEvent

    rig.run("style create", {"name": "oil", "trigger": "oilstyle"})
    oil = rig.style("oil")
    with rig.db.session(write=True) as s:
        s.add_all(
            AuditEvent(
                team_id=oil.team_id,
                actor=MEMBER,
                action="image.add",
                object_type="style",
                object_id=str(oil.id),
            )
            for _ in range(2500)
        )
    (ink,) = rig.run("audit", {"style": "ink", "count": "50"}, user=LEAD)
    assert "style.create" in ink.text and "dataset.approve" in ink.text
    assert "image.add" in ink.text and "generate.request" in ink.text
    assert f"style {oil.id} " not in ink.text
    (newest,) = rig.run("audit", {"count": "5"}, user=LEAD)
    assert "(newest first, 5 shown)" in newest.text
    assert newest.text.count(f"image.add · style {oil.id}") == 5


# -- look-alike names ---------------------------------------------------------------------------


def test_names_and_triggers_that_only_look_different_are_refused(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    cyrillic = rig.text("style create", {"name": "іnk", "trigger": "other"})  # і is Cyrillic
    assert "looks the same as the style ink" in cyrillic
    wide = rig.text("style create", {"name": "oil", "trigger": "ｉｎｋｓｔｙｌｅ"})
    assert "looks the same as inkstyle, the trigger of ink" in wide
    assert "Created" in rig.text("style create", {"name": "inks", "trigger": "inkwash"})


# -- imports and auto captions -------------------------------------------------------------------


def test_import_takes_only_safetensors_and_queues_the_check(rig: Rig) -> None:
    pickle = rig.text(
        "style import", {"name": "ink", "trigger": "inkstyle"}, files=[mem_file("x.ckpt", b"P")]
    )
    assert "pickle-based" in pickle and rig.jobs() == []
    assert "Attach exactly one" in rig.text("style import", {"name": "ink", "trigger": "inkstyle"})
    lora = mem_file("ink_v3.safetensors", b"\x08" + b"\0" * 7 + b"{}" * 4)
    text = rig.text("style import", {"name": "ink", "trigger": "inkstyle"}, files=[lora])
    (job,) = rig.jobs("import")
    assert "Created style **ink**" in text and f"job #{job.id}" in text
    assert job.payload["filename"] == "ink_v3.safetensors"
    assert rig.blobs.exists(job.payload["blob_sha256"])
    wrong = rig.text("style import", {"name": "ink", "trigger": "other"}, files=[lora])
    assert "trigger is inkstyle, not other" in wrong


def test_caption_auto_needs_a_model_and_queues_the_caption_job(db, tmp_path) -> None:
    plain = build_rig(db, tmp_path / "a")
    plain.run("style create", {"name": "ink", "trigger": "inkstyle"})
    plain.run("style add", {"name": "ink"}, files=images(1, 2))
    assert "ATELIER_CAPTION_MODEL" in plain.say("/style", "caption ink auto")
    rig = build_rig(db, tmp_path / "b", caption_model=str(tmp_path / "blip"))
    rig.say("/style", "caption ink 1 a person's words")
    text = rig.say("/style", "caption ink auto")
    (job,) = rig.jobs("caption")
    assert "1 image(s)" in text and f"job #{job.id}" in text
    assert "number is missing" not in rig.say("/style", "caption ink auto").lower()


# -- help --------------------------------------------------------------------------------------


def test_help_lists_every_command_option_button_and_choice() -> None:
    text = help_text()
    for spec in COMMANDS.values():
        assert f"`{spec.usage}`" in text
    for action in ACTIONS.values():
        assert action.label in text
    assert "16:9" in text and "dora" in text


def test_readme_chat_section_lists_every_command_option_and_button() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = " ".join(readme.split("## Chat commands", 1)[1].split("\n## ", 1)[0].split())
    for spec in COMMANDS.values():
        assert f"`{spec.usage}`" in section, spec.name  # every command with every option
    for action in ACTIONS.values():
        assert action.label in section, action.name
    for w, h in ASPECT_RATIOS:
        assert f"{w}:{h}" in section


def test_jobs_of_a_press_go_to_the_result_channel(rig: Rig, result: int) -> None:
    press(rig, "reroll", result)
    assert payload_of(rig.jobs()[-1]).reply.channel == "C1"
    with rig.db.session() as s:
        assert s.scalar(select(Generation.mode).where(Generation.id == result)) == "txt2img"
