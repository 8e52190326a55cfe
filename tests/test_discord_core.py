"""Discord end to end through the real CommandCore: a style, its thread, references, review.

Gateway payloads go through discord.py's parsers; REST calls land on the fake Discord;
outbox delivery is the real OutboxDeliverer driving the DiscordSender.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from bot.core.core import CommandCore
from bot.delivery import OutboxDeliverer
from bot.discord.sender import DiscordSender
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import DatasetStatus, DatasetVersion, OutboxMessage, ReferenceImage
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.settings import load_settings
from tests.fake_discord_api import (
    APP_ID,
    ARTIST_ROLE_ID,
    ARTIST_USER,
    CHANNEL_ID,
    GUILD_ID,
    LEAD_ROLE_ID,
    LEAD_USER,
    FakeDiscordAPI,
    attachment_payload,
    connected,
    interaction_payload,
    member_payload,
    message_create_payload,
    patch_route_base,
    reaction_payload,
    settle,
    text_channel_payload,
    thread_payload,
)

ORIGINAL = rf"/webhooks/{APP_ID}/[^/]+/messages/@original"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscordAPI]:
    fake = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    patch_route_base(monkeypatch, fake)
    yield fake
    fake.close()


@pytest.fixture
def core(db: Database, tmp_path: Path) -> Iterator[tuple[CommandCore, Outbox, BlobStore]]:
    settings = load_settings(
        data_dir=tmp_path, discord_lead_roles="Art Lead", min_image_side=0, auto_migrate=False
    )
    blobs = BlobStore(tmp_path / "blobs", settings.max_blob_bytes)
    outbox = Outbox(db)
    yield CommandCore(db, blobs, settings, JobQueue(db), outbox), outbox, blobs


def png(seed: int) -> bytes:
    image = Image.new("RGB", (96, 96), (seed * 40 % 256, 90, 200 - seed))
    for x in range(0, 96, 8):
        image.putpixel((x, seed % 96), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def command(
    interaction_id: int, channel: dict[str, Any], member: dict[str, Any], sub: str, **opts: str
) -> dict[str, Any]:
    return interaction_payload(
        interaction_id=interaction_id,
        application_id=APP_ID,
        guild_id=GUILD_ID,
        channel=channel,
        member=member,
        command_id=1_300_000_000_000_000_900,
        name="style",
        options=[
            {
                "name": sub,
                "type": 1,
                "options": [{"name": k, "type": 3, "value": v} for k, v in opts.items()],
            }
        ],
    )


def test_style_thread_references_and_lead_approval_through_the_core(
    api: FakeDiscordAPI, db: Database, core: tuple[CommandCore, Outbox, BlobStore]
) -> None:
    handler, outbox, blobs = core
    lead = member_payload(LEAD_USER, [LEAD_ROLE_ID])
    artist = member_payload(ARTIST_USER, [ARTIST_ROLE_ID])
    art_channel = text_channel_payload(CHANNEL_ID, GUILD_ID, "art")
    image = png(3)
    image_url = api.serve_file("fox.png", image)

    def status() -> str:
        with db.session() as s:
            return s.scalars(select(DatasetVersion.status)).one()

    async def scenario() -> None:
        async with connected(api, handler) as client:
            deliverer = OutboxDeliverer(outbox, blobs, DiscordSender(client), "discord")

            async def deliver() -> None:
                await asyncio.to_thread(deliverer.deliver_due)

            # 1. A lead creates the style; its announcement opens the references thread.
            client._connection.parse_interaction_create(
                command(
                    1_300_000_000_000_000_001,
                    art_channel,
                    lead,
                    "create",
                    name="inkwash",
                    trigger="inkwsh",
                )
            )
            await settle()
            (created,) = api.find("PATCH", ORIGINAL)
            assert "inkwash" in created.json["content"]
            await deliver()
            (opened,) = api.find("POST", rf"/channels/{CHANNEL_ID}/messages/\d+/threads")
            thread_id = int(opened.path.split("/")[4])
            client._connection.parse_thread_create(
                {
                    **thread_payload(thread_id, GUILD_ID, CHANNEL_ID, "inkwash references"),
                    "newly_created": True,
                }
            )

            # 2. An artist posts an image in that thread; Discord delivers it twice.
            posted = message_create_payload(
                message_id=1_300_000_000_000_000_050,
                channel_id=thread_id,
                guild_id=GUILD_ID,
                member=artist,
                content="",
                attachments=[
                    attachment_payload(1_300_000_000_000_000_051, image_url, "fox.png", len(image))
                ],
            )
            client._connection.parse_message_create(posted)
            await settle()
            client._connection.parse_message_create(posted)
            await settle()
            replies = api.find("POST", rf"/channels/{thread_id}/messages")
            assert len(replies) == 1, [r.json for r in replies]
            assert "fox.png" in replies[0].json["content"]

            # 3. Review from inside the thread: the sheet goes to the thread.
            thread_channel = thread_payload(thread_id, GUILD_ID, CHANNEL_ID, "inkwash references")
            client._connection.parse_interaction_create(
                command(1_300_000_000_000_000_002, thread_channel, artist, "review", name="inkwash")
            )
            await settle()
            await deliver()
            with db.session() as s:
                sheet = s.scalars(
                    select(OutboxMessage).where(OutboxMessage.key.like("review:dataset:%"))
                ).one()
                assert sheet.thread == str(thread_id)
                sheet_id = int(sheet.platform_message_id or 0)
            assert sheet_id
            sheet_post = api.messages[str(sheet_id)]
            assert sheet_post["channel_id"] == str(thread_id)
            assert sheet_post["attachments"]  # the contact sheet image
            assert status() == DatasetStatus.IN_REVIEW

            # 4. The artist's ✅ changes nothing; the lead's approves.
            for who, member in ((ARTIST_USER, artist), (LEAD_USER, lead)):
                client._connection.parse_message_reaction_add(
                    reaction_payload(
                        user_id=int(who["id"]),
                        channel_id=thread_id,
                        message_id=sheet_id,
                        guild_id=GUILD_ID,
                        emoji="✅",
                        member=member,
                        message_author_id=APP_ID,
                    )
                )
                await settle()
                if who is ARTIST_USER:
                    assert status() == DatasetStatus.IN_REVIEW
            assert status() == DatasetStatus.APPROVED
            # The refusal went to the artist alone (a DM), not to the thread.
            (dm,) = api.find("POST", "/users/@me/channels")
            assert dm.json == {"recipient_id": int(ARTIST_USER["id"])}
            (refusal,) = [
                c
                for c in api.find("POST", r"/channels/\d+/messages")
                if c.path.split("/")[2] not in (str(CHANNEL_ID), str(thread_id))
            ]
            assert "lead" in refusal.json["content"].lower()

    asyncio.run(scenario())
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(ReferenceImage)) == 1


def test_an_attachment_off_discords_file_servers_is_refused_with_the_reason(
    api: FakeDiscordAPI, db: Database, core: tuple[CommandCore, Outbox, BlobStore]
) -> None:
    handler, outbox, blobs = core
    lead = member_payload(LEAD_USER, [LEAD_ROLE_ID])
    art_channel = text_channel_payload(CHANNEL_ID, GUILD_ID, "art")
    api.serve_file("planted.png", png(4))
    planted = f"http://localhost:{api.port}/attachments/planted.png"  # not Discord's host

    async def scenario() -> list[str]:
        async with connected(api, handler) as client:
            deliverer = OutboxDeliverer(outbox, blobs, DiscordSender(client), "discord")
            style = {"name": "ink", "trigger": "inkwsh"}
            client._connection.parse_interaction_create(
                command(1_300_000_000_000_000_001, art_channel, lead, "create", **style)
            )
            await settle()
            await asyncio.to_thread(deliverer.deliver_due)
            (opened,) = api.find("POST", rf"/channels/{CHANNEL_ID}/messages/\d+/threads")
            thread_id = int(opened.path.split("/")[4])
            client._connection.parse_thread_create(
                {**thread_payload(thread_id, GUILD_ID, CHANNEL_ID, "ink"), "newly_created": True}
            )
            client._connection.parse_message_create(
                message_create_payload(
                    message_id=1_300_000_000_000_000_060,
                    channel_id=thread_id,
                    guild_id=GUILD_ID,
                    member=lead,
                    content="",
                    attachments=[
                        attachment_payload(1_300_000_000_000_000_061, planted, "planted.png", 100)
                    ],
                )
            )
            await settle()
            return [c.json["content"] for c in api.find("POST", rf"/channels/{thread_id}/messages")]

    said = asyncio.run(scenario())
    assert any(
        "planted.png: not an https link to Discord's file servers, so it was not downloaded; "
        "attach the image to a message again." in text
        for text in said
    ), said
    assert api.find("GET", "/attachments/planted.png") == []
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(ReferenceImage)) == 0
