"""The Discord adapter driven by discord.py's own objects, built from documented payloads.

Gateway payloads go through discord.py's ConnectionState parsers (as its websocket would
feed them); every REST call discord.py makes lands on a local fake Discord that records it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import discord
import pytest

from bot.commands import Command, FileTooLarge, OutgoingFile, Reply
from bot.core.parsing import COMMANDS
from bot.discord.client import INTERNAL_ERROR
from tests.fake_discord_api import (
    APP_ID,
    ARTIST_ROLE_ID,
    ARTIST_USER,
    CHANNEL_ID,
    GUILD_ID,
    LEAD_ROLE_ID,
    LEAD_USER,
    THREAD_ID,
    FakeDiscordAPI,
    RecordingHandler,
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
    user_payload,
)

CALLBACK = r"/interactions/\d+/[^/]+/callback"
ORIGINAL = rf"/webhooks/{APP_ID}/[^/]+/messages/@original"
FOLLOWUP = rf"/webhooks/{APP_ID}/[^/]+"
EPHEMERAL = 64


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscordAPI]:
    fake = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    patch_route_base(monkeypatch, fake)
    yield fake
    fake.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def lead_member() -> dict[str, Any]:
    return member_payload(LEAD_USER, [LEAD_ROLE_ID, ARTIST_ROLE_ID])


def style_create(interaction_id: int = 1_200_000_000_000_000_001) -> dict[str, Any]:
    return interaction_payload(
        interaction_id=interaction_id,
        application_id=APP_ID,
        guild_id=GUILD_ID,
        channel=text_channel_payload(CHANNEL_ID, GUILD_ID, "art"),
        member=lead_member(),
        command_id=1_200_000_000_000_000_900,
        name="style",
        options=[
            {
                "name": "create",
                "type": 1,  # SUB_COMMAND
                "options": [
                    {"name": "name", "type": 3, "value": "inkwash"},
                    {"name": "trigger", "type": 3, "value": "inkwsh"},
                    {"name": "kind", "type": 3, "value": "concept"},
                ],
            }
        ],
    )


def style_add(url: str, size: int, interaction_id: int = 1_200_000_000_000_000_002) -> dict:
    attachment_id = 1_200_000_000_000_000_777
    return interaction_payload(
        interaction_id=interaction_id,
        application_id=APP_ID,
        guild_id=GUILD_ID,
        channel=thread_payload(THREAD_ID, GUILD_ID, CHANNEL_ID, "inkwash"),
        member=member_payload(ARTIST_USER, [ARTIST_ROLE_ID]),
        command_id=1_200_000_000_000_000_900,
        name="style",
        options=[
            {
                "name": "add",
                "type": 1,
                "options": [
                    {"name": "name", "type": 3, "value": "inkwash"},
                    {"name": "image1", "type": 11, "value": str(attachment_id)},
                ],
            }
        ],
        resolved={
            "attachments": {
                str(attachment_id): attachment_payload(attachment_id, url, "ref.png", size)
            }
        },
    )


def test_slash_command_defers_then_reaches_the_core_and_answers_as_followups(
    api: FakeDiscordAPI,
) -> None:
    deferred_when_handled: list[int] = []
    handler = RecordingHandler(
        replies=lambda _c: [
            Reply("Created concept inkwash (trigger inkwsh)."),
            Reply("Tip: post references in the thread.", private=True),
        ],
        before=lambda: deferred_when_handled.append(len(api.find("POST", CALLBACK))),
    )
    payload = style_create()

    async def scenario() -> None:
        async with connected(api, handler) as client:
            client._connection.parse_interaction_create(payload)
            await settle()

    run(scenario)

    # Deferred (type 5, "thinking", public) before the core was even called.
    (callback,) = api.find("POST", CALLBACK)
    assert callback.path == f"/interactions/{payload['id']}/{payload['token']}/callback"
    assert callback.json == {"type": 5}
    assert deferred_when_handled == [1]
    # The core ran in a worker thread, not on the event loop's thread.
    assert handler.thread_ids and handler.thread_ids[0] != threading.get_ident()

    (command,) = handler.commands
    assert command.name == "style create"
    assert dict(command.args) == {"name": "inkwash", "trigger": "inkwsh", "kind": "concept"}
    assert command.event_id == payload["id"]
    assert command.team.platform == "discord"
    assert command.team.external_id == str(GUILD_ID)
    assert command.team.name == "Studio"
    assert command.channel == str(CHANNEL_ID)
    assert command.thread is None
    assert command.user.user_id == LEAD_USER["id"]
    assert {"Art Lead", "Artist", str(LEAD_ROLE_ID), str(ARTIST_ROLE_ID)} <= command.user.roles
    assert "@everyone" not in command.user.roles

    # The public reply replaced the "thinking" message; the private one is an ephemeral followup.
    (original,) = api.find("PATCH", ORIGINAL)
    assert original.json["content"] == "Created concept inkwash (trigger inkwsh)."
    (followup,) = api.find("POST", FOLLOWUP)
    assert followup.json["content"] == "Tip: post references in the thread."
    assert followup.json["flags"] & EPHEMERAL


def test_private_answer_to_a_public_command_is_never_shown_publicly(api: FakeDiscordAPI) -> None:
    handler = RecordingHandler(replies=lambda _c: [Reply("No style named x.", private=True)])

    async def scenario() -> None:
        async with connected(api, handler) as client:
            client._connection.parse_interaction_create(style_create())
            await settle()

    run(scenario)
    assert api.find("PATCH", ORIGINAL) == []  # the public placeholder never gets the text
    assert len(api.find("DELETE", ORIGINAL)) == 1
    (followup,) = api.find("POST", FOLLOWUP)
    assert followup.json["content"] == "No style named x."
    assert followup.json["flags"] & EPHEMERAL
    # The placeholder was removed before the private answer went out.
    order = [c.method for c in api.calls if c.path.startswith(f"/webhooks/{APP_ID}/")]
    assert order == ["DELETE", "POST"]


def test_jobs_is_deferred_privately_and_files_travel_with_the_reply(api: FakeDiscordAPI) -> None:
    handler = RecordingHandler(
        replies=lambda _c: [
            Reply("You have 1 job queued.", private=True, files=[OutgoingFile("q.txt", b"42")])
        ]
    )
    payload = interaction_payload(
        interaction_id=1_200_000_000_000_000_010,
        application_id=APP_ID,
        guild_id=GUILD_ID,
        channel=text_channel_payload(CHANNEL_ID, GUILD_ID, "art"),
        member=lead_member(),
        command_id=1_200_000_000_000_000_901,
        name="jobs",
        options=[],
    )

    async def scenario() -> None:
        async with connected(api, handler) as client:
            client._connection.parse_interaction_create(payload)
            await settle()

    run(scenario)
    (callback,) = api.find("POST", CALLBACK)
    assert callback.json == {"type": 5, "data": {"flags": EPHEMERAL}}
    assert handler.commands[0].name == "jobs"
    assert dict(handler.commands[0].args) == {}
    (original,) = api.find("PATCH", ORIGINAL)
    assert original.json["content"] == "You have 1 job queued."
    assert list(original.files.values()) == [("q.txt", b"42")]


def test_typed_imagine_options_reach_the_core_as_strings(api: FakeDiscordAPI) -> None:
    handler = RecordingHandler(replies=lambda _c: [Reply("Queued.")])
    payload = interaction_payload(
        interaction_id=1_200_000_000_000_000_011,
        application_id=APP_ID,
        guild_id=GUILD_ID,
        channel=text_channel_payload(CHANNEL_ID, GUILD_ID, "art"),
        member=lead_member(),
        command_id=1_200_000_000_000_000_902,
        name="imagine",
        options=[
            {"name": "prompt", "type": 3, "value": "a fox, inkwsh"},
            {"name": "seed", "type": 4, "value": 1234},
            {"name": "cfg", "type": 10, "value": 6.5},
            {"name": "count", "type": 4, "value": 2},
            {"name": "compare", "type": 5, "value": True},
        ],
    )

    async def scenario() -> None:
        async with connected(api, handler) as client:
            client._connection.parse_interaction_create(payload)
            await settle()

    run(scenario)
    (command,) = handler.commands
    assert command.name == "imagine"
    assert dict(command.args) == {
        "prompt": "a fox, inkwsh",
        "seed": "1234",
        "cfg": "6.5",
        "count": "2",
        "compare": "true",
    }


def test_attachment_option_becomes_a_lazily_downloaded_file(api: FakeDiscordAPI) -> None:
    image = bytes(range(256)) * 40  # 10 240 bytes
    url = api.serve_file("ref.png", image)
    read: dict[str, Any] = {}

    def core(command: Command) -> list[Reply]:
        # The core reads attachments from its worker thread, as CommandCore does.
        (file,) = command.attachments
        read["bytes"] = file.read(1_000_000)
        try:
            file.read(1_000)
        except FileTooLarge as exc:
            read["too_large"] = str(exc)
        return [Reply("Added 1 image to inkwash.")]

    handler = RecordingHandler(replies=core)

    async def scenario() -> None:
        async with connected(api, handler) as client:
            assert api.find("GET", "/attachments/ref.png") == []
            client._connection.parse_interaction_create(style_add(url, len(image)))
            await settle()

    run(scenario)
    (command,) = handler.commands
    assert command.name == "style add"
    assert dict(command.args) == {"name": "inkwash"}
    # Used inside the style's thread: the channel is the thread's parent.
    assert (command.channel, command.thread) == (str(CHANNEL_ID), str(THREAD_ID))
    assert command.user.roles == frozenset({"Artist", str(ARTIST_ROLE_ID)})
    (file,) = command.attachments
    assert (file.filename, file.size, file.content_type) == ("ref.png", len(image), "image/png")
    assert read["bytes"] == image
    assert "ref.png is larger than" in read["too_large"]
    # The declared size refused the second read without downloading again.
    assert len(api.find("GET", "/attachments/ref.png")) == 1
    (original,) = api.find("PATCH", ORIGINAL)
    assert original.json["content"] == "Added 1 image to inkwash."


def test_core_failure_gets_a_clear_private_answer(
    api: FakeDiscordAPI, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_command: Command) -> list[Reply]:
        raise RuntimeError("database is locked")

    handler = RecordingHandler(replies=broken)

    async def scenario() -> None:
        async with connected(api, handler) as client:
            client._connection.parse_interaction_create(style_create())
            await settle()

    with caplog.at_level(logging.ERROR, logger="bot.discord.client"):
        run(scenario)
    assert "database is locked" in caplog.text
    (followup,) = api.find("POST", FOLLOWUP)
    assert followup.json["content"] == INTERNAL_ERROR
    assert followup.json["flags"] & EPHEMERAL


def test_commands_sync_to_the_development_guild(api: FakeDiscordAPI) -> None:
    async def scenario() -> None:
        async with connected(api, RecordingHandler(), guild_id=GUILD_ID, sync_commands=True):
            pass

    run(scenario)
    (sync,) = api.find("PUT", rf"/applications/{APP_ID}/guilds/{GUILD_ID}/commands")
    assert api.find("PUT", rf"/applications/{APP_ID}/commands") == []
    commands = {c["name"]: c for c in sync.json}
    # Discord offers exactly the core's command table (bot.core.parsing.COMMANDS), with
    # every option of each command; attachments are Discord's own extra options.
    assert set(commands) == {name.split(" ")[0] for name in COMMANDS}
    subcommands = {o["name"]: o for o in commands["style"]["options"]}
    assert set(subcommands) == {n.split(" ", 1)[1] for n in COMMANDS if n.startswith("style ")}
    attachments = {"image", "file"} | {f"image{i}" for i in range(1, 11)}
    for name, spec in COMMANDS.items():
        group, _, sub = name.partition(" ")
        options = subcommands[sub]["options"] if sub else commands[group].get("options", [])
        names = [o["name"] for o in options if o["name"] not in attachments]
        assert names == [p.name for p in spec.params], name
    add_options = subcommands["add"]["options"]
    assert [o["type"] for o in add_options] == [3] + [11] * 10  # name + 10 attachments
    imagine = {o["name"]: o for o in commands["imagine"]["options"]}
    assert imagine["image"]["type"] == 11 and imagine["ar"]["autocomplete"] is True
    train = {o["name"]: o for o in subcommands["train"]["options"]}
    assert train["name"]["autocomplete"] is True and train["method"]["autocomplete"] is True


def test_commands_sync_globally_without_a_guild(api: FakeDiscordAPI) -> None:
    async def scenario() -> None:
        async with connected(api, RecordingHandler(), sync_commands=True):
            pass

    run(scenario)
    (sync,) = api.find("PUT", rf"/applications/{APP_ID}/commands")
    assert {c["name"] for c in sync.json} == {"style", "imagine", "jobs", "cancel", "audit"}


# Images posted in a style's thread ------------------------------------------------------


def thread_message(url: str, size: int, channel_id: int = THREAD_ID) -> dict[str, Any]:
    return message_create_payload(
        message_id=1_200_000_000_000_000_050,
        channel_id=channel_id,
        guild_id=GUILD_ID,
        member=member_payload(ARTIST_USER, [ARTIST_ROLE_ID]),
        content="two more references",
        attachments=[attachment_payload(1_200_000_000_000_000_051, url, "fox.png", size)],
    )


def test_image_posted_in_a_thread_becomes_style_add(api: FakeDiscordAPI) -> None:
    image = b"\x89PNG fake image bytes" * 10
    url = api.serve_file("fox.png", image)
    downloaded: list[bytes] = []

    def core(command: Command) -> list[Reply]:
        downloaded.append(command.attachments[0].read(10_000))
        return [Reply("Added fox.png to inkwash (3 images).")]

    handler = RecordingHandler(replies=core)
    payload = thread_message(url, len(image))

    async def scenario() -> None:
        async with connected(api, handler) as client:
            client._connection.parse_message_create(payload)
            await settle()

    run(scenario)
    (command,) = handler.commands
    assert command.name == "style add"
    assert command.event_id == payload["id"]
    assert (command.channel, command.thread) == (str(CHANNEL_ID), str(THREAD_ID))
    assert command.team.external_id == str(GUILD_ID)
    assert command.user.user_id == ARTIST_USER["id"]
    assert "Artist" in command.user.roles
    assert downloaded == [image]
    # The answer is a reply in the thread.
    (reply,) = api.find("POST", rf"/channels/{THREAD_ID}/messages")
    assert reply.json["content"] == "Added fox.png to inkwash (3 images)."
    assert reply.json["message_reference"]["message_id"] == int(payload["id"])


def test_thread_of_an_uncached_guild_is_looked_up(api: FakeDiscordAPI) -> None:
    url = api.serve_file("fox.png", b"png")
    api.channels[THREAD_ID] = thread_payload(THREAD_ID, GUILD_ID, CHANNEL_ID, "inkwash")
    handler = RecordingHandler()

    async def scenario() -> None:
        async with connected(api, handler, cache_guild=False) as client:
            client._connection.parse_message_create(thread_message(url, 3))
            await settle()

    run(scenario)
    assert len(api.find("GET", rf"/channels/{THREAD_ID}")) == 1
    (command,) = handler.commands
    assert (command.channel, command.thread) == (str(CHANNEL_ID), str(THREAD_ID))
    # Without the guild cache only role ids are known; leads may be configured by id.
    assert command.user.roles == frozenset({str(ARTIST_ROLE_ID)})


def test_chat_outside_threads_and_bot_messages_are_ignored(api: FakeDiscordAPI) -> None:
    url = api.serve_file("fox.png", b"png")
    handler = RecordingHandler()
    in_channel = thread_message(url, 3, channel_id=CHANNEL_ID)
    no_files = {**thread_message(url, 3), "id": "1200000000000000060", "attachments": []}
    from_bot = {**thread_message(url, 3), "id": "1200000000000000061"}
    from_bot["author"] = {**from_bot["author"], "bot": True}

    async def scenario() -> None:
        async with connected(api, handler) as client:
            for payload in (in_channel, no_files, from_bot):
                client._connection.parse_message_create(payload)
            await settle()

    run(scenario)
    assert handler.commands == []
    assert api.find("POST", r"/channels/\d+/messages") == []


# Reactions ------------------------------------------------------------------------------

REVIEW_SHEET_ID = 1_200_000_000_000_000_070


def test_raw_reaction_add_on_an_uncached_message_reaches_the_core(api: FakeDiscordAPI) -> None:
    handler = RecordingHandler()
    payload = reaction_payload(
        user_id=int(LEAD_USER["id"]),
        channel_id=THREAD_ID,
        message_id=REVIEW_SHEET_ID,  # never seen by this process: not in the message cache
        guild_id=GUILD_ID,
        emoji="✅",
        member=lead_member(),
        message_author_id=APP_ID,
    )

    async def scenario() -> None:
        async with connected(api, handler) as client:
            assert client._connection._get_message(REVIEW_SHEET_ID) is None
            client._connection.parse_message_reaction_add(payload)
            await settle()

    run(scenario)
    (reaction,) = handler.reactions
    assert reaction.emoji == "✅"
    assert reaction.message_id == str(REVIEW_SHEET_ID)
    assert reaction.channel == str(THREAD_ID)
    assert reaction.team.external_id == str(GUILD_ID)
    assert reaction.added is True
    assert reaction.user.user_id == LEAD_USER["id"]
    assert {"Art Lead", str(LEAD_ROLE_ID)} <= reaction.user.roles
    assert handler.thread_ids[0] != threading.get_ident()
    assert api.find("GET", r"/guilds/\d+/members/\d+") == []  # the member came with the event


def test_reaction_removal_looks_the_member_up_for_roles(api: FakeDiscordAPI) -> None:
    api.members[(GUILD_ID, int(LEAD_USER["id"]))] = lead_member()
    handler = RecordingHandler()
    payload = reaction_payload(
        user_id=int(LEAD_USER["id"]),
        channel_id=THREAD_ID,
        message_id=REVIEW_SHEET_ID,
        guild_id=GUILD_ID,
        emoji="❌",
        member=None,  # MESSAGE_REACTION_REMOVE carries no member
    )

    async def scenario() -> None:
        async with connected(api, handler) as client:
            client._connection.parse_message_reaction_remove(payload)
            await settle()

    run(scenario)
    (reaction,) = handler.reactions
    assert (reaction.emoji, reaction.added) == ("❌", False)
    assert "Art Lead" in reaction.user.roles
    assert len(api.find("GET", rf"/guilds/{GUILD_ID}/members/{LEAD_USER['id']}")) == 1


def test_reactions_answers_go_to_the_channel_and_the_bots_own_are_ignored(
    api: FakeDiscordAPI,
) -> None:
    handler = RecordingHandler(
        reaction_replies=lambda _r: [Reply("Dataset v2 of inkwash approved by Lena.")]
    )
    own = reaction_payload(
        user_id=APP_ID,
        channel_id=THREAD_ID,
        message_id=REVIEW_SHEET_ID,
        guild_id=GUILD_ID,
        emoji="✅",
        member=member_payload(user_payload(APP_ID, "atelier", bot=True), []),
    )
    lead = reaction_payload(
        user_id=int(LEAD_USER["id"]),
        channel_id=THREAD_ID,
        message_id=REVIEW_SHEET_ID,
        guild_id=GUILD_ID,
        emoji="✅",
        member=lead_member(),
    )

    async def scenario() -> None:
        async with connected(api, handler) as client:
            client._connection.parse_message_reaction_add(own)
            client._connection.parse_message_reaction_add(lead)
            await settle()

    run(scenario)
    assert [r.user.user_id for r in handler.reactions] == [LEAD_USER["id"]]
    (posted,) = api.find("POST", rf"/channels/{THREAD_ID}/messages")
    assert posted.json["content"] == "Dataset v2 of inkwash approved by Lena."


def test_raw_reaction_event_built_directly_translates(api: FakeDiscordAPI) -> None:
    """discord.RawReactionActionEvent from a payload, as the brief's contract describes."""
    from bot.commands import Actor
    from bot.discord.translate import reaction_event

    data = reaction_payload(
        user_id=7,
        channel_id=CHANNEL_ID,
        message_id=REVIEW_SHEET_ID,
        guild_id=GUILD_ID,
        emoji="❌\ufe0f",  # some clients add the emoji variation selector
        member=None,
    )
    raw = discord.RawReactionActionEvent(
        data, discord.PartialEmoji.from_dict(data["emoji"]), "REACTION_ADD"
    )
    reaction = reaction_event(raw, Actor("7"))
    assert reaction is not None
    assert reaction.emoji == "❌"
    assert reaction.event_id == f"reaction:{REVIEW_SHEET_ID}:7:❌:add"
    removed = discord.RawReactionActionEvent(
        data, discord.PartialEmoji.from_dict(data["emoji"]), "REACTION_REMOVE"
    )
    removal = reaction_event(removed, Actor("7"))
    assert removal is not None and removal.added is False
    assert removal.event_id != reaction.event_id


def test_interaction_and_message_built_directly_translate(api: FakeDiscordAPI) -> None:
    """discord.Interaction / discord.Message made from payloads with the client's state."""
    from bot.discord.translate import actor_of, interaction_command, message_command

    url = api.serve_file("fox.png", b"png")

    async def scenario() -> None:
        async with connected(api, RecordingHandler()) as client:
            state = client._connection
            interaction = discord.Interaction(data=style_add(url, 3), state=state)
            command = interaction_command(
                interaction, "style add", {"name": "inkwash", "base": None}, []
            )
            assert dict(command.args) == {"name": "inkwash"}  # options not given are absent
            assert (command.channel, command.thread) == (str(CHANNEL_ID), str(THREAD_ID))

            guild = client.get_guild(GUILD_ID)
            assert guild is not None
            thread = guild.get_thread(THREAD_ID)
            message = discord.Message(state=state, channel=thread, data=thread_message(url, 3))
            translated = message_command(message, thread, actor_of(message.author))
            assert translated is not None
            assert translated.name == "style add" and translated.thread == str(THREAD_ID)
            assert [f.filename for f in translated.attachments] == ["fox.png"]
            channel = guild.get_channel(CHANNEL_ID)
            assert message_command(message, channel, actor_of(message.author)) is None

    run(scenario)
