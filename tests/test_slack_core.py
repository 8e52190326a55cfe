"""Slack end to end through the real CommandCore and database.

Signed Slack requests go through the real slack_bolt App; the core writes rows and outbox
messages; the real OutboxDeliverer posts them with the SlackSender to the fake Web API,
whose message ts then serve as the style's thread and as the review sheet to react on.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_slack_api import (
    FakeSlackApi,
    InlineExecutor,
    event_callback,
    file_share_event,
    reaction_event,
    signed_headers,
    slash_command_form,
)
from PIL import Image
from slack_bolt import App, BoltRequest
from slack_sdk import WebClient
from sqlalchemy import select

from bot.core.core import CommandCore
from bot.delivery import OutboxDeliverer
from bot.slack.app import build_slack_app
from bot.slack.sender import SlackSender
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import DatasetStatus, DatasetVersion, Job, ReferenceImage, Style
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.settings import Settings

SECRET = "e2e-signing-secret-0123456789abcd"
FORM = "application/x-www-form-urlencoded"
LEADS = "S0LEADS01"
LEAD = "U0LEAD001"
ARTIST = "U0ALICE01"


@dataclass
class Studio:
    fake: FakeSlackApi
    db: Database
    core: CommandCore
    outbox: Outbox
    deliverer: OutboxDeliverer
    client: WebClient
    app: App

    def restart(self) -> None:
        """A new App, as after a bot restart: nothing remembered in memory."""
        self.app = _app(self.core, self.client)

    def slash(self, command: str, text: str, trigger: str, **kw: str) -> list[dict]:
        before = len(self.fake.calls_to("respond"))
        body = slash_command_form(
            command, text, response_url=self.fake.response_url(), trigger_id=trigger, **kw
        )
        headers = signed_headers(SECRET, body, content_type=FORM)
        assert self.app.dispatch(BoltRequest(body=body, headers=headers)).status == 200
        return [c.params for c in self.fake.calls_to("respond")[before:]]

    def event(self, event: dict, event_id: str, *, retry: int | None = None) -> None:
        body = json.dumps(event_callback(event, event_id=event_id))
        headers = signed_headers(SECRET, body, content_type="application/json")
        if retry is not None:
            headers["x-slack-retry-num"] = str(retry)
        assert self.app.dispatch(BoltRequest(body=body, headers=headers)).status == 200

    def deliver(self) -> None:
        self.deliverer.deliver_due()

    def posted_ts(self, key: str) -> str:
        item = self.outbox.get(key)
        assert item is not None and item.platform_message_id, f"{key} was not posted"
        return item.platform_message_id


def _app(core: CommandCore, client: WebClient) -> App:
    return build_slack_app(
        core,
        core.text_parser,
        client=client,
        signing_secret=SECRET,
        lead_groups=[LEADS],
        executor=InlineExecutor(),
    )


@pytest.fixture
def studio(db: Database, tmp_path: Path) -> Iterator[Studio]:
    with open_studio(db, tmp_path) as opened:
        yield opened


@contextmanager
def open_studio(db: Database, tmp_path: Path) -> Iterator[Studio]:
    """The real App, core and sender on a fake Slack Web API (also for other test files)."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        slack_lead_group=LEADS,
        min_image_side=0,
        max_upload_bytes=60_000,
        auto_migrate=False,
    )
    blobs = BlobStore(tmp_path / "blobs", settings.max_blob_bytes)
    outbox = Outbox(db)
    core = CommandCore(db, blobs, settings, JobQueue(db), outbox)
    with FakeSlackApi().running() as fake:
        fake.usergroups[LEADS] = [LEAD]
        client = WebClient(token=fake.bot_token, base_url=fake.api_url)
        sender = SlackSender(client, sleep=lambda _s: None)
        deliverer = OutboxDeliverer(outbox, blobs, sender, "slack")
        yield Studio(fake, db, core, outbox, deliverer, client, _app(core, client))


def png(seed: int, side: int = 96) -> bytes:
    image = Image.new("RGB", (side, side), (seed * 40 % 256, 90, 200 - seed))
    for x in range(0, side, 8):
        image.putpixel((x, seed % side), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def noisy_png(side: int) -> bytes:
    image = Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def reference_count(db: Database) -> int:
    with db.session() as s:
        return len(list(s.scalars(select(ReferenceImage))))


def create_style_with_thread(studio: Studio) -> str:
    studio.slash("/style", "create ink inkstyle", "trig.create")
    studio.deliver()
    with studio.db.session() as s:
        style_id = s.scalar(select(Style.id).where(Style.name == "ink"))
    return studio.posted_ts(f"style:{style_id}:thread")


def test_style_create_then_list_over_signed_slash_commands(studio: Studio) -> None:
    created = studio.slash("/style", "create ink inkstyle", "trig.1")
    assert any("ink" in r["text"] for r in created)

    listed = studio.slash("/style", "list", "trig.2")
    assert len(listed) == 1
    assert "ink" in listed[0]["text"] and "inkstyle" in listed[0]["text"]

    # Another workspace cannot even list it.
    other = studio.slash("/style", "list", "trig.3", team_id="T0OTHER01", team_domain="rival")
    assert all("inkstyle" not in r["text"] for r in other)


def test_the_announcement_becomes_the_thread_that_takes_images_once(studio: Studio) -> None:
    thread = create_style_with_thread(studio)
    announcement = studio.fake.messages[thread]
    assert "ink" in announcement.text and announcement.thread_ts is None

    files = [studio.fake.add_file(png(1), "a.png"), studio.fake.add_file(png(2), "b.png")]
    upload = file_share_event(files, thread_ts=thread, user=ARTIST)
    studio.event(upload, "Ev0IMAGES")
    assert reference_count(studio.db) == 2
    downloads = studio.fake.calls_to("download")
    assert len(downloads) == 2
    assert all(d.headers["Authorization"] == f"Bearer {studio.fake.bot_token}" for d in downloads)
    [reply] = [c for c in studio.fake.calls_to("chat.postMessage") if c.params.get("thread_ts")]
    assert reply.params["thread_ts"] == thread

    studio.event(upload, "Ev0IMAGES", retry=1)  # Slack's retry: acked, not run
    studio.restart()
    studio.event(upload, "Ev0IMAGES", retry=2)  # after a restart: the core's guard
    assert reference_count(studio.db) == 2
    assert len(studio.fake.calls_to("download")) == 2


def test_oversized_image_in_the_thread_gets_a_clear_reply_and_stores_nothing(
    studio: Studio,
) -> None:
    thread = create_style_with_thread(studio)
    big = noisy_png(200)
    assert len(big) > 60_000
    studio.event(
        file_share_event([studio.fake.add_file(big, "huge.png")], thread_ts=thread), "Ev0BIG"
    )
    assert reference_count(studio.db) == 0
    said = [c.params["text"] for c in studio.fake.calls_to("chat.postEphemeral")]
    said += [
        c.params["text"]
        for c in studio.fake.calls_to("chat.postMessage")
        if c.params.get("thread_ts") == thread
    ]
    assert any("huge.png" in text for text in said), said


def _thread_replies(studio: Studio, thread: str) -> list[str]:
    said = [c.params["text"] for c in studio.fake.calls_to("chat.postEphemeral")]
    return said + [
        c.params["text"]
        for c in studio.fake.calls_to("chat.postMessage")
        if c.params.get("thread_ts") == thread
    ]


def test_a_file_link_off_slacks_file_server_is_not_followed_and_stores_nothing(
    studio: Studio,
) -> None:
    thread = create_style_with_thread(studio)
    shared = studio.fake.add_file(png(1), "planted.png")
    port = studio.fake.url.rsplit(":", 1)[1]
    shared["url_private"] = f"http://localhost:{port}/files-pri/T-F/planted.png"
    studio.event(file_share_event([shared], thread_ts=thread), "Ev0PLANTED")
    assert reference_count(studio.db) == 0
    assert studio.fake.calls_to("download") == []
    # The reason reaches the person, not just "could not be downloaded".
    reason = (
        "planted.png: its link does not lead to Slack's file server, so it was not downloaded; "
        "share the image in Slack again."
    )
    assert any(reason in t for t in _thread_replies(studio, thread))


def test_an_image_named_outside_ascii_is_taken(studio: Studio) -> None:
    thread = create_style_with_thread(studio)
    shared = studio.fake.add_file(png(2), "café-ü.png")
    studio.event(file_share_event([shared], thread_ts=thread), "Ev0CAFE")
    with studio.db.session() as s:
        assert list(s.scalars(select(ReferenceImage.original_name))) == ["café-ü.png"]
    assert any("✓ café-ü.png → #1" in t for t in _thread_replies(studio, thread))


def test_only_a_lead_groups_check_mark_approves_the_dataset(studio: Studio) -> None:
    thread = create_style_with_thread(studio)
    files = [studio.fake.add_file(png(i), f"r{i}.png") for i in range(3)]
    studio.event(file_share_event(files, thread_ts=thread), "Ev0REFS")
    studio.slash("/style", "review ink", "trig.review")
    studio.deliver()

    with studio.db.session() as s:
        dataset_id = s.scalar(select(DatasetVersion.id))
    sheet_ts = studio.posted_ts(f"review:dataset:{dataset_id}")
    sheet = studio.fake.messages[sheet_ts]
    assert sheet.file_ids, "the contact sheet is posted as an image"

    def status() -> DatasetStatus:
        with studio.db.session() as s:
            return DatasetStatus(s.scalar(select(DatasetVersion.status)))

    studio.event(reaction_event("white_check_mark", item_ts=sheet_ts, user=ARTIST), "Ev0NOPE")
    assert status() == DatasetStatus.IN_REVIEW
    studio.event(reaction_event("white_check_mark", item_ts=sheet_ts, user=LEAD), "Ev0YES")
    assert status() == DatasetStatus.APPROVED


def test_a_redelivered_imagine_makes_one_job(studio: Studio) -> None:
    studio.slash("/imagine", "a fox in the snow seed=7", "trig.fox")
    studio.restart()
    studio.slash("/imagine", "a fox in the snow seed=7", "trig.fox")
    with studio.db.session() as s:
        jobs = list(s.scalars(select(Job)))
    assert len(jobs) == 1


def test_bot_scheduler_fits_as_the_deliverer_factory(studio: Studio, tmp_path: Path) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    from bot.scheduler import build_scheduler
    from bot.slack.run import SlackBot
    from storage.queue import JobQueue

    made: list[BackgroundScheduler] = []

    def factory(sender: SlackSender) -> BackgroundScheduler:
        deliverer = OutboxDeliverer(studio.outbox, studio.deliverer.blobs, sender, "slack")
        made.append(
            build_scheduler(
                deliverers=[deliverer], queue=JobQueue(studio.db), blobs=studio.deliverer.blobs
            )
        )
        return made[-1]

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        slack_bot_token=studio.fake.bot_token,
        slack_signing_secret=SECRET,
    )
    bot = SlackBot(
        settings,
        studio.core,
        factory,
        http_host="127.0.0.1",
        http_port=0,
        base_url=studio.fake.api_url,
    )
    bot.start()
    [scheduler] = made
    assert scheduler.running
    assert {job.id for job in scheduler.get_jobs()} >= {"deliver:slack"}
    bot.stop()
    assert not scheduler.running
