"""The Slack front end as a process: HTTP request mode on a real socket, settings, manifest."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_slack_api import (
    FakeSlackApi,
    RecordingHandler,
    event_callback,
    file_share_event,
    signed_headers,
    slash_command_form,
    word_parser,
)

from bot.delivery import MessageSender
from bot.slack.run import SlackBot
from bot.slack.sender import SlackSender
from bot.slack.translate import SLASH_COMMANDS
from storage.settings import ConfigError, Settings, load_settings

SIGNING_SECRET = "0123456789abcdef0123456789abcdef"
MANIFEST = Path(__file__).resolve().parents[1] / "bot" / "slack" / "manifest.yaml"


class RecordingDeliverer:
    def __init__(self, sender: MessageSender) -> None:
        self.sender = sender
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")

    def shutdown(self) -> None:
        self.events.append("shutdown")


@pytest.fixture
def fake() -> Iterator[FakeSlackApi]:
    with FakeSlackApi().running() as api:
        yield api


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "slack_bot_token": "xoxb-fake-bot-token",
        "slack_signing_secret": SIGNING_SECRET,
        "slack_app_token": None,
    }
    values.update(overrides)
    return load_settings(_env_file=None, **values)


def post(url: str, body: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_http_bot(
    tmp_path: Path, fake: FakeSlackApi, handler: RecordingHandler, **overrides: Any
) -> tuple[SlackBot, list[RecordingDeliverer], str]:
    deliverers: list[RecordingDeliverer] = []

    def factory(sender: MessageSender) -> RecordingDeliverer:
        deliverers.append(RecordingDeliverer(sender))
        return deliverers[-1]

    bot = SlackBot(
        settings(tmp_path, **overrides),
        handler,
        factory,
        text_parser=word_parser,
        http_host="127.0.0.1",
        http_port=0,
        base_url=fake.api_url,
    )
    bot.start()
    host, port = bot.http_address
    return bot, deliverers, f"http://{host}:{port}/slack/events"


def test_http_mode_serves_signed_requests_and_refuses_forged_ones(
    tmp_path: Path, fake: FakeSlackApi
) -> None:
    handler = RecordingHandler()
    bot, deliverers, url = start_http_bot(tmp_path, fake, handler)
    try:
        assert not bot.socket_mode
        body = slash_command_form("/style", "create ink inkstyle", response_url=fake.response_url())
        forged = signed_headers(
            "a-guessed-secret", body, content_type="application/x-www-form-urlencoded"
        )
        assert post(url, body, forged)[0] == 401

        good = signed_headers(
            SIGNING_SECRET, body, content_type="application/x-www-form-urlencoded"
        )
        assert post(url, body, good)[0] == 200
        event = json.dumps(
            event_callback(
                file_share_event([fake.add_file(b"img")], thread_ts="1700000000.000100"),
                event_id="Ev0HTTP",
            )
        )
        event_headers = signed_headers(SIGNING_SECRET, event, content_type="application/json")
        assert post(url, event, event_headers)[0] == 200
        event_headers["x-slack-retry-num"] = "1"
        assert post(url, event, event_headers)[0] == 200
    finally:
        bot.stop()  # waits for the work started after the acks
    assert [(c.name, c.event_id) for c in handler.commands] == [
        ("style create", "1234567890.111.abcdef"),
        ("style add", "Ev0HTTP"),
    ]
    [deliverer] = deliverers
    assert deliverer.events == ["start", "shutdown"]
    assert isinstance(deliverer.sender, SlackSender)


def test_url_verification_challenge_is_answered(tmp_path: Path, fake: FakeSlackApi) -> None:
    bot, _, url = start_http_bot(tmp_path, fake, RecordingHandler())
    try:
        body = json.dumps(
            {"token": "t", "challenge": "3eZbrw1aBm2rZgRNFdxV", "type": "url_verification"}
        )
        status, answer = post(
            url, body, signed_headers(SIGNING_SECRET, body, content_type="application/json")
        )
    finally:
        bot.stop()
    assert status == 200
    assert json.loads(answer) == {"challenge": "3eZbrw1aBm2rZgRNFdxV"}


def test_an_app_token_selects_socket_mode_without_a_signing_secret(
    tmp_path: Path, fake: FakeSlackApi
) -> None:
    bot = SlackBot(
        settings(tmp_path, slack_app_token="xapp-1-A0-123-abc", slack_signing_secret=None),
        RecordingHandler(),
        RecordingDeliverer,
        text_parser=word_parser,
        base_url=fake.api_url,
    )
    assert bot.socket_mode


def test_the_core_text_parser_is_taken_from_the_handler(tmp_path: Path, fake: FakeSlackApi) -> None:
    handler = RecordingHandler()
    handler.text_parser = word_parser  # type: ignore[attr-defined]
    SlackBot(settings(tmp_path), handler, RecordingDeliverer, base_url=fake.api_url)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"slack_bot_token": None}, "ATELIER_SLACK_BOT_TOKEN"),
        ({"slack_signing_secret": None}, "ATELIER_SLACK_SIGNING_SECRET"),
        ({"slack_app_token": "xoxb-wrong-kind"}, "ATELIER_SLACK_APP_TOKEN"),
        ({"slack_bot_token": "xoxb-revoked"}, "ATELIER_SLACK_BOT_TOKEN"),
    ],
)
def test_bad_settings_give_one_clear_line_without_secrets(
    tmp_path: Path, fake: FakeSlackApi, overrides: dict[str, Any], names: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        SlackBot(
            settings(tmp_path, **overrides),
            RecordingHandler(),
            RecordingDeliverer,
            text_parser=word_parser,
            base_url=fake.api_url,
        )
    message = str(caught.value)
    assert names in message
    assert "\n" not in message
    for secret in ("xoxb-revoked", "xoxb-wrong-kind", SIGNING_SECRET, fake.bot_token):
        assert secret not in message


def test_secrets_never_reach_the_logs(
    tmp_path: Path, fake: FakeSlackApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    handler = RecordingHandler()
    bot, deliverers, url = start_http_bot(tmp_path, fake, handler)
    try:
        body = slash_command_form("/jobs", "", response_url=fake.response_url())
        post(
            url,
            body,
            signed_headers(SIGNING_SECRET, body, content_type="application/x-www-form-urlencoded"),
        )
        post(
            url,
            body,
            signed_headers("forged", body, content_type="application/x-www-form-urlencoded"),
        )
        sender = deliverers[0].sender
        assert isinstance(sender, SlackSender)
        from test_slack_sender import item

        sender.post(item("hello"), [])
    finally:
        bot.stop()
    assert handler.commands  # the flow really ran, with debug logging on
    assert "chat.postMessage" in caplog.text
    assert fake.bot_token not in caplog.text
    assert SIGNING_SECRET not in caplog.text


def test_manifest_declares_what_the_app_uses() -> None:
    yaml = pytest.importorskip("yaml")
    manifest = yaml.safe_load(MANIFEST.read_text())
    commands = {c["command"] for c in manifest["features"]["slash_commands"]}
    assert commands == set(SLASH_COMMANDS)
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {
        "commands",
        "chat:write",
        "files:write",
        "files:read",
        "reactions:read",
        "channels:history",
        "usergroups:read",
    } <= scopes
    events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert {"message.channels", "reaction_added", "reaction_removed"} <= events
    assert manifest["settings"]["socket_mode_enabled"] is True


def test_unreachable_slack_is_one_clear_line(tmp_path: Path) -> None:
    with FakeSlackApi().running() as gone:
        dead_url = gone.api_url  # nothing listens here once stopped
    with pytest.raises(ConfigError, match="Could not reach Slack"):
        SlackBot(
            settings(tmp_path),
            RecordingHandler(),
            RecordingDeliverer,
            text_parser=word_parser,
            base_url=dead_url,
        )
