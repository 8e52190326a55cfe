"""Secrets stay secret, files stay in the data directory, teams stay apart.

Every token and signing secret below carries the marker `SeCrEt`. Each scenario runs the
real code path (the bolt App with signed requests, the Slack and Discord start-up, the
`atelier` CLI, the outbox deliverer) with all logging captured at DEBUG and stdout/stderr
captured at the file-descriptor level, then asserts the marker appears nowhere: not in a
log line, not in a traceback, not in an error message, not in a stored error column.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fake_slack_api import (
    FakeSlackApi,
    InlineExecutor,
    event_callback,
    file_share_event,
    signed_headers,
    slash_command_form,
)
from hostile_corpus import png
from slack_bolt import App, BoltRequest, BoltResponse
from slack_sdk import WebClient
from sqlalchemy import select

from bot import cli
from bot.commands import Reply, TeamRef
from bot.core import CorePolicy
from bot.delivery import MessageSender, OutboxDeliverer
from bot.discord.client import AtelierDiscordClient
from bot.discord.run import run_discord
from bot.discord.sender import DiscordSender
from bot.slack.app import build_slack_app
from bot.slack.files import SlackFiles
from bot.slack.run import SlackBot
from bot.slack.sender import SlackSender
from storage.blobs import BlobStore
from storage.db import Database
from storage.job_payloads import JobKind
from storage.models import DatasetStatus, ModelVersion, OutboxMessage, ReferenceImage
from storage.settings import ConfigError
from tests.fake_discord_api import APP_ID, FakeDiscordAPI, patch_route_base
from tests.fake_discord_api import RecordingHandler as DiscordRecorder

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import (  # noqa: E402
    LEAD,
    MEMBER,
    OTHER_TEAM,
    TEAM,
    Rig,
    add_model_version,
    approved_style,
    build_rig,
    images,
    mem_file,
)

pytest_plugins = ("bot_fixtures",)

MARK = "SeCrEt"
SLACK_BOT = f"xoxb-1111-2222-{MARK}BotToken7f3a9c1e"
SLACK_APP = f"xapp-1-A0TEST-{MARK}AppToken9d8e7f"
SIGNING = f"{MARK}SigningSecret5b4a3c2d1e0f9a8b"
# A well-formed Discord token (its first part is the application id in base64).
DISCORD = f"MTEwMDAwMDAwMDAwMDAwMDAwMQ.{MARK}Gx.discord-{MARK}-tail-3c2b1a"
DB_PASSWORD = f"{MARK}DbPassword77"
SECRET_SETTINGS: dict[str, Any] = {
    "slack_bot_token": SLACK_BOT,
    "slack_app_token": None,
    "slack_signing_secret": SIGNING,
    "discord_token": DISCORD,
}
FORM = "application/x-www-form-urlencoded"
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


# -- the leak detector -------------------------------------------------------------------------


@dataclass
class LeakWatch:
    """Everything the process said: log records (with tracebacks), stdout/stderr, and any
    other text a test hands in (replies, exception messages, stored error columns)."""

    caplog: pytest.LogCaptureFixture
    capfd: pytest.CaptureFixture[str]
    texts: list[str] = field(default_factory=list)

    def note(self, *texts: object) -> None:
        self.texts.extend(str(t) for t in texts)

    def assert_clean(self) -> str:
        out, err = self.capfd.readouterr()
        parts = [self.caplog.text, out, err, *self.texts]
        for record in self.caplog.records:
            parts.append(record.getMessage())
            parts.append(repr(record.args))
            if record.exc_info and record.exc_info[1] is not None:
                parts.append(repr(record.exc_info[1]))
        everything = "\n".join(parts)
        for secret in (MARK, SLACK_BOT, SLACK_APP, SIGNING, DISCORD, DB_PASSWORD):
            assert secret not in everything, f"a secret leaked: ...{_around(everything, secret)}"
        return everything


def _around(text: str, needle: str) -> str:
    at = text.find(needle)
    return text[max(0, at - 200) : at + 60]


@pytest.fixture
def leaks(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> LeakWatch:
    caplog.set_level(logging.DEBUG)  # the root logger: every library's debug output
    return LeakWatch(caplog, capfd)


@pytest.fixture
def fake_slack() -> Iterator[FakeSlackApi]:
    with FakeSlackApi(bot_token=SLACK_BOT).running() as api:
        yield api


def secret_rig(db: Database, tmp_path: Path, **settings: Any) -> Rig:
    return build_rig(db, tmp_path, **{**SECRET_SETTINGS, **settings})


def outbox_errors(rig: Rig) -> list[str]:
    with rig.db.session() as s:
        return [e for e in s.scalars(select(OutboxMessage.error)) if e]


# -- Slack: signed requests, bad tokens, failed downloads and deliveries -----------------------


def _post(url: str, body: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class _NoBackground:
    def __init__(self, sender: MessageSender) -> None:
        self.sender = sender

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@SQLITE_ONLY
def test_forged_slack_requests_are_refused_without_echoing_the_secret(
    db: Database, tmp_path: Path, fake_slack: FakeSlackApi, leaks: LeakWatch
) -> None:
    rig = secret_rig(db, tmp_path)
    bot = SlackBot(
        rig.settings,
        rig.core,
        _NoBackground,
        http_host="127.0.0.1",
        http_port=0,
        base_url=fake_slack.api_url,
        workers=1,
    )
    bot.start()
    try:
        host, port = bot.http_address
        url = f"http://{host}:{port}/slack/events"
        body = slash_command_form("/style", "create ink inkstyle", response_url="http://x/")
        good = signed_headers(SIGNING, body, content_type=FORM)
        forgeries = {
            "guessed secret": signed_headers("guess", body, content_type=FORM),
            "no signature": {"content-type": FORM},
            "replayed an hour later": signed_headers(
                SIGNING,
                body,
                content_type=FORM,
                timestamp=int(good["x-slack-request-timestamp"]) - 3600,
            ),
            "tampered body": good,
        }
        for name, headers in forgeries.items():
            sent = body.replace("inkstyle", "evil") if name == "tampered body" else body
            status, answer = _post(url, sent, headers)
            assert status == 401, name
            leaks.note(answer)
    finally:
        bot.stop()
    assert rig.count(OutboxMessage) == 0  # nothing forged reached the core
    leaks.assert_clean()


def test_a_rejected_slack_bot_token_is_one_line_without_the_token(
    tmp_path: Path, leaks: LeakWatch
) -> None:
    with FakeSlackApi(bot_token="xoxb-the-one-slack-knows").running() as api:
        rig_settings = build_rig(
            Database(f"sqlite:///{tmp_path}/x.db"), tmp_path, **SECRET_SETTINGS
        ).settings
        with pytest.raises(
            ConfigError, match="Slack did not accept ATELIER_SLACK_BOT_TOKEN"
        ) as err:
            SlackBot(rig_settings, _Core(), _NoBackground, base_url=api.api_url)
        [auth] = api.calls_to("auth.test")
        assert auth.headers["Authorization"] == f"Bearer {SLACK_BOT}"  # it was really tried
    assert "\n" not in str(err.value)
    leaks.note(err.value)
    leaks.assert_clean()


class _Core:
    text_parser = staticmethod(lambda slash, text: None)

    def handle(self, command: Any) -> list[Reply]:
        return []

    def handle_reaction(self, reaction: Any) -> list[Reply]:
        return []


def _slack_app(rig: Rig, fake: FakeSlackApi) -> App:
    client = WebClient(token=SLACK_BOT, base_url=fake.api_url)
    return build_slack_app(
        rig.core,
        rig.core.text_parser,
        client=client,
        signing_secret=SIGNING,
        executor=InlineExecutor(),
    )


def _dispatch(app: App, body: str, content_type: str) -> BoltResponse:
    headers = signed_headers(SIGNING, body, content_type=content_type)
    return app.dispatch(BoltRequest(body=body, headers=headers))


@SQLITE_ONLY
def test_slack_failures_after_the_ack_never_show_a_token(
    db: Database, tmp_path: Path, fake_slack: FakeSlackApi, leaks: LeakWatch
) -> None:
    rig = secret_rig(db, tmp_path)
    app = _slack_app(rig, fake_slack)
    sender = SlackSender(WebClient(token=SLACK_BOT, base_url=fake_slack.api_url), sleep=_no_wait)
    deliverer = OutboxDeliverer(rig.outbox, rig.blobs, sender, "slack", clock=rig.clock)

    body = slash_command_form(
        "/style", "create ink inkstyle", response_url=fake_slack.response_url(), user_id=LEAD
    )
    assert _dispatch(app, body, FORM).status == 200
    [created] = fake_slack.calls_to("respond")
    assert "Created style *ink*" in created.params["text"]
    assert deliverer.deliver_due() == 1  # the style's announcement: its ts is the thread
    thread = next(iter(fake_slack.messages))

    # The token is revoked: downloads get Slack's sign-in page, replies get invalid_auth.
    fake_slack.bot_token = "xoxb-rotated"
    shared = fake_slack.add_file(png(1), name="ref.png")
    event = event_callback(file_share_event([shared], thread_ts=thread), event_id="Ev0LEAK")
    assert _dispatch(app, json.dumps(event), "application/json").status == 200
    assert rig.count(ReferenceImage) == 0
    [answer] = fake_slack.calls_to("chat.postMessage")[1:]  # tried, refused: invalid_auth
    assert "ref.png: Slack sent its sign-in page instead of the file" in answer.params["text"]

    # The outbox deliverer: an auth failure, a server error and a permanent refusal.
    for error in ("invalid_auth", "internal_error", "channel_not_found"):
        rig.outbox.put(
            f"note:{error}", platform="slack", channel="C0ART0001", team_id=None, text=error
        )
    fake_slack.bot_token = SLACK_BOT
    fake_slack.fail("chat.postMessage", "invalid_auth")
    fake_slack.fail("chat.postMessage", "internal_error", status=500)
    fake_slack.fail("chat.postMessage", "channel_not_found")
    deliverer.deliver_due()
    errors = outbox_errors(rig)
    assert len(errors) == 3 and any("does not exist" in e for e in errors)
    leaks.note(*errors, *(c.params for c in fake_slack.calls))
    everything = leaks.assert_clean()
    assert "delivering note:invalid_auth failed" in everything  # the failures were logged


def _no_wait(_seconds: float) -> None:
    pass


class _FileHost(ThreadingHTTPServer):
    """Serves a PNG at /final.png; /file.png redirects to `redirect_to`. Records headers."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.redirect_to = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.seen.append(dict(self.headers.items()))
                if self.path == "/file.png" and outer.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", outer.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = png(2)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.01}).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server_address[1]}{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def test_the_slack_token_goes_only_to_the_host_the_file_url_names(leaks: LeakWatch) -> None:
    # A file URL that redirects elsewhere (a CDN, or a link someone planted) must not carry
    # the bot token along: urllib copies request headers into the redirected request.
    slack_host, elsewhere = _FileHost(), _FileHost()
    slack_host.redirect_to = elsewhere.url("/final.png", host="localhost")
    try:
        data = SlackFiles(WebClient(token=SLACK_BOT)).download(
            slack_host.url("/file.png"), "ref.png", 1_000_000
        )
    finally:
        slack_host.close()
        elsewhere.close()
    assert data == png(2)
    [first] = slack_host.seen
    assert first["Authorization"] == f"Bearer {SLACK_BOT}"
    [second] = elsewhere.seen
    assert "Authorization" not in second
    leaks.note(second)
    leaks.assert_clean()


def test_a_redirect_on_the_same_host_keeps_the_token() -> None:
    host = _FileHost()
    host.redirect_to = host.url("/final.png")
    try:
        data = SlackFiles(WebClient(token=SLACK_BOT)).download(
            host.url("/file.png"), "ref.png", 1_000_000
        )
    finally:
        host.close()
    assert data == png(2)
    assert [h.get("Authorization") for h in host.seen] == [f"Bearer {SLACK_BOT}"] * 2


# -- Discord: a rejected token, failed deliveries ----------------------------------------------


@pytest.fixture
def discord_api_in_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDiscordAPI]:
    """The fake Discord API on its own loop (run_discord owns the main thread's loop)."""
    api = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    patch_route_base(monkeypatch, api)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(api.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait()
    yield api
    asyncio.run_coroutine_threadsafe(api.stop(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def test_a_rejected_discord_token_is_never_logged_or_shown(
    tmp_path: Path, discord_api_in_thread: FakeDiscordAPI, leaks: LeakWatch
) -> None:
    api = discord_api_in_thread
    api.fail_next("GET", "/users/@me", 401, {"message": "401: Unauthorized", "code": 0})
    settings = build_rig(
        Database(f"sqlite:///{tmp_path}/x.db"), tmp_path, **SECRET_SETTINGS
    ).settings
    with pytest.raises(ConfigError, match="Discord rejected ATELIER_DISCORD_TOKEN") as err:
        run_discord(settings, DiscordRecorder(), _NoBackground)
    [login] = api.find("GET", "/users/@me")
    assert login.headers["Authorization"] == f"Bot {DISCORD}"
    leaks.note(err.value, repr(err.value))
    leaks.assert_clean()


@SQLITE_ONLY
def test_discord_delivery_failures_never_show_the_token(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leaks: LeakWatch
) -> None:
    api = FakeDiscordAPI(application_id=APP_ID, bot_user_id=APP_ID)
    patch_route_base(monkeypatch, api)
    rig = secret_rig(db, tmp_path)
    channel = "1100000000000000200"
    for n in range(3):
        rig.outbox.put(f"note:{n}", platform="discord", channel=channel, team_id=None, text="hi")
    api.fail_next("POST", rf"/channels/{channel}/messages", 401, {"message": "401: Unauthorized"})
    api.fail_next("POST", rf"/channels/{channel}/messages", 403, {"message": "Missing Access"})
    api.fail_next("POST", rf"/channels/{channel}/messages", 404, {"message": "Unknown Channel"})

    async def scenario() -> int:
        await api.start()
        client = AtelierDiscordClient(DiscordRecorder(), sync_commands=False)
        try:
            await client.login(DISCORD)
            deliverer = OutboxDeliverer(
                rig.outbox, rig.blobs, DiscordSender(client, timeout=30), "discord"
            )
            return await asyncio.to_thread(deliverer.deliver_due)
        finally:
            await client.close()
            await api.stop()

    assert asyncio.run(scenario()) == 0
    errors = outbox_errors(rig)
    assert len(errors) == 3 and any("401" in e for e in errors)
    leaks.note(*errors)
    leaks.assert_clean()


# -- the atelier CLI -------------------------------------------------------------------------


def _env_file(directory: Path, **values: str) -> None:
    lines = [f"ATELIER_{k.upper()}={v}" for k, v in values.items()]
    (directory / ".env").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("argv", "values", "expected"),
    [
        pytest.param(
            ["bot", "slack"],
            {"slack_bot_token": SLACK_BOT},
            "ATELIER_SLACK_SIGNING_SECRET is not set",
            id="slack-without-signing-secret",
        ),
        pytest.param(
            ["bot", "slack"],
            {"slack_bot_token": SLACK_BOT, "slack_app_token": f"xoxb-{MARK}-wrong-kind"},
            "must be an app-level token starting with xapp-",
            id="slack-app-token-of-the-wrong-kind",
        ),
        pytest.param(
            ["bot", "slack"],
            {"slack_signing_secret": SIGNING},
            "ATELIER_SLACK_BOT_TOKEN is not set",
            id="slack-without-bot-token",
        ),
        pytest.param(
            ["bot", "discord", "--invite"],
            {"discord_token": f"{MARK}-not-base64.{MARK}.{MARK}"},
            "does not look like a Discord bot token",
            id="malformed-discord-token",
        ),
        pytest.param(
            ["bot", "discord", "--invite"],
            {"discord_token": DISCORD, "discord_guild_id": f"{MARK}42"},
            "ATELIER_DISCORD_GUILD_ID",
            id="secret-pasted-into-the-wrong-variable",
        ),
        pytest.param(
            ["db", "check"],
            {"database_url": f"mysql://atelier:{DB_PASSWORD}@db.example/atelier"},
            "only sqlite:/// and postgresql URLs are supported",
            id="database-url-of-another-kind",
        ),
        pytest.param(
            ["db", "check"],
            {"slack_bot_token": SLACK_BOT, "base_models": '{"sd15": "' + MARK},
            "ATELIER_BASE_MODELS: is not valid JSON",
            id="broken-json-beside-a-token",
        ),
        pytest.param(
            ["db", "check"],
            {"database_url": f"postgresql+psycopg://atelier:{DB_PASSWORD}@127.0.0.1:9/atelier"},
            "",
            id="unreachable-database-with-a-password",
        ),
    ],
)
def test_cli_configuration_errors_never_show_a_secret(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    leaks: LeakWatch,
    argv: list[str],
    values: dict[str, str],
    expected: str,
) -> None:
    for name in list(os.environ):
        if name.startswith("ATELIER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # the CLI reads ./.env
    _env_file(tmp_path, data_dir=str(tmp_path / "data"), **values)
    try:
        code = cli.main(argv)
    except Exception as exc:  # an unhandled error still must not show the secret
        leaks.note(repr(exc), str(exc))
        code = None
    everything = leaks.assert_clean()
    if expected:
        assert code == 2
        assert expected in everything


# -- files stay under the data directory -------------------------------------------------------

HOSTILE_NAMES = [
    "../../etc/passwd.png",
    "/abs/path.png",
    "..\\..\\windows\\system32\\evil.png",
    "~/.ssh/keys.png",
    "%2e%2e%2f%2e%2e%2fencoded.png",
    "nul\x00byte.png",
    "new\nline\r.png",
    "\u202egnp.exe",
    "..",
    "/",
    "",
    "a/" * 200 + "deep.png",
    b"\xff\xfe\xfd.png".decode("utf-8", "surrogateescape"),
]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_uploaded_file_names_never_choose_where_files_are_written(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    workdir = root / "work" / "here"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)  # a relative "../../x" would land under root/ if honoured
    rig = build_rig(db, root, policy=_no_limit())
    data_dir = rig.settings.data_dir
    assert data_dir == root / "data"
    assert "Created" in rig.text("style create", {"name": "ink", "trigger": "inkstyle"})
    uploads = [mem_file(name, png(100 + i)) for i, name in enumerate(HOSTILE_NAMES)]
    reply = rig.text("style add", {"name": "ink"}, files=uploads)
    assert f"added {len(HOSTILE_NAMES)} of {len(HOSTILE_NAMES)} files" in reply
    rig.text("style review", {"name": "ink"})  # renders sheets and cards from the blobs
    rig.deliverer.deliver_due()

    written = files_under(root)
    assert written, "the uploads were stored somewhere"
    outside = [p for p in written if data_dir not in p.parents]
    assert outside == []
    for absolute in (Path("/abs"), Path("/etc/passwd.png"), Path.home() / ".ssh/keys.png"):
        assert not absolute.exists()
    stored = rig.images(rig.datasets("ink")[-1].id)
    assert len(stored) == len(HOSTILE_NAMES)
    for image in stored:
        # Named by content hash in the blob store; the name people see is tame.
        assert rig.blobs.path(image.blob_sha256).is_file()
        assert not any(c in image.original_name for c in "/\\\x00\n\r\u202e")
        assert image.original_name.strip() and len(image.original_name) <= 80
        image.original_name.encode("utf-8")  # storable and sendable text
    shown = [line.split(" → ")[0] for line in reply.splitlines() if line.startswith("✓")]
    assert len(shown) == len(HOSTILE_NAMES)
    assert not any(c in name for name in shown for c in "/\\\x00\n\r")


def _no_limit() -> CorePolicy:
    return CorePolicy(rate_limit_commands=10_000)


@SQLITE_ONLY
def test_slack_file_names_never_choose_where_files_are_written(
    db: Database, tmp_path: Path, fake_slack: FakeSlackApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "cwd").mkdir(parents=True)
    monkeypatch.chdir(root / "cwd")
    rig = build_rig(db, root, policy=_no_limit(), **SECRET_SETTINGS)
    app = _slack_app(rig, fake_slack)
    workspace = TeamRef("slack", fake_slack.team_id, "studio")
    rig.text("style create", {"name": "ink", "trigger": "inkstyle"}, team=workspace)
    sender = SlackSender(WebClient(token=SLACK_BOT, base_url=fake_slack.api_url), sleep=_no_wait)
    OutboxDeliverer(rig.outbox, rig.blobs, sender, "slack").deliver_due()
    thread = next(iter(fake_slack.messages))
    names = ["../../../etc/cron.d/evil.png", "/tmp/abs.png", "..%2f..%2fx.png", "..\\a.png"]
    shared = [fake_slack.add_file(png(200 + i), name=n) for i, n in enumerate(names)]
    event = event_callback(file_share_event(shared, thread_ts=thread), event_id="Ev0NAMES")
    assert _dispatch(app, json.dumps(event), "application/json").status == 200
    assert rig.count(ReferenceImage) == len(names)
    outside = [p for p in files_under(root) if rig.settings.data_dir not in p.parents]
    assert outside == []
    assert not Path("/tmp/abs.png").exists() and not Path("/etc/cron.d/evil.png").exists()


# -- teams are sealed off from each other -----------------------------------------------------


@dataclass
class TwoTeams:
    rig: Rig
    model_id: int
    job_id: int
    kohya: bytes


@pytest.fixture
def two_teams(db: Database, tmp_path: Path) -> TwoTeams:
    """Team One: style ink (approved dataset, a trained model with files), a queued
    generation, a review sheet and image cards. Team Two: nothing yet."""
    rig = build_rig(db, tmp_path, policy=_no_limit())
    approved_style(rig, "ink", "inkstyle", seeds=(1, 2, 3))
    kohya = b"team-one-kohya-lora-bytes"
    model_id = add_model_version(rig, "ink", kohya=kohya, diffusers=b"team-one-diffusers")
    assert "Queued" in rig.text("imagine", {"prompt": "a fox, inkstyle"})
    [job] = rig.jobs(JobKind.GENERATE)
    rig.deliverer.deliver_due()
    return TwoTeams(rig, model_id, job.id, kohya)


def test_another_team_cannot_see_or_export_a_style(two_teams: TwoTeams) -> None:
    rig = two_teams.rig
    for name in ("style info", "style export", "style review", "style train"):
        replies = rig.run(name, {"name": "ink"}, team=OTHER_TEAM, user=LEAD)
        [reply] = replies
        assert "There is no style 'ink' in this team" in reply.text, name
        assert not reply.files
    caption = rig.text(
        "style caption", {"name": "ink", "number": "1", "text": "mine now"}, team=OTHER_TEAM
    )
    assert "There is no style 'ink' in this team" in caption
    listing = rig.text("style list", team=OTHER_TEAM)
    assert "ink" not in listing and "no styles yet" in listing
    before = rig.blob_count()
    added = rig.text("style add", {"name": "ink"}, files=images(9), team=OTHER_TEAM)
    assert "There is no style 'ink' in this team" in added
    assert rig.blob_count() == before
    # Team One still sees its own.
    [own] = rig.run("style export", {"name": "ink"})
    assert [f.data for f in own.files] == [two_teams.kohya, b"team-one-diffusers"]


def test_another_teams_trigger_word_is_just_a_word(two_teams: TwoTeams) -> None:
    rig = two_teams.rig
    reply = rig.text("imagine", {"prompt": "a fox, inkstyle"}, team=OTHER_TEAM)
    assert "no style" in reply
    newest = rig.jobs(JobKind.GENERATE)[-1]
    assert newest.payload["adapters"] == []
    tagged = rig.text("imagine", {"prompt": "a fox <lora:ink:0.8>"}, team=OTHER_TEAM)
    assert "names no style in this team" in tagged
    # Same style name and trigger in Team Two: its own model, never Team One's.
    assert "Created" in rig.text(
        "style create", {"name": "ink", "trigger": "inkstyle"}, team=OTHER_TEAM
    )
    mine = _other_team_model(rig)
    rig.text("imagine", {"prompt": "a fox, inkstyle"}, team=OTHER_TEAM)
    [adapter] = rig.jobs(JobKind.GENERATE)[-1].payload["adapters"]
    assert adapter["model_version_id"] == mine != two_teams.model_id


def _other_team_model(rig: Rig) -> int:
    style = rig.style("ink", OTHER_TEAM)
    with rig.db.session(write=True) as s:
        model = ModelVersion(style_id=style.id, version=1, base_model="tiny-sd15")
        s.add(model)
        s.flush()
        return model.id


def test_another_team_cannot_cancel_or_list_a_job(two_teams: TwoTeams) -> None:
    rig = two_teams.rig
    job = two_teams.job_id
    # LEAD is an art lead by configuration; in another workspace that grants nothing here.
    refused = rig.text("cancel", {"job": str(job)}, team=OTHER_TEAM, user=LEAD)
    assert f"There is no job #{job} in this team" in refused
    assert rig.jobs(JobKind.GENERATE)[0].status == "queued"
    listing = rig.text("jobs", team=OTHER_TEAM, user=MEMBER)
    assert f"#{job}" not in listing and "a fox" not in listing


def test_reactions_on_another_teams_messages_change_nothing(two_teams: TwoTeams) -> None:
    rig = two_teams.rig
    dataset = rig.datasets("ink")[-1]
    # A fresh draft in review, so an approval would have something to change.
    rig.run("style add", {"name": "ink"}, files=images(7))
    rig.run("style review", {"name": "ink"})
    draft = rig.datasets("ink")[-1]
    assert draft.id != dataset.id and draft.status == DatasetStatus.IN_REVIEW
    jobs_before = len(rig.jobs())
    [card] = rig.images(draft.id)[:1]
    for key, emoji in (
        (f"review:dataset:{draft.id}", "✅"),
        (f"review:dataset:{draft.id}", "❌"),
        (f"card:image:{card.id}", "❌"),
        (f"job:{two_teams.job_id}:result", "🔁"),
    ):
        if key.startswith("job:"):
            rig.outbox.put(key, platform="slack", channel="C1", team_id=None, text="result")
        assert rig.react(key, emoji, user=LEAD, team=OTHER_TEAM) == [], key
    assert rig.datasets("ink")[-1].status == DatasetStatus.IN_REVIEW
    assert not any(i.dropped for i in rig.images(draft.id))
    assert len(rig.jobs()) == jobs_before
    # The same reactions from Team One do work (so the messages above were live).
    assert "Queued" in rig.react(f"job:{two_teams.job_id}:result", "🔁", user=MEMBER)[0].text
    assert len(rig.jobs()) == jobs_before + 1
    assert "approved" in rig.react(f"review:dataset:{draft.id}", "✅", user=LEAD)[0].text


@SQLITE_ONLY
def test_a_discord_guild_with_a_slack_workspaces_id_is_another_team(two_teams: TwoTeams) -> None:
    rig = two_teams.rig
    twin = TeamRef("discord", TEAM.external_id, "Same id, other platform")
    reply = rig.text("style info", {"name": "ink"}, team=twin, roles=("Art Lead",))
    assert "There is no style 'ink' in this team" in reply
    cancel = rig.text("cancel", {"job": str(two_teams.job_id)}, team=twin, roles=("Art Lead",))
    assert "There is no job" in cancel


def test_blob_store_paths_cannot_be_steered_by_a_hash(tmp_path: Path) -> None:
    # Model rows hold blob hashes; the store refuses anything that is not one.
    store = BlobStore(tmp_path / "blobs", 1000)
    for bad in ("../../etc/passwd", "/etc/passwd", "a" * 63, "A" * 64, "a" * 64 + "/x"):
        with pytest.raises(ValueError, match="not a blob hash"):
            store.path(bad)
