"""Work that goes to the queue: /style train, /imagine, 🔁 rerolls, /jobs and /cancel."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from storage.db import Database
from storage.families import ASPECT_RATIOS, BUILTIN_MODELS, FAMILIES, aspect_size, check_size
from storage.job_payloads import GeneratePayload, Priority, TrainPayload, batch_key, result_key
from storage.models import Generation, JobStatus, RunStatus, TrainingRun

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import (  # noqa: E402
    LEAD,
    MEMBER,
    OTHER_TEAM,
    Rig,
    add_model_version,
    approved_style,
    build_rig,
    command,
    images,
)

pytest_plugins = ("bot_fixtures",)


# -- train ------------------------------------------------------------------------------------


def test_train_on_an_unapproved_dataset_explains_what_is_missing(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    assert "no images at all" in rig.text("style train", {"name": "ink"})
    rig.run("style add", {"name": "ink"}, files=images(1, 2))
    draft = rig.text("style train", {"name": "ink"})
    assert "v1 is a draft with 2 images" in draft and "`/style review ink`" in draft
    rig.run("style review", {"name": "ink"})
    waiting = rig.text("style train", {"name": "ink"})
    assert "waiting for an art lead's ✅" in waiting and "ATELIER_SLACK_LEAD_USERS" in waiting
    assert rig.jobs() == [] and rig.count(TrainingRun) == 0


def test_train_creates_a_run_and_its_job_together(rig: Rig) -> None:
    approved_style(rig)
    args = {"name": "ink", "steps": "300", "rank": "8", "lr": "2e-4"}
    text = rig.text("style train", args, event="train-1")
    (job,) = rig.jobs("train")
    assert f"job #{job.id}, 1st in line" in text and "3 images" in text
    with rig.db.session() as s:
        (run,) = s.scalars(select(TrainingRun))
    assert run.job_id == job.id and run.status == RunStatus.QUEUED and run.method == "lora"
    assert run.params == {"preset": "style", "steps": 300, "rank": 8, "learning_rate": 2e-4}
    assert run.dataset_version_id == rig.datasets("ink")[0].id
    payload = TrainPayload.model_validate(job.payload)
    assert payload.training_run_id == run.id
    assert (payload.reply.platform, payload.reply.channel, payload.reply.requester) == (
        "slack",
        "C1",
        MEMBER,
    )
    assert job.priority == Priority.TRAIN and job.base_model == "tiny-sd15"
    assert job.idempotency_key == "slack:train-1:train"
    assert "already training (job #" in rig.text("style train", {"name": "ink"})


def test_a_redelivered_event_creates_one_job(rig: Rig) -> None:
    approved_style(rig)
    first = command("style train", {"name": "ink"}, event="Ev-dup")
    assert "Training" in rig.core.handle(first)[0].text
    assert rig.core.handle(first) == []  # Slack retried: nothing again, no second reply
    assert len(rig.jobs("train")) == 1 and rig.count(TrainingRun) == 1
    imagine = command("imagine", {"prompt": "a cat"}, event="Ev-img")
    rig.core.handle(imagine)
    rig.core.handle(imagine)
    assert len(rig.jobs("generate")) == 1


def test_train_ignores_a_newer_unapproved_draft_and_says_so(rig: Rig) -> None:
    approved_style(rig, seeds=(1, 2))
    rig.run("style add", {"name": "ink"}, files=images(3))
    text = rig.text("style train", {"name": "ink", "method": "dora"})
    assert "approved dataset v1 (2 images)" in text and "v2 (draft) is newer" in text
    with rig.db.session() as s:
        (run,) = s.scalars(select(TrainingRun))
    assert run.method == "dora" and run.dataset_version_id == rig.datasets("ink")[0].id


# -- imagine ------------------------------------------------------------------------------------


def test_imagine_with_a_trigger_uses_that_styles_model(rig: Rig) -> None:
    approved_style(rig)
    old = add_model_version(rig, "ink", version=1, approved=True)
    add_model_version(rig, "ink", version=2)  # newer but not approved: the approved one wins
    args = {"prompt": "A harbour at dawn, InkStyle", "seed": "7", "size": "64x64", "count": "2"}
    text = rig.text("imagine", args, event="img-1")
    (job,) = rig.jobs("generate")
    assert f"job #{job.id}, 1st in line" in text and "ink ×1" in text and "seed 7" in text
    payload = GeneratePayload.model_validate(job.payload)
    assert [(a.model_version_id, a.name, a.trigger, a.weight) for a in payload.adapters] == [
        (old, "ink", "inkstyle", 1.0)
    ]
    assert (payload.seed, payload.width, payload.height, payload.count) == (7, 64, 64, 2)
    assert payload.prompt == "A harbour at dawn, InkStyle" and payload.base_model == "tiny-sd15"
    assert job.priority == Priority.GENERATE and job.batch_key == batch_key(payload)
    assert job.idempotency_key == "slack:img-1" and job.team_id is not None


def test_imagine_prefers_the_latest_model_when_none_is_approved(rig: Rig) -> None:
    approved_style(rig)
    add_model_version(rig, "ink", version=1)
    newest = add_model_version(rig, "ink", version=2)
    rig.run("imagine", {"prompt": "inkstyle cat"})
    (job,) = rig.jobs("generate")
    assert job.payload["adapters"][0]["model_version_id"] == newest


def test_a_trigger_without_a_trained_model_gets_a_clear_reply(rig: Rig) -> None:
    approved_style(rig)
    replies = rig.run("imagine", {"prompt": "a cat in inkstyle"})
    assert "`inkstyle` is the trigger of ink, which has no trained model yet" in replies[0].text
    assert replies[0].private and rig.jobs("generate") == []


def test_trigger_must_be_a_whole_word(rig: Rig) -> None:
    approved_style(rig)
    add_model_version(rig, "ink")
    rig.run("imagine", {"prompt": "inkstyles and notinkstyle"})
    (job,) = rig.jobs("generate")
    assert job.payload["adapters"] == []


def test_lora_tags_and_several_styles_combine(rig: Rig) -> None:
    approved_style(rig)
    approved_style(rig, "sketch", "sketchy", seeds=(4, 5))
    ink = add_model_version(rig, "ink")
    sketch = add_model_version(rig, "sketch")
    rig.run("imagine", {"prompt": "a cat <lora:ink:0.6> sketchy"})
    (job,) = rig.jobs("generate")
    chosen = {a["model_version_id"]: a["weight"] for a in job.payload["adapters"]}
    assert chosen == {ink: 0.6, sketch: 1.0}
    assert "not a number" in rig.text("imagine", {"prompt": "<lora:ink:lots> cat"})
    assert "between -4 and 4" in rig.text("imagine", {"prompt": "<lora:ink:9> cat"})


# Prompts, and whether they select style "zx" (trigger "ZXStyle"). The runner's parser must
# answer the same: one rule for both (storage.prompt_rules).
SELECTS_ZX = [
    ("a ZXStyle cat", True),
    ("a zxstyle cat", True),
    ("zxstyle, a cat", True),
    ("a zxstyles cat", False),
    ("a zxstyle-like cat", False),  # "-" belongs to a word, as it may belong to a trigger
    ("a pre-zxstyle cat", False),
    ("a cat <lora:zx:0.5>", True),
    ("a cat <lora:ZXSTYLE:0.5>", True),  # by trigger: what Atelier's own infotext writes
    ("a zxstyle cat <lora:zxstyle:-0.5>", True),  # the tag's weight wins over the word's
]


@pytest.mark.parametrize(("prompt", "selected"), SELECTS_ZX)
def test_chat_and_runner_select_the_same_styles(rig: Rig, prompt: str, selected: bool) -> None:
    from gpu_runner.prompts import AdapterInfo, parse_prompt

    approved_style(rig, "zx", "ZXStyle")
    add_model_version(rig, "zx")
    rig.run("imagine", {"prompt": prompt})
    (job,) = rig.jobs("generate")
    chat = [(a["name"], a["weight"]) for a in job.payload["adapters"]]
    zx = AdapterInfo("zx", "/loras/ZXStyle.safetensors", trigger="ZXStyle")
    runner = [(u.adapter.name, u.weight) for u in parse_prompt(prompt, {"ZXStyle": zx}).adapters]
    assert chat == runner
    assert bool(chat) == selected


def test_a_trigger_applies_its_base_models_trigger_weight_and_a_tag_overrides_it(
    rig: Rig,
) -> None:
    from gpu_runner.prompts import AdapterInfo, parse_prompt
    from storage.families import trigger_weight

    toy = trigger_weight("toy-sd15")
    assert toy < 1.0 and trigger_weight("tiny-sd15") == 1.0
    approved_style(rig, "zx", "ZXStyle")
    add_model_version(rig, "zx", base="toy-sd15")
    zx = {"ZXStyle": AdapterInfo("zx", "/loras/ZXStyle.safetensors", trigger="ZXStyle")}
    for prompt, weight in [("a ZXStyle cat", toy), ("a ZXStyle cat <lora:zx:1>", 1.0)]:
        rig.run("imagine", {"prompt": prompt})
        chat = [(a["name"], a["weight"]) for a in rig.jobs("generate")[-1].payload["adapters"]]
        runner = [(u.adapter.name, u.weight) for u in parse_prompt(prompt, zx, toy).adapters]
        assert chat == runner == [("zx", weight)], prompt


def test_atelier_infotext_pasted_back_selects_its_style_at_its_weight(rig: Rig) -> None:
    from gpu_runner.png_metadata import (
        A1111Parameters,
        LoraRef,
        format_parameters,
        parse_parameters,
    )

    approved_style(rig, "ink", "InkStyle")
    ink = add_model_version(rig, "ink")
    # The runner names the LoRA by its trigger: the exported file's stem, which A1111 finds.
    infotext = format_parameters(
        A1111Parameters(
            prompt="a harbour at dawn, InkStyle",
            negative_prompt="",
            steps=20,
            sampler="Euler a",
            cfg=7.0,
            seed=3,
            width=64,
            height=64,
            loras=(LoraRef("InkStyle", 0.8, "ab" * 32),),
        )
    )
    pasted = parse_parameters(infotext)["prompt"]
    assert "<lora:InkStyle:0.8>" in pasted
    rig.run("imagine", {"prompt": pasted})
    (job,) = rig.jobs("generate")
    assert [(a["model_version_id"], a["weight"]) for a in job.payload["adapters"]] == [(ink, 0.8)]


def test_a_style_named_twice_in_tags_is_refused(rig: Rig) -> None:
    approved_style(rig)
    add_model_version(rig, "ink")
    text = rig.text("imagine", {"prompt": "<lora:ink:0.5> cat <lora:inkstyle:1>"})
    assert "ink is named twice in <lora:...> tags" in text and rig.jobs("generate") == []


def test_styles_on_different_base_models_cannot_combine(rig: Rig) -> None:
    approved_style(rig)
    approved_style(rig, "sketch", "sketchy", seeds=(4, 5))
    add_model_version(rig, "ink", base="tiny-sd15")
    add_model_version(rig, "sketch", base="tiny-sdxl")
    assert "different base models" in rig.text("imagine", {"prompt": "inkstyle sketchy"})
    assert rig.jobs("generate") == []


def test_compare_needs_a_style(rig: Rig) -> None:
    text = rig.text("imagine", {"prompt": "a cat", "compare": "yes"})
    assert "put a style's trigger word in the prompt" in text


@pytest.mark.parametrize(
    ("family", "size", "refusal"),
    [
        ("flux1", "1000x1000", "FLUX.1 draws sides in steps of 16: use size=992x992 or "
         "size=1008x1008."),
        ("zimage", "1024x600", "Z-Image draws sides in steps of 16: use size=1024x592 or "
         "size=1024x608."),
        ("qwenimage", "1000x1328", "Qwen-Image draws sides in steps of 16: use size=992x1328 or"),
        ("flux2-klein", "72", "FLUX.2 [klein] draws sides in steps of 16: use size=64x64 or"),
        ("sdxl", "1000x1000", None),  # SD's VAE factor of 8 is its whole grid
    ],
    ids=["flux1", "zimage", "qwenimage", "flux2-klein", "sdxl"],
)  # fmt: skip
def test_a_size_off_the_familys_grid_is_refused_naming_the_nearest(
    db: Database, tmp_path: Path, family: str, size: str, refusal: str | None
) -> None:
    configured = {"base": {"source": "/models/base", "family": family}}
    rig = build_rig(db, tmp_path, base_models=configured, default_base_model="base")
    text = rig.text("imagine", {"prompt": "a harbour", "size": size})
    if refusal is None:
        (job,) = rig.jobs("generate")
        assert (job.payload["width"], job.payload["height"]) == (1000, 1000)
    else:
        assert refusal in text and rig.jobs("generate") == []


@pytest.mark.parametrize(
    ("family", "base"),
    [(f, "base") for f in FAMILIES] + [(m.family, m.name) for m in BUILTIN_MODELS.values()],
)
def test_every_aspect_ratio_gives_a_size_on_the_familys_grid(family: str, base: str) -> None:
    configured = {"base": {"source": "/models/base", "family": family}}
    for ratio in ASPECT_RATIOS:
        width, height = aspect_size(base, configured, ratio)
        check_size(family, width, height)  # raises off the grid
        assert min(width, height) >= 64


# -- reroll ---------------------------------------------------------------------------------------


def _finish_with_result(rig: Rig, job_id: int, seed: int) -> int:
    """Play the runner: record a generation and post its result message."""
    job = next(j for j in rig.jobs() if j.id == job_id)
    with rig.db.session(write=True) as s:
        generation = Generation(
            team_id=job.team_id,
            job_id=job.id,
            requester=job.requester,
            prompt=job.payload["prompt"],
            seed=seed,
            steps=25,
            cfg=7.0,
            width=512,
            height=512,
            sampler="euler_a",
            base_model=job.payload["base_model"],
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
    )
    return generation_id


def test_reroll_on_a_result_queues_the_same_request_with_a_new_seed(rig: Rig) -> None:
    approved_style(rig)
    add_model_version(rig, "ink")
    rig.run("imagine", {"prompt": "inkstyle cat", "seed": "7", "steps": "12"})
    (first,) = rig.jobs("generate")
    generation_id = _finish_with_result(rig, first.id, seed=7)
    (reply,) = rig.react(result_key(first.id), "🔁", user="U2")
    assert reply.text.startswith("🔁 Queued 1 image") and "random seed" in reply.text
    second = rig.jobs("generate")[-1]
    assert second.id != first.id and second.requester == "U2"
    old, new = (GeneratePayload.model_validate(j.payload) for j in (first, second))
    assert new.seed is None and new.reroll_of == generation_id
    lineage = {"seed", "reroll_of", "reply", "mode", "parent_generation_id"}
    assert new.model_dump(exclude=lineage) == old.model_dump(exclude=lineage)
    assert new.mode == "reroll" and new.parent_generation_id == generation_id
    assert new.reply.channel == old.reply.channel and new.reply.requester == "U2"
    assert len(rig.audit("generate.reroll")) == 1


def test_a_reroll_on_something_else_does_nothing(rig: Rig) -> None:
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    assert rig.react(f"style:{rig.style('ink').id}:thread", "🔁") == []
    assert rig.jobs() == []


# -- jobs and cancel ----------------------------------------------------------------------------


def test_jobs_lists_mine_and_the_teams_queue_with_positions(rig: Rig) -> None:
    approved_style(rig)
    rig.run("style train", {"name": "ink"}, user="U2")
    rig.run("imagine", {"prompt": "first"}, user=MEMBER)
    rig.run("imagine", {"prompt": "second"}, user="U3")
    (reply,) = rig.run("jobs", user=MEMBER)
    assert reply.private
    mine, team = reply.text.split("**Team queue**")
    train, gen1, gen2 = rig.jobs("train") + rig.jobs("generate")
    assert f"#{gen1.id} generate “first” queued, 1st in line" in mine
    assert "second" not in mine and "train" not in mine
    assert f"#{gen2.id} generate “second” queued, 2nd in line by U3" in team
    assert f"#{train.id} train ink queued, 3rd in line by U2" in team


def test_cancel_own_job_and_refuse_someone_elses(rig: Rig) -> None:
    approved_style(rig)
    rig.run("style train", {"name": "ink"}, user="U2")
    (job,) = rig.jobs("train")
    refused = rig.run("cancel", {"job": str(job.id)}, user=MEMBER)
    assert "only they or an art lead can cancel it" in refused[0].text
    assert rig.jobs("train")[0].status == JobStatus.QUEUED
    assert len(rig.audit("job.cancel.refused")) == 1
    assert "Canceled job" in rig.text("cancel", {"job": f"#{job.id}"}, user="U2")
    assert rig.jobs("train")[0].status == JobStatus.CANCELED
    with rig.db.session() as s:
        assert s.scalar(select(TrainingRun.status)) == RunStatus.CANCELED
    assert "already ended" in rig.text("cancel", {"job": str(job.id)}, user="U2")


def test_a_lead_may_cancel_any_job_but_not_another_teams(rig: Rig) -> None:
    rig.run("imagine", {"prompt": "a cat"}, user="U2")
    (job,) = rig.jobs("generate")
    assert "no job" in rig.text("cancel", {"job": str(job.id)}, user=LEAD, team=OTHER_TEAM)
    assert "Canceled job" in rig.text("cancel", {"job": str(job.id)}, user=LEAD)
