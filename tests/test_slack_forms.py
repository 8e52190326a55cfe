"""Slack modals for typed commands: a bare `/style train`, `/style create` or `/imagine`
opens a modal whose options are pick lists (the team's styles, presets, methods, base
models, kinds, aspect ratios); its view_submission runs the same neutral command a typed
one does. Through the real slack_bolt App with signed payloads, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_slack_api import file_share_event, reaction_event, signed_headers, view_submission_form
from slack_bolt import BoltRequest
from sqlalchemy import select
from test_slack_core import (
    ARTIST,
    FORM,
    LEAD,
    SECRET,
    Studio,
    create_style_with_thread,
    open_studio,
    png,
)

from bot.core.parsing import METHOD_CHOICES
from storage.db import Database
from storage.job_payloads import GeneratePayload
from storage.models import DatasetVersion, Job, Style, TrainingRun
from storage.training_bounds import PRESETS


@pytest.fixture
def studio(db: Database, tmp_path: Path) -> Iterator[Studio]:
    with open_studio(db, tmp_path) as opened:
        yield opened


def _opened_view(studio: Studio) -> dict[str, Any]:
    opened = studio.fake.calls_to("views.open")[-1]
    view = opened.params["view"]
    return json.loads(view) if isinstance(view, str) else view


def _elements(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {block["block_id"]: block["element"] for block in view["blocks"]}


def _options(element: dict[str, Any]) -> list[str]:
    assert element["type"] == "static_select"
    return [option["value"] for option in element["options"]]


def _submit(studio: Studio, view: dict[str, Any], view_id: str, **kw: Any) -> None:
    body = view_submission_form(
        view["callback_id"], view_id=view_id, private_metadata=view["private_metadata"], **kw
    )
    headers = signed_headers(SECRET, body, content_type=FORM)
    assert studio.app.dispatch(BoltRequest(body=body, headers=headers)).status == 200


def _jobs(studio: Studio) -> list[Job]:
    with studio.db.session() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def _approved(studio: Studio) -> None:
    thread = create_style_with_thread(studio)
    files = [studio.fake.add_file(png(i), f"r{i}.png") for i in range(3)]
    studio.event(file_share_event(files, thread_ts=thread), "Ev0REFS")
    studio.slash("/style", "review ink", "trig.review")
    studio.deliver()
    with studio.db.session() as s:
        dataset_id = s.scalar(select(DatasetVersion.id))
    sheet_ts = studio.posted_ts(f"review:dataset:{dataset_id}")
    studio.event(reaction_event("white_check_mark", item_ts=sheet_ts, user=LEAD), "Ev0YES")


def test_style_train_modal_picks_style_preset_and_method_and_runs_the_training(
    studio: Studio,
) -> None:
    _approved(studio)
    studio.slash("/style", "create oil oilstyle", "trig.oil")
    assert studio.slash("/style", "train", "trig-train-form", user_id=ARTIST) == []
    view = _opened_view(studio)
    assert studio.fake.calls_to("views.open")[-1].params["trigger_id"] == "trig-train-form"
    elements = _elements(view)
    assert _options(elements["name"]) == ["ink", "oil"]  # the team's own styles
    assert _options(elements["preset"]) == list(PRESETS)
    assert _options(elements["method"]) == list(METHOD_CHOICES)
    assert elements["steps"]["type"] == "plain_text_input"
    assert _jobs(studio) == []  # opening the form runs nothing

    picked = {"name": "ink", "preset": "concept", "method": "dora"}
    _submit(studio, view, "V0TRAIN1", values={"steps": "40", "rank": "", "lr": ""}, picked=picked)
    _submit(studio, view, "V0TRAIN1", values={"steps": "40", "rank": "", "lr": ""}, picked=picked)
    (job,) = _jobs(studio)  # one submission, however often Slack sends it
    with studio.db.session() as s:
        (run,) = s.scalars(select(TrainingRun))
        style = s.get(Style, run.style_id)
        assert style is not None and style.name == "ink"
    assert run.method == "dora" and run.params == {"preset": "concept", "steps": 40}
    said = [c.params["text"] for c in studio.fake.calls_to("chat.postMessage")]
    assert any("Training *ink*" in text and f"job #{job.id}" in text for text in said)


def test_a_submitted_form_gets_the_typed_commands_checks(studio: Studio) -> None:
    studio.slash("/style", "create ink inkstyle", "trig.ink")
    studio.slash("/style", "train", "trig-train-2", user_id=ARTIST)
    view = _opened_view(studio)
    _submit(studio, view, "V0TRAIN2", values={"steps": "lots"}, picked={"name": "ink"})
    assert _jobs(studio) == []
    (said,) = [c.params for c in studio.fake.calls_to("chat.postEphemeral")]
    assert said["user"] == ARTIST and "steps" in said["text"]


def test_style_create_modal_offers_base_models_and_kinds(studio: Studio) -> None:
    studio.slash("/style", "create", "trig-create-form")
    elements = _elements(_opened_view(studio))
    assert "tiny-sd15" in _options(elements["base"]) and "toy-sd15" in _options(elements["base"])
    assert _options(elements["kind"]) == ["style", "concept"]
    assert elements["name"]["type"] == "plain_text_input"  # a new name is typed
    view = _opened_view(studio)
    _submit(
        studio,
        view,
        "V0CREATE",
        values={"name": "ink", "trigger": "inkstyle"},
        picked={"kind": "concept", "base": "tiny-sdxl"},
    )
    with studio.db.session() as s:
        (style,) = s.scalars(select(Style))
    assert (style.name, style.kind, style.base_model) == ("ink", "concept", "tiny-sdxl")


def test_imagine_modal_offers_aspect_ratios_and_queues_the_generation(studio: Studio) -> None:
    studio.slash("/imagine", "", "trig-imagine-form", user_id=ARTIST)
    view = _opened_view(studio)
    elements = _elements(view)
    assert elements["prompt"]["multiline"] is True and "16:9" in _options(elements["ar"])
    assert "strength" not in elements  # image-to-image needs an attached image
    _submit(studio, view, "V0IMAGINE", values={"prompt": "a lighthouse"}, picked={"ar": "16:9"})
    (job,) = _jobs(studio)
    payload = GeneratePayload.model_validate(job.payload)
    assert payload.prompt == "a lighthouse" and payload.width > payload.height
    assert job.requester == ARTIST


def test_typed_commands_with_options_still_run_directly(studio: Studio) -> None:
    studio.slash("/imagine", "a cat", "trig-typed")
    studio.slash("/style", "list", "trig-list")
    assert studio.fake.calls_to("views.open") == []
    assert len(_jobs(studio)) == 1
