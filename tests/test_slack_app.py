"""The Slack adapter driven through the real slack_bolt App with signed Slack requests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fake_slack_api import (
    BOT_ID,
    BOT_USER_ID,
    FakeSlackApi,
    InlineExecutor,
    RecordingHandler,
    event_callback,
    file_share_event,
    reaction_event,
    signed_headers,
    slash_command_form,
    word_parser,
)
from slack_bolt import App, BoltRequest, BoltResponse
from slack_bolt.adapter.socket_mode.internals import run_bolt_app
from slack_sdk import WebClient
from slack_sdk.socket_mode.request import SocketModeRequest

from bot.commands import Command, FileTooLarge, Reply
from bot.slack.app import INTERNAL_ERROR, build_slack_app
from bot.slack.files import SlackFileError
from bot.slack.roles import GroupRoles

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
THREAD = "1700000000.000100"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.fixture
def fake() -> Iterator[FakeSlackApi]:
    with FakeSlackApi().running() as api:
        yield api


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


def make_app(fake: FakeSlackApi, handler: Any, *, executor: Any = None, **kwargs: Any) -> App:
    client = WebClient(token=fake.bot_token, base_url=fake.api_url)
    return build_slack_app(
        handler,
        word_parser,
        client=client,
        signing_secret=SECRET,
        executor=executor or InlineExecutor(),
        **kwargs,
    )


@pytest.fixture
def app(fake: FakeSlackApi, handler: RecordingHandler) -> App:
    return make_app(fake, handler)


def send(
    app: App,
    body: str,
    content_type: str,
    *,
    secret: str = SECRET,
    timestamp: int | None = None,
    retry: int | None = None,
) -> BoltResponse:
    headers = signed_headers(secret, body, timestamp=timestamp, content_type=content_type)
    if retry is not None:
        headers["x-slack-retry-num"] = str(retry)
        headers["x-slack-retry-reason"] = "http_timeout"
    return app.dispatch(BoltRequest(body=body, headers=headers))


def send_event(app: App, event: dict[str, Any], event_id: str, **kw: Any) -> BoltResponse:
    return send(app, json.dumps(event_callback(event, event_id=event_id)), JSON, **kw)


# -- slash commands -------------------------------------------------------------------------


def test_slash_command_reaches_the_core_as_a_command(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    body = slash_command_form(
        "/style",
        "create ink inkstyle",
        response_url=fake.response_url(),
        trigger_id="13345224609.738474920.8088930838d88f008e0",
        team_id="T0TEAM001",
        team_domain="studio",
        channel_id="C0ART0001",
        user_id="U0ALICE01",
        user_name="alice",
    )
    response = send(app, body, FORM)

    assert response.status == 200
    [command] = handler.commands
    assert command.name == "style create"
    assert dict(command.args) == {"words": "ink inkstyle"}
    assert command.event_id == "13345224609.738474920.8088930838d88f008e0"
    assert (command.team.platform, command.team.external_id, command.team.name) == (
        "slack",
        "T0TEAM001",
        "studio",
    )
    assert command.channel == "C0ART0001"
    assert (command.user.user_id, command.user.display_name) == ("U0ALICE01", "alice")
    assert command.thread is None and not command.attachments


@pytest.mark.parametrize("slash", ["/imagine", "/jobs", "/cancel"])
def test_every_registered_slash_command_is_handled(
    app: App, fake: FakeSlackApi, handler: RecordingHandler, slash: str
) -> None:
    body = slash_command_form(slash, "a b", response_url=fake.response_url())
    assert send(app, body, FORM).status == 200
    assert [c.name for c in handler.commands] == [slash.lstrip("/")]


def test_replies_go_back_through_response_url_public_and_private(
    fake: FakeSlackApi,
) -> None:
    handler = RecordingHandler([Reply("Style ink created."), Reply("Only you see this", True)])
    app = make_app(fake, handler)
    send(app, slash_command_form("/style", "list", response_url=fake.response_url("r1")), FORM)

    responds = fake.calls_to("respond")
    assert [(c.path, c.params["text"], c.params["response_type"]) for c in responds] == [
        ("/commands/T0TEAM001/r1", "Style ink created.", "in_channel"),
        ("/commands/T0TEAM001/r1", "Only you see this", "ephemeral"),
    ]


def test_ack_returns_before_the_work_runs(fake: FakeSlackApi) -> None:
    release = threading.Event()
    started = threading.Event()

    class SlowHandler(RecordingHandler):
        def handle(self, command: Command) -> list[Reply]:
            started.set()
            release.wait(10)
            return super().handle(command)

    handler = SlowHandler()
    executor = ThreadPoolExecutor(2)
    app = make_app(fake, handler, executor=executor)
    try:
        body = slash_command_form("/imagine", "a cat", response_url=fake.response_url())
        response = send(app, body, FORM)
        # The HTTP answer (the ack) exists while the core has not finished.
        assert response.status == 200
        assert handler.commands == []
    finally:
        release.set()
        executor.shutdown(wait=True)
    assert started.is_set()
    assert [c.name for c in handler.commands] == ["imagine"]


def test_a_failing_core_gets_a_private_apology_not_silence(fake: FakeSlackApi) -> None:
    class Broken(RecordingHandler):
        def handle(self, command: Command) -> list[Reply]:
            raise RuntimeError("database is on fire")

    app = make_app(fake, Broken())
    send(app, slash_command_form("/jobs", "", response_url=fake.response_url()), FORM)
    [respond] = fake.calls_to("respond")
    assert respond.params == {"text": INTERNAL_ERROR, "response_type": "ephemeral"}


# -- request verification ---------------------------------------------------------------


def test_wrong_signature_gets_401_and_does_nothing(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    before = fake.call_names()
    body = slash_command_form("/style", "create ink x", response_url=fake.response_url())
    response = send(app, body, FORM, secret="not-the-signing-secret")

    assert response.status == 401
    assert handler.commands == []
    assert fake.call_names() == before  # no Web API call, no response_url post


def test_old_timestamp_gets_401_and_does_nothing(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    before = fake.call_names()
    event = reaction_event("white_check_mark", item_ts=THREAD)
    response = send_event(app, event, "Ev0OLD", timestamp=int(time.time()) - 6 * 60)

    assert response.status == 401
    assert handler.reactions == []
    assert fake.call_names() == before


def test_tampered_body_gets_401(app: App, fake: FakeSlackApi, handler: RecordingHandler) -> None:
    body = slash_command_form("/jobs", "", response_url=fake.response_url())
    headers = signed_headers(SECRET, body, content_type=FORM)
    tampered = body.replace("U0ALICE01", "U0MALLORY")
    response = app.dispatch(BoltRequest(body=tampered, headers=headers))
    assert response.status == 401
    assert handler.commands == []


# -- idempotency ------------------------------------------------------------------------------


def test_slack_retry_of_an_event_does_not_run_twice(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    event = file_share_event([fake.add_file(PNG)], thread_ts=THREAD)
    first = send_event(app, event, "Ev0RETRY1")
    retry = send_event(app, event, "Ev0RETRY1", retry=1)
    again = send_event(app, event, "Ev0RETRY1", retry=2)

    assert (first.status, retry.status, again.status) == (200, 200, 200)
    assert [c.event_id for c in handler.commands] == ["Ev0RETRY1"]


def test_a_new_event_id_is_new_work(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    event = reaction_event("x", item_ts=THREAD)
    send_event(app, event, "Ev0A")
    send_event(app, event, "Ev0B")
    assert [r.event_id for r in handler.reactions] == ["Ev0A", "Ev0B"]


def test_socket_mode_retry_envelope_is_deduplicated_too(
    fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    client = WebClient(token=fake.bot_token, base_url=fake.api_url)
    # Socket Mode needs no signing secret: Slack's websocket is the authentication.
    app = build_slack_app(
        handler, word_parser, client=client, signing_secret=None, executor=InlineExecutor()
    )
    payload = event_callback(reaction_event("repeat", item_ts=THREAD), event_id="Ev0SOCK")

    def envelope(retry: int | None) -> SocketModeRequest:
        return SocketModeRequest(
            type="events_api", envelope_id=f"env-{retry}", payload=payload, retry_attempt=retry
        )

    assert run_bolt_app(app, envelope(None)).status == 200
    assert run_bolt_app(app, envelope(1)).status == 200
    assert [(r.event_id, r.emoji) for r in handler.reactions] == [("Ev0SOCK", "🔁")]


def test_without_signing_secret_no_http_request_verifies(
    fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    client = WebClient(token=fake.bot_token, base_url=fake.api_url)
    app = build_slack_app(handler, word_parser, client=client, signing_secret=None)
    body = slash_command_form("/jobs", "", response_url=fake.response_url())
    # Whatever secret a sender guesses, HTTP mode refuses.
    for guess in ("None", SECRET, "0" * 32):
        assert send(app, body, FORM, secret=guess).status == 401
    assert handler.commands == []


# -- images posted in a style's thread --------------------------------------------------------


def test_image_in_a_thread_becomes_style_add_with_a_downloadable_file(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    shared = fake.add_file(PNG, name="ref-01.png")
    event = file_share_event([shared], thread_ts=THREAD, user="U0BOB0001", channel="C0ART0001")
    assert send_event(app, event, "Ev0UPLOAD").status == 200

    [command] = handler.commands
    assert command.name == "style add"
    assert command.thread == THREAD
    assert command.event_id == "Ev0UPLOAD"
    assert (command.channel, command.user.user_id) == ("C0ART0001", "U0BOB0001")
    assert command.team.external_id == "T0TEAM001"
    [incoming] = command.attachments
    assert (incoming.filename, incoming.size, incoming.content_type) == (
        "ref-01.png",
        len(PNG),
        "image/png",
    )
    assert fake.calls_to("download") == []  # nothing fetched until the core asks

    assert incoming.read(len(PNG)) == PNG
    [download] = fake.calls_to("download")
    assert download.headers["Authorization"] == f"Bearer {fake.bot_token}"
    assert download.path.endswith("/ref-01.png")


def test_file_past_the_limit_raises_file_too_large(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    send_event(app, file_share_event([fake.add_file(PNG)], thread_ts=THREAD), "Ev0BIG")
    [incoming] = handler.commands[0].attachments
    with pytest.raises(FileTooLarge, match="larger than"):
        incoming.read(len(PNG) - 1)
    assert incoming.read(len(PNG)) == PNG  # exactly at the limit is fine


def test_size_limit_holds_without_a_content_length(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    fake.chunked_downloads = True
    send_event(app, file_share_event([fake.add_file(PNG)], thread_ts=THREAD), "Ev0CHUNK")
    [incoming] = handler.commands[0].attachments
    with pytest.raises(FileTooLarge):
        incoming.read(len(PNG) - 1)
    assert incoming.read(len(PNG)) == PNG


def test_several_files_in_one_message_are_one_command(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    files = [fake.add_file(PNG, name=f"r{i}.png") for i in range(3)]
    send_event(app, file_share_event(files, thread_ts=THREAD), "Ev0MANY")
    [command] = handler.commands
    assert [f.filename for f in command.attachments] == ["r0.png", "r1.png", "r2.png"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"thread_ts": None}, id="not-in-a-thread"),
        pytest.param({"thread_ts": "1700000100.000200"}, id="thread-parent-itself"),
        pytest.param({"files": []}, id="no-files"),
        pytest.param({"subtype": "message_changed"}, id="an-edit"),
        pytest.param({"user": BOT_USER_ID, "bot_id": BOT_ID}, id="the-bot-itself"),
    ],
)
def test_other_messages_are_acked_and_ignored(
    app: App, fake: FakeSlackApi, handler: RecordingHandler, change: dict[str, Any]
) -> None:
    event = file_share_event([fake.add_file(PNG)], thread_ts=THREAD, ts="1700000100.000200")
    for key, value in change.items():
        if value is None:
            event.pop(key, None)
        else:
            event[key] = value
    assert send_event(app, event, "Ev0OTHER").status == 200
    assert handler.commands == []


def test_replies_to_a_thread_upload_land_in_that_thread(fake: FakeSlackApi) -> None:
    handler = RecordingHandler([Reply("Added 1 image to ink."), Reply("ref.gif is not", True)])
    app = make_app(fake, handler)
    send_event(app, file_share_event([fake.add_file(PNG)], thread_ts=THREAD), "Ev0REPLY")

    [public] = fake.calls_to("chat.postMessage")
    assert (public.params["channel"], public.params["thread_ts"]) == ("C0ART0001", THREAD)
    assert public.params["text"] == "Added 1 image to ink."
    [private] = fake.calls_to("chat.postEphemeral")
    assert private.params["user"] == "U0ALICE01"
    assert private.params["thread_ts"] == THREAD
    assert private.params["text"] == "ref.gif is not"


def test_a_download_refused_by_slack_says_what_to_fix(
    fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    # A client whose token Slack does not accept for files: the sign-in page comes back.
    app = make_app(fake, handler)
    shared = fake.add_file(PNG)
    send_event(app, file_share_event([shared], thread_ts=THREAD), "Ev0NOAUTH")
    [incoming] = handler.commands[0].attachments
    fake.bot_token = "xoxb-rotated"
    with pytest.raises(SlackFileError, match="files:read"):
        incoming.read(10_000_000)


@pytest.mark.parametrize(
    "link",
    [
        pytest.param("http://localhost:{port}/files-pri/T-F/ref.png", id="another-host"),
        pytest.param("https://files.slack.com.evil.example/ref.png", id="look-alike-host"),
        pytest.param("http://files.slack.com/files-pri/T-F/ref.png", id="plain-http"),
        pytest.param("ftp://files.slack.com/ref.png", id="ftp"),
        pytest.param("file:///etc/passwd", id="local-file"),
    ],
)
def test_file_links_off_slacks_file_server_are_not_followed(
    app: App, fake: FakeSlackApi, handler: RecordingHandler, link: str
) -> None:
    shared = fake.add_file(PNG)
    port = fake.url.rsplit(":", 1)[1]
    shared["url_private"] = shared["url_private_download"] = link.format(port=port)
    send_event(app, file_share_event([shared], thread_ts=THREAD), "Ev0ELSEWHERE")
    [incoming] = handler.commands[0].attachments
    with pytest.raises(SlackFileError) as refused:
        incoming.read(10_000_000)
    assert str(refused.value) == (
        "ref.png: its link does not lead to Slack's file server, so it was not downloaded; "
        "share the image in Slack again."
    )
    assert fake.calls_to("download") == []


def test_a_client_on_slack_itself_fetches_only_from_files_slack_com(fake: FakeSlackApi) -> None:
    from bot.slack.files import SlackFiles

    files = SlackFiles(WebClient(token=fake.bot_token))  # the real API: https://slack.com
    with pytest.raises(SlackFileError, match="does not lead to Slack's file server"):
        files.incoming(fake.add_file(PNG)).read(10_000_000)  # the fake is not files.slack.com
    assert fake.calls_to("download") == []


def test_a_file_name_outside_ascii_is_percent_encoded(
    app: App, fake: FakeSlackApi, handler: RecordingHandler
) -> None:
    shared = fake.add_file(PNG, name="café-ü.png")  # Slack leaves the name raw in url_private
    send_event(app, file_share_event([shared], thread_ts=THREAD), "Ev0UNICODE")
    [incoming] = handler.commands[0].attachments
    assert incoming.filename == "café-ü.png"
    assert incoming.read(len(PNG)) == PNG
    [download] = fake.calls_to("download")
    assert download.path.endswith("/caf%C3%A9-%C3%BC.png")


# -- reactions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "emoji"),
    [
        ("white_check_mark", "✅"),
        ("heavy_check_mark", "✅"),
        ("x", "❌"),
        ("repeat", "🔁"),
        ("white_check_mark::skin-tone-3", "✅"),
    ],
)
def test_reactions_become_reaction_with_unicode_emoji(
    app: App, handler: RecordingHandler, name: str, emoji: str
) -> None:
    event = reaction_event(name, item_ts="1700000050.000900", channel="C0ART0002")
    assert send_event(app, event, "Ev0REACT").status == 200
    [reaction] = handler.reactions
    assert reaction.emoji == emoji
    assert reaction.message_id == "1700000050.000900"
    assert reaction.channel == "C0ART0002"
    assert reaction.added is True
    assert reaction.event_id == "Ev0REACT"
    assert reaction.user.user_id == "U0ALICE01"
    assert reaction.team.external_id == "T0TEAM001"


def test_reaction_removed_is_reported_as_not_added(app: App, handler: RecordingHandler) -> None:
    send_event(app, reaction_event("white_check_mark", item_ts=THREAD, added=False), "Ev0RM")
    [reaction] = handler.reactions
    assert (reaction.emoji, reaction.added) == ("✅", False)


def test_unknown_reactions_are_acked_and_ignored(app: App, handler: RecordingHandler) -> None:
    assert send_event(app, reaction_event("tada", item_ts=THREAD), "Ev0TADA").status == 200
    assert handler.reactions == []


def test_lead_group_members_carry_the_group_as_a_role(fake: FakeSlackApi) -> None:
    fake.usergroups["S0LEADS01"] = ["U0LEAD001"]
    handler = RecordingHandler()
    app = make_app(fake, handler, lead_groups=["S0LEADS01"])
    send_event(app, reaction_event("white_check_mark", item_ts=THREAD, user="U0LEAD001"), "Ev1")
    send_event(app, reaction_event("white_check_mark", item_ts=THREAD, user="U0ALICE01"), "Ev2")
    send(app, slash_command_form("/jobs", "", response_url=fake.response_url()), FORM)

    lead, other = handler.reactions
    assert lead.user.roles == frozenset({"S0LEADS01"})
    assert other.user.roles == frozenset()
    assert handler.commands[0].user.roles == frozenset()
    # Membership is cached: three requests, one usergroups.users.list call.
    [lookup] = fake.calls_to("usergroups.users.list")
    assert lookup.params["usergroup"] == "S0LEADS01"


def test_group_membership_is_read_again_after_the_ttl(fake: FakeSlackApi) -> None:
    now = [1000.0]
    client = WebClient(token=fake.bot_token, base_url=fake.api_url)
    roles = GroupRoles(client, ["S0LEADS01"], ttl_seconds=60, clock=lambda: now[0])
    fake.usergroups["S0LEADS01"] = []
    assert roles.roles_for("U0LEAD001") == frozenset()
    fake.usergroups["S0LEADS01"] = ["U0LEAD001"]
    now[0] += 30
    assert roles.roles_for("U0LEAD001") == frozenset()  # still cached
    now[0] += 31
    assert roles.roles_for("U0LEAD001") == frozenset({"S0LEADS01"})
    assert len(fake.calls_to("usergroups.users.list")) == 2


def test_unreadable_group_means_no_role_not_a_crash(fake: FakeSlackApi) -> None:
    client = WebClient(token=fake.bot_token, base_url=fake.api_url)
    fake.fail("usergroups.users.list", "missing_scope")
    roles = GroupRoles(client, ["S0LEADS01"])
    assert roles.roles_for("U0LEAD001") == frozenset()


def test_reaction_replies_are_threaded_on_the_reacted_message(fake: FakeSlackApi) -> None:
    handler = RecordingHandler([Reply("Only art leads can approve.", private=True)])
    app = make_app(fake, handler)
    send_event(app, reaction_event("white_check_mark", item_ts="1700000050.000900"), "Ev0R")
    [private] = fake.calls_to("chat.postEphemeral")
    assert private.params["thread_ts"] == "1700000050.000900"
    assert private.params["user"] == "U0ALICE01"
