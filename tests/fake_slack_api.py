"""A local stand-in for Slack's Web API, file host and response_url endpoint.

It listens on 127.0.0.1 (a free port) and answers the methods Atelier's Slack adapter
calls, the way Slack does: `ok`/`error` JSON bodies, HTTP 429 with Retry-After when told
to rate-limit, a sign-in HTML page instead of a file when the bot token is missing, and
the three-step external upload behind `files_upload_v2` (getUploadURLExternal, a raw POST
to the upload URL, completeUploadExternal). Every request is recorded for assertions.

Point `slack_sdk.WebClient(token=..., base_url=fake.api_url)` at it.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from slack_sdk.signature import SignatureVerifier

from bot.commands import Command, ParsedText, Reaction, Reply

BOT_USER_ID = "UBOT0001"
BOT_ID = "BBOT0001"


@dataclass(frozen=True)
class Call:
    """One request the fake received."""

    method: str  # Web API method ("chat.postMessage"), or "download", "upload", "respond"
    path: str
    params: dict[str, Any]
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class FakeMessage:
    channel: str
    ts: str
    text: str
    thread_ts: str | None = None
    file_ids: list[str] = field(default_factory=list)
    edits: int = 0


@dataclass
class FakeFile:
    id: str
    name: str
    data: bytes
    mimetype: str = "image/png"
    title: str = ""
    shared_in: dict[str, str] = field(default_factory=dict)  # channel -> message ts
    thread_ts: str | None = None


@dataclass
class Failure:
    """A canned error for the next calls of one method."""

    error: str
    status: int = 200
    retry_after: int | None = None
    times: int = 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


class FakeSlackApi:
    def __init__(self, bot_token: str = "xoxb-fake-bot-token", team_id: str = "T0TEAM001") -> None:
        self.bot_token = bot_token
        self.team_id = team_id
        self.calls: list[Call] = []
        self.messages: dict[str, FakeMessage] = {}
        self.files: dict[str, FakeFile] = {}
        self.usergroups: dict[str, list[str]] = {}
        self.failures: dict[str, list[Failure]] = {}
        # Serve downloads chunked, with no Content-Length (the reader must count bytes).
        self.chunked_downloads = False
        # files.info shows a new share only after this many lookups (Slack shares async).
        self.share_delay_lookups = 0
        self._lookups: dict[str, int] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        # A short poll keeps shutdown() (each test's teardown) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    def start(self) -> FakeSlackApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @contextmanager
    def running(self) -> Iterator[FakeSlackApi]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- set-up helpers -----------------------------------------------------------------

    def add_file(self, data: bytes, name: str = "ref.png", mimetype: str = "image/png") -> dict:
        """Host a user's upload; returns the file object as it appears in an event."""
        file_id = self._new_id("F")
        with self._lock:
            self.files[file_id] = FakeFile(id=file_id, name=name, data=data, mimetype=mimetype)
        base = f"{self.url}/files-pri/{self.team_id}-{file_id}"
        return {
            "id": file_id,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": name.rsplit(".", 1)[-1],
            "size": len(data),
            "url_private": f"{base}/{name}",
            "url_private_download": f"{base}/download/{name}",
        }

    def fail(
        self,
        method: str,
        error: str,
        *,
        status: int = 200,
        retry_after: int | None = None,
        times: int = 1,
    ) -> None:
        """Make the next `times` calls of `method` fail like Slack would."""
        with self._lock:
            self.failures.setdefault(method, []).append(Failure(error, status, retry_after, times))

    def response_url(self, name: str = "cmd") -> str:
        return f"{self.url}/commands/{self.team_id}/{name}"

    # -- queries ------------------------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def call_names(self) -> list[str]:
        with self._lock:
            return [c.method for c in self.calls]

    # -- internals ----------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}"

    def _new_ts(self) -> str:
        return f"{int(time.time())}.{next(self._clock):06d}"

    def _take_failure(self, method: str) -> Failure | None:
        with self._lock:
            queue = self.failures.get(method)
            if not queue:
                return None
            failure = queue[0]
            failure.times -= 1
            if failure.times <= 0:
                queue.pop(0)
            return failure

    def api(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return {"ok": False, "error": "unknown_method"}
        with self._lock:
            return handler(params)

    def _post(self, channel: str, text: str, thread_ts: str | None) -> FakeMessage:
        message = FakeMessage(channel=channel, ts=self._new_ts(), text=text, thread_ts=thread_ts)
        self.messages[message.ts] = message
        return message

    def _m_auth_test(self, _p: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": f"{self.url}/",
            "team": "Fake Team",
            "team_id": self.team_id,
            "user": "atelier",
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
        }

    def _m_chat_postMessage(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        message = self._post(p["channel"], p.get("text", ""), p.get("thread_ts"))
        return {"ok": True, "channel": message.channel, "ts": message.ts, "message": {}}

    def _m_chat_postEphemeral(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "message_ts": self._new_ts()}

    def _m_chat_update(self, p: dict[str, Any]) -> dict[str, Any]:
        message = self.messages.get(p.get("ts", ""))
        if message is None or message.channel != p.get("channel"):
            return {"ok": False, "error": "message_not_found"}
        message.text = p.get("text", "")
        message.edits += 1
        if p.get("file_ids"):
            message.file_ids = str(p["file_ids"]).split(",")
        return {"ok": True, "channel": message.channel, "ts": message.ts, "text": message.text}

    def _m_files_getUploadURLExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("filename") or not str(p.get("length", "")).isdigit():
            return {"ok": False, "error": "invalid_arguments"}
        file_id = self._new_id("F")
        self.files[file_id] = FakeFile(id=file_id, name=p["filename"], data=b"")
        return {"ok": True, "file_id": file_id, "upload_url": f"{self.url}/upload/v1/{file_id}"}

    def _m_files_completeUploadExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        entries = json.loads(p.get("files", "[]"))
        files = [self.files.get(e.get("id", "")) for e in entries]
        if not entries or any(f is None or not f.data for f in files):
            return {"ok": False, "error": "file_not_found"}
        channel = p.get("channel_id")
        if channel:
            message = self._post(channel, p.get("initial_comment", ""), p.get("thread_ts"))
            for f in files:
                assert f is not None
                message.file_ids.append(f.id)
                f.shared_in[channel] = message.ts
                f.thread_ts = message.thread_ts
        # Like Slack: the answer names the files but not the message they landed in.
        return {"ok": True, "files": [{"id": f.id, "title": f.title or f.name} for f in files if f]}

    def _m_files_info(self, p: dict[str, Any]) -> dict[str, Any]:
        f = self.files.get(p.get("file", ""))
        if f is None:
            return {"ok": False, "error": "file_not_found"}
        seen = self._lookups[f.id] = self._lookups.get(f.id, 0) + 1
        shares: dict[str, Any] = {}
        if seen > self.share_delay_lookups and f.shared_in:
            shares["public"] = {
                channel: [{"ts": ts, "thread_ts": f.thread_ts, "channel_name": "art"}]
                for channel, ts in f.shared_in.items()
            }
        return {"ok": True, "file": {"id": f.id, "name": f.name, "shares": shares}}

    def _m_files_delete(self, p: dict[str, Any]) -> dict[str, Any]:
        f = self.files.pop(p.get("file", ""), None)
        if f is None:
            return {"ok": False, "error": "file_not_found"}
        # Like Slack: the message stays, without the file.
        for message in self.messages.values():
            if f.id in message.file_ids:
                message.file_ids.remove(f.id)
        return {"ok": True}

    def _m_views_open(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        return {"ok": True, "view": {"id": self._new_id("V")}}

    def _m_usergroups_users_list(self, p: dict[str, Any]) -> dict[str, Any]:
        group = p.get("usergroup", "")
        if group not in self.usergroups:
            return {"ok": False, "error": "no_such_subteam"}
        return {"ok": True, "users": list(self.usergroups[group])}


SIGN_IN_PAGE = b"<!DOCTYPE html><html><body>Sign in to Slack</body></html>"


def _handler_for(fake: FakeSlackApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def _record(self, method: str, params: dict[str, Any], body: bytes = b"") -> None:
            call = Call(method, self.path, params, dict(self.headers.items()), body)
            with fake._lock:
                fake.calls.append(call)

        def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any], **headers: str) -> None:
            self._send(
                status, json.dumps(data).encode(), "application/json; charset=utf-8", **headers
            )

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path.startswith("/files-pri/"):
                self._download(path)
            else:
                self._send(404, b"not found", "text/plain")

        def _download(self, path: str) -> None:
            self._record("download", {})
            file_id = path.split("/")[2].split("-", 1)[-1]
            f = fake.files.get(file_id)
            if f is None:
                self._send(404, b"file not found", "text/plain")
            elif self.headers.get("Authorization") != f"Bearer {fake.bot_token}":
                # Slack answers an unauthenticated file URL with its sign-in page.
                self._send(200, SIGN_IN_PAGE, "text/html; charset=utf-8")
            elif fake.chunked_downloads:
                self.send_response(200)
                self.send_header("Content-Type", f.mimetype)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(f.data), 1000):
                    piece = f.data[i : i + 1000]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            else:
                self._send(200, f.data, f.mimetype)

        def do_POST(self) -> None:
            split = urlsplit(self.path)
            body = self._body()
            if split.path.startswith("/upload/v1/"):
                file_id = split.path.rsplit("/", 1)[-1]
                self._record("upload", {"file_id": file_id}, body)
                with fake._lock:
                    f = fake.files.get(file_id)
                    if f is not None:
                        f.data = body
                ok = f is not None
                self._send(200 if ok else 404, f"OK - {len(body)}".encode(), "text/plain")
                return
            if split.path.startswith("/commands/"):
                self._record("respond", json.loads(body or b"{}"), body)
                self._send(200, b"ok", "text/html")
                return
            if not split.path.startswith("/api/"):
                self._send(404, b"not found", "text/plain")
                return
            method = split.path[len("/api/") :]
            params = _params(split.query, body, self.headers.get("Content-Type", ""))
            self._record(method, params, body)
            failure = fake._take_failure(method)
            if failure is not None:
                extra = (
                    {} if failure.retry_after is None else {"Retry_After": str(failure.retry_after)}
                )
                self._json(failure.status, {"ok": False, "error": failure.error}, **extra)
                return
            if self.headers.get("Authorization") != f"Bearer {fake.bot_token}":
                self._json(200, {"ok": False, "error": "invalid_auth"})
                return
            self._json(200, fake.api(method, params))

    return Handler


def _params(query: str, body: bytes, content_type: str) -> dict[str, Any]:
    params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(query).items()}
    if content_type.startswith("application/json"):
        params.update(json.loads(body or b"{}"))
    elif body:
        params.update({k: v[-1] for k, v in parse_qs(body.decode()).items()})
    return params


# -- signed requests as Slack sends them ---------------------------------------------------


def signed_headers(
    secret: str, body: str, *, timestamp: int | None = None, content_type: str
) -> dict[str, str]:
    """The headers Slack adds: a v0 HMAC-SHA256 of `v0:{timestamp}:{body}`."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    return {
        "content-type": content_type,
        "x-slack-request-timestamp": ts,
        "x-slack-signature": signature,
    }


def slash_command_form(
    command: str,
    text: str,
    *,
    response_url: str,
    trigger_id: str = "1234567890.111.abcdef",
    team_id: str = "T0TEAM001",
    team_domain: str = "studio",
    channel_id: str = "C0ART0001",
    user_id: str = "U0ALICE01",
    user_name: str = "alice",
) -> str:
    """A slash command exactly as Slack POSTs it: application/x-www-form-urlencoded."""
    from urllib.parse import urlencode

    return urlencode(
        {
            "token": "legacy-verification-token",
            "team_id": team_id,
            "team_domain": team_domain,
            "channel_id": channel_id,
            "channel_name": "art",
            "user_id": user_id,
            "user_name": user_name,
            "command": command,
            "text": text,
            "api_app_id": "A0ATELIER1",
            "is_enterprise_install": "false",
            "response_url": response_url,
            "trigger_id": trigger_id,
        }
    )


def event_callback(
    event: dict[str, Any], *, event_id: str, team_id: str = "T0TEAM001"
) -> dict[str, Any]:
    """An Events API envelope around `event`."""
    return {
        "token": "legacy-verification-token",
        "team_id": team_id,
        "api_app_id": "A0ATELIER1",
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": int(time.time()),
        "authorizations": [
            {
                "team_id": team_id,
                "user_id": BOT_USER_ID,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": "4-eyJldCI6Im1lc3NhZ2UifQ",
    }


def file_share_event(
    files: list[dict[str, Any]],
    *,
    thread_ts: str | None,
    channel: str = "C0ART0001",
    user: str = "U0ALICE01",
    ts: str = "1700000100.000200",
    text: str = "",
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "message",
        "subtype": "file_share",
        "text": text,
        "files": files,
        "upload": False,
        "user": user,
        "display_as_bot": False,
        "ts": ts,
        "channel": channel,
        "channel_type": "channel",
        "event_ts": ts,
    }
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
        event["parent_user_id"] = BOT_USER_ID
    return event


def reaction_event(
    reaction: str,
    *,
    item_ts: str,
    added: bool = True,
    channel: str = "C0ART0001",
    user: str = "U0ALICE01",
) -> dict[str, Any]:
    return {
        "type": "reaction_added" if added else "reaction_removed",
        "user": user,
        "reaction": reaction,
        "item_user": BOT_USER_ID,
        "item": {"type": "message", "channel": channel, "ts": item_ts},
        "event_ts": "1700000200.000300",
    }


class InlineExecutor(Executor):
    """Runs submitted work at once, so a dispatch returns after its lazy listener ran."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


# -- stand-ins for the command core ---------------------------------------------------------


def word_parser(slash: str, text: str) -> ParsedText:
    """A stand-in for the core's parser: `/style create ink x` -> "style create", words."""
    words = text.split()
    if slash == "/style" and words:
        return ParsedText(name=f"style {words[0]}", args={"words": " ".join(words[1:])})
    return ParsedText(name=slash.lstrip("/"), args={"words": " ".join(words)})


def block_actions_form(
    action_id: str,
    *,
    trigger_id: str,
    message_ts: str,
    user: str = "U0ALICE01",
    channel: str = "C0ART0001",
    team_id: str = "T0TEAM001",
) -> str:
    """A button press exactly as Slack POSTs it: form-encoded `payload` JSON (block_actions)."""
    from urllib.parse import urlencode

    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": team_id},
        "api_app_id": "A0ATELIER1",
        "token": "legacy-verification-token",
        "container": {
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel,
            "is_ephemeral": False,
        },
        "trigger_id": trigger_id,
        "team": {"id": team_id, "domain": "studio"},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel, "name": "art"},
        "message": {"type": "message", "ts": message_ts, "text": "result", "bot_id": BOT_ID},
        "response_url": "https://hooks.slack.com/actions/T0TEAM001/1/abc",
        "actions": [
            {
                "action_id": action_id,
                "block_id": "b1",
                "text": {"type": "plain_text", "text": "button", "emoji": True},
                "value": action_id,
                "type": "button",
                "action_ts": "1700000300.000400",
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)})


def view_submission_form(
    callback_id: str,
    values: dict[str, str],
    *,
    view_id: str,
    private_metadata: str,
    user: str = "U0ALICE01",
    team_id: str = "T0TEAM001",
    picked: dict[str, str | None] | None = None,
) -> str:
    """A submitted modal exactly as Slack POSTs it (view_submission): `values` typed in
    text inputs, `picked` chosen in static selects (None: left unchosen)."""
    from urllib.parse import urlencode

    state: dict[str, Any] = {
        name: {name: {"type": "plain_text_input", "value": value}} for name, value in values.items()
    }
    for name, value in (picked or {}).items():
        option = None if value is None else {"text": {"type": "plain_text", "text": value}}
        if option is not None:
            option["value"] = value
        state[name] = {name: {"type": "static_select", "selected_option": option}}
    payload = {
        "type": "view_submission",
        "team": {"id": team_id, "domain": "studio"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": team_id},
        "api_app_id": "A0ATELIER1",
        "token": "legacy-verification-token",
        "trigger_id": "9999.8888.view",
        "view": {
            "id": view_id,
            "team_id": team_id,
            "type": "modal",
            "callback_id": callback_id,
            "private_metadata": private_metadata,
            "state": {"values": state},
            "hash": "1700000400.abcd",
            "title": {"type": "plain_text", "text": "Edit and run again"},
            "blocks": [],
        },
        "response_urls": [],
        "is_enterprise_install": False,
    }
    return urlencode({"payload": json.dumps(payload)})


class RecordingHandler:
    def __init__(self, replies: list[Reply] | None = None) -> None:
        self.commands: list[Command] = []
        self.reactions: list[Reaction] = []
        self.presses: list[Any] = []
        self.replies = replies or []

    def handle_press(self, press: Any) -> list[Reply]:
        self.presses.append(press)
        return list(self.replies)

    def handle(self, command: Command) -> list[Reply]:
        self.commands.append(command)
        return list(self.replies)

    def handle_reaction(self, reaction: Reaction) -> list[Reply]:
        self.reactions.append(reaction)
        return list(self.replies)
