"""Result buttons on Discord with discord.py's own objects: result messages carry the
components, component (type 3) and modal-submit (type 5) interactions from documented
payloads reach the core as Presses, Edit answers with a modal, presses are deferred first."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from bot.commands import Form, FormField, Reply
from bot.discord.sender import DiscordSender
from storage.result_buttons import result_buttons
from tests.fake_discord_api import (
    APP_ID,
    ARTIST_ROLE_ID,
    ARTIST_USER,
    CHANNEL_ID,
    GUILD_ID,
    FakeDiscordAPI,
    RecordingHandler,
    connected,
    member_payload,
    patch_route_base,
    settle,
    text_channel_payload,
)
from tests.test_discord_sender import outbox_item

CALLBACK = r"/interactions/\d+/[^/]+/callback"
FOLLOWUP = rf"/webhooks/{APP_ID}/[^/]+"
MESSAGES = r"/channels/\d+/messages"
EPHEMERAL = 64


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscordAPI]:
    fake = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    patch_route_base(monkeypatch, fake)
    yield fake
    fake.close()


def _message(message_id: int) -> dict[str, Any]:
    return {
        "id": str(message_id),
        "channel_id": str(CHANNEL_ID),
        "author": {
            "id": str(APP_ID),
            "username": "atelier",
            "discriminator": "0",
            "avatar": None,
            "bot": True,
        },
        "content": "Seed 11",
        "timestamp": "2025-01-01T12:00:00.000000+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
        "components": [],
    }


def interaction(kind: int, data: dict[str, Any], interaction_id: int) -> dict[str, Any]:
    """INTERACTION_CREATE for a MESSAGE_COMPONENT (3) or MODAL_SUBMIT (5) in a guild."""
    return {
        "id": str(interaction_id),
        "application_id": str(APP_ID),
        "type": kind,
        "data": data,
        "guild": {"id": str(GUILD_ID), "locale": "en-US", "features": []},
        "guild_id": str(GUILD_ID),
        "channel": text_channel_payload(CHANNEL_ID, GUILD_ID, "art"),
        "channel_id": str(CHANNEL_ID),
        "member": {
            **member_payload(ARTIST_USER, [ARTIST_ROLE_ID]),
            "permissions": "2248473465835073",
        },
        "message": _message(1_300_000_000_000_000_500),
        "token": f"aW50ZXJhY3Rpb246{interaction_id}",
        "version": 1,
        "app_permissions": "2248473465835073",
        "locale": "en-GB",
        "guild_locale": "en-US",
        "entitlements": [],
        "authorizing_integration_owners": {"0": str(GUILD_ID)},
        "context": 0,
        "attachment_size_limit": 10_485_760,
    }


def button(custom_id: str, interaction_id: int = 1_400_000_000_000_000_001) -> dict[str, Any]:
    return interaction(3, {"custom_id": custom_id, "component_type": 2}, interaction_id)


def modal_submit(custom_id: str, values: dict[str, str]) -> dict[str, Any]:
    rows = [
        {"type": 1, "components": [{"type": 4, "custom_id": k, "value": v}]}
        for k, v in values.items()
    ]
    return interaction(5, {"custom_id": custom_id, "components": rows}, 1_400_000_000_000_000_009)


class PressHandler(RecordingHandler):
    def __init__(self, answer: Any) -> None:
        super().__init__()
        self.presses: list[Any] = []
        self.answer = answer

    def handle_press(self, press: Any) -> list[Any]:
        self.presses.append(press)
        return self.answer(press)


def feed(api: FakeDiscordAPI, handler: Any, *payloads: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with connected(api, handler) as client:
            for payload in payloads:
                client._connection.parse_interaction_create(payload)
                await settle()

    asyncio.run(scenario())


def test_result_messages_carry_the_buttons_as_components(api: FakeDiscordAPI) -> None:
    extra = {"generation_id": 42, "buttons": result_buttons(42, 4)}

    async def scenario() -> None:
        async with connected(api, RecordingHandler()) as client:
            await asyncio.to_thread(DiscordSender(client).post, outbox_item(extra=extra), [])

    asyncio.run(scenario())
    (call,) = api.find("POST", MESSAGES)
    rows = call.json["components"]
    ids = [[c["custom_id"] for c in row["components"]] for row in rows]
    assert ids[0] == ["atelier:reroll:42", "atelier:edit:42", "atelier:delete:42"]
    assert ids[1] == [f"atelier:upscale:42:{i}" for i in range(1, 5)]
    assert ids[3] == [f"atelier:vary-strong:42:{i}" for i in range(1, 5)]
    assert rows[3]["components"][0]["label"] == "V1 strong"
    assert all(len(row) <= 5 for row in ids) and len(ids) <= 5
    assert rows[0]["components"][2]["style"] == 4  # Delete is red


def test_a_press_is_deferred_then_reaches_the_core_and_answers(api: FakeDiscordAPI) -> None:
    handler = PressHandler(lambda _p: [Reply("🔁 Queued."), Reply("Only for you.", private=True)])
    payload = button("atelier:reroll:42")
    feed(api, handler, payload)
    (callback,) = api.find("POST", CALLBACK)
    assert callback.json == {"type": 6}  # DEFERRED_UPDATE_MESSAGE: acked, nothing shown
    (press,) = handler.presses
    assert press.button == "atelier:reroll:42" and press.event_id == payload["id"]
    assert press.team.external_id == str(GUILD_ID) and press.user.user_id == ARTIST_USER["id"]
    public, private = api.find("POST", FOLLOWUP)
    assert public.json["content"] == "🔁 Queued." and not public.json.get("flags", 0) & EPHEMERAL
    assert private.json["flags"] & EPHEMERAL


def test_edit_answers_with_a_modal_and_its_submit_carries_the_values(api: FakeDiscordAPI) -> None:
    form = Form("atelier:edit:42", "Edit and run again", (FormField("prompt", "Prompt", "a fox"),))

    def answer(press: Any) -> list[Reply]:
        return [Reply("", private=True, form=form)] if not press.values else [Reply("✏️ Queued")]

    handler = PressHandler(answer)
    feed(
        api,
        handler,
        button("atelier:edit:42"),
        modal_submit("atelier:edit:42", {"prompt": "a cat"}),
    )
    modal, deferred = api.find("POST", CALLBACK)
    assert modal.json["type"] == 9  # MODAL, as the first answer
    assert modal.json["data"]["custom_id"] == "atelier:edit:42"
    field = modal.json["data"]["components"][0]["components"][0]
    assert (field["custom_id"], field["value"]) == ("prompt", "a fox")
    assert deferred.json == {"type": 6}
    assert handler.presses[1].values == {"prompt": "a cat"}
    (followup,) = api.find("POST", FOLLOWUP)
    assert followup.json["content"] == "✏️ Queued"


def test_other_components_are_not_atelier_s(api: FakeDiscordAPI) -> None:
    handler = PressHandler(lambda _p: [])
    feed(api, handler, button("someone-elses:button"))
    assert handler.presses == [] and api.find("POST", CALLBACK) == []


# -- through the real core, on both databases ------------------------------------------------


@pytest.fixture
def core_with_result(db: Any, tmp_path: Any) -> tuple[Any, int]:
    """The real core, and a result in the Discord guild's team requested by the lead."""
    from bot.core import CommandCore
    from storage.blobs import BlobStore
    from storage.job_payloads import GeneratePayload, ReplyTarget
    from storage.models import Generation, Job, Team
    from storage.outbox import Outbox
    from storage.queue import JobQueue
    from storage.settings import Settings
    from tests.fake_discord_api import LEAD_USER

    settings = Settings(_env_file=None, data_dir=tmp_path, discord_lead_roles=["Art Lead"])  # type: ignore[call-arg]
    core = CommandCore(
        db,
        BlobStore(tmp_path / "blobs", settings.max_blob_bytes),
        settings,
        JobQueue(db),
        Outbox(db),
    )
    with db.session(write=True) as s:
        team = Team(platform="discord", external_id=str(GUILD_ID), name="Studio")
        s.add(team)
        s.flush()
        reply = ReplyTarget(
            platform="discord", channel=str(CHANNEL_ID), team_id=team.id, requester=LEAD_USER["id"]
        )
        payload = GeneratePayload(
            reply=reply, prompt="a fox", base_model="tiny-sd15", steps=2, cfg=7, width=64,
            height=64, sampler="Euler",
        )  # fmt: skip
        job = Job(kind="generate", payload=payload.model_dump(mode="json"),
                  requester=LEAD_USER["id"], team_id=team.id, status="succeeded")  # fmt: skip
        s.add(job)
        s.flush()
        generation = Generation(
            team_id=team.id, job_id=job.id, requester=LEAD_USER["id"], prompt="a fox", seed=3,
            steps=2, cfg=7, width=64, height=64, sampler="Euler", base_model="tiny-sd15",
            image_blobs=["0" * 64],
        )  # fmt: skip
        s.add(generation)
        s.flush()
        return core, generation.id


def test_a_non_requesters_delete_is_refused_and_a_repeated_press_makes_one_job(
    api: FakeDiscordAPI, core_with_result: tuple[Any, int], db: Any
) -> None:
    from sqlalchemy import func, select

    from storage.models import Generation, Job

    core, generation_id = core_with_result
    reroll = button(f"atelier:reroll:{generation_id}", 1_400_000_000_000_000_100)
    feed(api, core, button(f"atelier:delete:{generation_id}"), reroll, reroll)
    refusal, queued = api.find("POST", FOLLOWUP)
    assert refusal.json["flags"] & EPHEMERAL and "Only" in refusal.json["content"]
    assert "🔁 Queued" in queued.json["content"]
    with db.session() as s:
        assert s.get(Generation, generation_id).deleted_at is None
        assert s.scalar(select(func.count()).select_from(Job)) == 2  # the result's + one reroll
