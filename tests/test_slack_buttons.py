"""Result buttons on Slack end to end: the real slack_bolt App with signed block_actions and
view_submission payloads, the real core and database (SQLite and PostgreSQL), the real
SlackSender drawing Block Kit buttons on the fake Web API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_slack_api import (
    block_actions_form,
    signed_headers,
    view_submission_form,
)
from slack_bolt import BoltRequest
from test_slack_core import ARTIST, FORM, LEAD, SECRET, Studio, open_studio, png

from storage.db import Database
from storage.job_payloads import GeneratePayload, result_key
from storage.models import Generation, Job
from storage.result_buttons import ButtonId, result_buttons


@pytest.fixture
def studio(db: Database, tmp_path: Path) -> Iterator[Studio]:
    with open_studio(db, tmp_path) as opened:
        yield opened


def _finish(studio: Studio, job: Job) -> int:
    """Play the runner: a generation and its result message with buttons."""
    payload = GeneratePayload.model_validate(job.payload)
    blob = studio.core.services.blobs.put_bytes(png(5, 64)).sha256
    with studio.db.session(write=True) as s:
        generation = Generation(
            team_id=job.team_id,
            job_id=job.id,
            requester=job.requester,
            prompt=payload.prompt,
            seed=11,
            steps=payload.steps or 4,
            cfg=payload.cfg or 7,
            width=payload.width or 64,
            height=payload.height or 64,
            sampler=payload.sampler or "Euler",
            base_model=payload.base_model,
            image_blobs=[blob],
        )
        s.add(generation)
        s.flush()
        generation_id = generation.id
    from storage.outbox import Attachment

    studio.outbox.put(
        result_key(job.id),
        platform="slack",
        channel=payload.reply.channel,
        team_id=job.team_id,
        text="**a lighthouse**\nSeed 11",
        attachments=[Attachment(blob, "atelier-1-seed11.png")],
        extra={"generation_id": generation_id, "buttons": result_buttons(generation_id, 1)},
    )
    studio.deliver()
    return generation_id


def _dispatch(studio: Studio, body: str) -> int:
    headers = signed_headers(SECRET, body, content_type=FORM)
    return studio.app.dispatch(BoltRequest(body=body, headers=headers)).status


def _jobs(studio: Studio) -> list[Job]:
    with studio.db.session() as s:
        from sqlalchemy import select

        return list(s.scalars(select(Job).order_by(Job.id)))


def _blocks(params: dict[str, Any]) -> list[dict[str, Any]]:
    raw = params.get("blocks")
    return json.loads(raw) if isinstance(raw, str) else raw or []


def _result(studio: Studio) -> tuple[int, str]:
    studio.slash("/imagine", "a lighthouse", "trig-imagine", user_id=ARTIST)
    (job,) = _jobs(studio)
    generation_id = _finish(studio, job)
    return generation_id, studio.posted_ts(result_key(job.id))


def test_results_show_every_button_and_a_press_queues_one_job(studio: Studio) -> None:
    generation_id, ts = _result(studio)
    # The upload's message got its buttons by chat.update (a file comment takes no blocks).
    update = studio.fake.calls_to("chat.update")[-1].params
    ids = [e["action_id"] for b in _blocks(update) if b["type"] == "actions" for e in b["elements"]]
    assert ids == [
        f"atelier:reroll:{generation_id}",
        f"atelier:vary-subtle:{generation_id}:1",
        f"atelier:vary-strong:{generation_id}:1",
        f"atelier:upscale:{generation_id}:1",
        f"atelier:edit:{generation_id}",
        f"atelier:delete:{generation_id}",
    ]
    vary = ButtonId("vary-subtle", generation_id).encode()
    body = block_actions_form(vary, trigger_id="111.222.aaa", message_ts=ts, user="U0BOB0001")
    assert _dispatch(studio, body) == 200
    assert _dispatch(studio, body) == 200  # Slack delivered it twice: one job
    jobs = _jobs(studio)
    assert len(jobs) == 2
    new = GeneratePayload.model_validate(jobs[-1].payload)
    assert new.mode == "vary" and new.parent_generation_id == generation_id
    assert new.reply.requester == "U0BOB0001"
    posted = studio.fake.calls_to("chat.postMessage")[-1].params
    assert "Variation" in posted["text"] and f"generation #{generation_id}" in posted["text"]


def test_a_button_from_before_a_restart_works(studio: Studio) -> None:
    generation_id, ts = _result(studio)
    studio.restart()
    reroll = ButtonId("reroll", generation_id).encode()
    assert _dispatch(studio, block_actions_form(reroll, trigger_id="t-restart", message_ts=ts))
    assert GeneratePayload.model_validate(_jobs(studio)[-1].payload).mode == "reroll"


def test_delete_by_a_non_requester_is_refused_privately(studio: Studio) -> None:
    generation_id, ts = _result(studio)
    delete = ButtonId("delete", generation_id).encode()
    _dispatch(
        studio, block_actions_form(delete, trigger_id="t-del", message_ts=ts, user="U0BOB0001")
    )
    (refusal,) = studio.fake.calls_to("chat.postEphemeral")
    assert refusal.params["user"] == "U0BOB0001" and "Only U0ALICE01" in refusal.params["text"]
    with studio.db.session() as s:
        assert s.get(Generation, generation_id).deleted_at is None
    # The lead may: the message is edited to say so and loses its buttons.
    (uploaded,) = studio.fake.messages[ts].file_ids
    _dispatch(studio, block_actions_form(delete, trigger_id="t-del2", message_ts=ts, user=LEAD))
    studio.deliver()
    update = studio.fake.calls_to("chat.update")[-1].params
    assert "deleted by" in update["text"] and _blocks(update) == []
    # The image goes too: an edit leaves a message's files, so the upload is deleted.
    assert [c.params["file"] for c in studio.fake.calls_to("files.delete")] == [uploaded]
    assert uploaded not in studio.fake.files and studio.fake.messages[ts].file_ids == []


def test_edit_opens_a_modal_and_its_submission_runs_the_new_prompt(studio: Studio) -> None:
    generation_id, ts = _result(studio)
    edit = ButtonId("edit", generation_id).encode()
    _dispatch(studio, block_actions_form(edit, trigger_id="t-edit", message_ts=ts))
    (opened,) = studio.fake.calls_to("views.open")
    view = opened.params["view"]
    view = json.loads(view) if isinstance(view, str) else view
    assert opened.params["trigger_id"] == "t-edit" and view["callback_id"] == edit
    assert view["blocks"][0]["element"]["initial_value"] == "a lighthouse"
    assert len(_jobs(studio)) == 1
    body = view_submission_form(
        edit,
        {"prompt": "a lighthouse at night --ar 16:9", "negative": ""},
        view_id="V0EDIT01",
        private_metadata=view["private_metadata"],
    )
    assert _dispatch(studio, body) == 200
    edited = GeneratePayload.model_validate(_jobs(studio)[-1].payload)
    assert edited.prompt == "a lighthouse at night" and edited.mode == "edit"
    assert edited.parent_generation_id == generation_id and edited.width > edited.height
