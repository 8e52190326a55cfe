"""A local stand-in for Discord's REST API and CDN, for driving discord.py in tests.

It answers the calls the Atelier bot makes with plausible JSON shaped like Discord's
documented objects, records every call (JSON bodies and multipart uploads decoded), serves
attachment downloads, and can be told to fail a route (e.g. 429 with Retry-After).
Point discord.py at it by setting `discord.http.Route.BASE` to `api_base`.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

API_PREFIX = "/api/v10"
TIMESTAMP = "2025-01-01T12:00:00.000000+00:00"


@dataclass
class Call:
    method: str
    path: str  # after /api/v10 for API calls; the full path for downloads
    query: dict[str, str]
    json: Any
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # field -> (name, data)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    body: Any
    headers: dict[str, str]


def user_payload(user_id: int, username: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": username,
        "discriminator": "0",
        "global_name": username.title(),
        "avatar": None,
        "bot": bot,
    }


class FakeDiscordAPI:
    def __init__(self, *, application_id: int, bot_user_id: int) -> None:
        self.application_id = application_id
        self.bot_user = user_payload(bot_user_id, "atelier", bot=True)
        self.calls: list[Call] = []
        self.downloads: dict[str, bytes] = {}  # served at /attachments/<name>
        self.streamed: set[str] = set()  # served chunked, with no Content-Length
        self.bytes_served: dict[str, int] = {}  # how much of a streamed file went out
        self.streams_finished: set[str] = set()
        self.members: dict[tuple[int, int], dict[str, Any]] = {}
        self.channels: dict[int, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}  # channel messages as last answered
        self._failures: list[Failure] = []
        self._next_id = 1_300_000_000_000_000_000
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_base = self.base_url + API_PREFIX

    # Lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.close()

    def close(self) -> None:
        """Release the listening socket (also when the server never started)."""
        self._sock.close()

    # Test controls ---------------------------------------------------------------------

    def serve_file(self, name: str, data: bytes, *, stream: bool = False) -> str:
        """Serve `data` as a CDN attachment (`stream`: chunked, size unannounced); its URL."""
        self.downloads[name] = data
        if stream:
            self.streamed.add(name)
        return f"{self.base_url}/attachments/{name}"

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next call matching answers `status` with `body` (once)."""
        self._failures.append(
            Failure(method, re.compile(path_regex), status, body, dict(headers or {}))
        )

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def find(self, method: str, path_regex: str) -> list[Call]:
        pattern = re.compile(path_regex)
        return [c for c in self.calls if c.method == method and pattern.fullmatch(c.path)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until `predicate()` holds after some recorded call (a guard, not a timing)."""
        assert self._changed is not None

        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(_wait(), timeout)

    # Request handling ------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.path
        path = raw_path[len(API_PREFIX) :] if raw_path.startswith(API_PREFIX) else raw_path
        body, files = await _read_body(request)
        call = Call(request.method, path, dict(request.query), body, files, dict(request.headers))
        self.calls.append(call)
        try:
            for failure in self._failures:
                if failure.method == call.method and failure.pattern.fullmatch(path):
                    self._failures.remove(failure)
                    return _json(failure.body, status=failure.status, headers=failure.headers)
            name = path.removeprefix("/attachments/")
            if call.method == "GET" and name in self.streamed:
                return await self._stream(request, name)
            return self._answer(call)
        finally:
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()

    async def _stream(self, request: web.Request, name: str) -> web.StreamResponse:
        """Chunked download; stops counting when the client hangs up."""
        data = self.downloads[name]
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        self.bytes_served[name] = 0
        try:
            for start in range(0, len(data), 64 * 1024):
                await response.write(data[start : start + 64 * 1024])
                self.bytes_served[name] = start + len(data[start : start + 64 * 1024])
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading, as a size limit makes it do
        finally:
            self.streams_finished.add(name)
        return response

    def _answer(self, call: Call) -> web.StreamResponse:
        m, p = call.method, call.path
        if m == "GET" and (match := re.fullmatch(r"/attachments/(.+)", p)):
            data = self.downloads.get(match.group(1))
            if data is None:
                return web.Response(status=404, text="Not Found")
            return web.Response(body=data, content_type="application/octet-stream")
        if m == "GET" and p == "/users/@me":
            return _json(self.bot_user)
        if m == "GET" and p == "/oauth2/applications/@me":
            return _json(self._application())
        if m == "PUT" and re.fullmatch(r"/applications/\d+(/guilds/\d+)?/commands", p):
            return _json([self._registered(c, p) for c in call.json])
        if m == "POST" and re.fullmatch(r"/interactions/\d+/[^/]+/callback", p):
            return _json(self._callback(call))
        if match := re.fullmatch(r"/webhooks/(\d+)/([^/]+)(/messages/(@original|\d+))?", p):
            return self._webhook(call, match.group(3) is not None)
        if match := re.fullmatch(r"/channels/(\d+)/messages(/(\d+))?", p):
            channel_id = int(match.group(1))
            if m == "POST":
                return _json(self._message(call, channel_id))
            if m == "PATCH" and match.group(3):
                return _json(self._message(call, channel_id, int(match.group(3))))
        if m == "POST" and (match := re.fullmatch(r"/channels/(\d+)/messages/(\d+)/threads", p)):
            # A thread started from a message takes the message's id.
            parent, message_id = int(match.group(1)), int(match.group(2))
            thread = thread_payload(message_id, 0, parent, call.json["name"])
            thread.pop("guild_id")
            self.channels[message_id] = thread
            return _json(thread)
        if m == "GET" and (match := re.fullmatch(r"/channels/(\d+)", p)):
            channel = self.channels.get(int(match.group(1)))
            return _error(404, 10003, "Unknown Channel") if channel is None else _json(channel)
        if m == "GET" and (match := re.fullmatch(r"/guilds/(\d+)/members/(\d+)", p)):
            member = self.members.get((int(match.group(1)), int(match.group(2))))
            return _error(404, 10007, "Unknown Member") if member is None else _json(member)
        if m == "POST" and p == "/users/@me/channels":
            recipient = user_payload(int(call.json["recipient_id"]), "member")
            dm = {"id": str(self.new_id()), "type": 1, "last_message_id": None}
            return _json({**dm, "recipients": [recipient]})
        return _error(404, 0, f"fake Discord has no route for {m} {p}")

    def _application(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": "Atelier",
            "description": "",
            "icon": None,
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": user_payload(1, "owner"),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "summary": "",
        }

    def _registered(self, command: dict[str, Any], path: str) -> dict[str, Any]:
        guild = re.search(r"/guilds/(\d+)/", path)
        return {
            "id": str(self.new_id()),
            "application_id": str(self.application_id),
            "version": str(self.new_id()),
            "default_member_permissions": None,
            "dm_permission": False,
            "nsfw": False,
            "options": [],
            **({"guild_id": guild.group(1)} if guild else {}),
            **command,
        }

    def _callback(self, call: Call) -> dict[str, Any]:
        interaction_id = call.path.split("/")[2]
        data = (call.json or {}).get("data") or {}
        return {
            "interaction": {
                "id": interaction_id,
                "type": 2,
                "response_message_loading": call.json.get("type") == 5,
                "response_message_ephemeral": bool(data.get("flags", 0) & 64),
            },
            "resource": {"type": call.json.get("type")},
        }

    def _webhook(self, call: Call, existing: bool) -> web.StreamResponse:
        if call.method == "DELETE":
            return web.Response(status=204)
        payload = self._message(call, channel_id=0)
        payload["webhook_id"] = str(self.application_id)
        payload["application_id"] = str(self.application_id)
        if existing:
            payload["id"] = call.path.rsplit("/", 1)[1].replace("@original", "1")
        return _json(payload)

    def _message(
        self, call: Call, channel_id: int, message_id: int | None = None
    ) -> dict[str, Any]:
        body = call.json or {}
        attachments = [
            {
                "id": str(self.new_id()),
                "filename": name,
                "size": len(data),
                "url": f"{self.base_url}/attachments/{name}",
                "proxy_url": f"{self.base_url}/attachments/{name}",
            }
            for name, data in call.files.values()
        ]
        message = {
            "id": str(message_id or self.new_id()),
            "channel_id": str(channel_id),
            "author": self.bot_user,
            "content": body.get("content") or "",
            "timestamp": TIMESTAMP,
            "edited_timestamp": TIMESTAMP if message_id else None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": attachments,
            "embeds": body.get("embeds") or [],
            "pinned": False,
            "type": 0,
            "flags": body.get("flags") or 0,
        }
        if channel_id:
            self.messages[message["id"]] = message
        return message


async def _read_body(request: web.Request) -> tuple[Any, dict[str, tuple[str, bytes]]]:
    """JSON bodies as JSON; multipart as its payload_json plus the uploaded files."""
    if not request.can_read_body:
        return None, {}
    if request.content_type.startswith("multipart/"):
        payload: Any = None
        files: dict[str, tuple[str, bytes]] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            data = await part.read()  # type: ignore[union-attr]
            if part.name == "payload_json":  # type: ignore[union-attr]
                payload = json.loads(data)
            else:
                files[str(part.name)] = (str(part.filename), bytes(data))  # type: ignore[union-attr]
        return payload, files
    text = await request.text()
    if not text:
        return None, {}
    try:
        return json.loads(text), {}
    except json.JSONDecodeError:
        return text, {}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON with Discord's exact content type (discord.py compares it verbatim)."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={**(headers or {}), "Content-Type": "application/json"},
    )


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"message": message, "code": code}, status=status)


# Gateway payloads, shaped as in Discord's documentation -----------------------------------


def role_payload(role_id: int, name: str, position: int) -> dict[str, Any]:
    return {
        "id": str(role_id),
        "name": name,
        "color": 0,
        "hoist": False,
        "icon": None,
        "unicode_emoji": None,
        "position": position,
        "permissions": "0",
        "managed": False,
        "mentionable": False,
        "flags": 0,
    }


def text_channel_payload(channel_id: int, guild_id: int, name: str) -> dict[str, Any]:
    return {
        "id": str(channel_id),
        "type": 0,
        "guild_id": str(guild_id),
        "name": name,
        "position": 0,
        "permission_overwrites": [],
        "nsfw": False,
        "parent_id": None,
        "topic": None,
        "last_message_id": None,
        "rate_limit_per_user": 0,
        "flags": 0,
    }


def thread_payload(thread_id: int, guild_id: int, parent_id: int, name: str) -> dict[str, Any]:
    return {
        "id": str(thread_id),
        "type": 11,  # PUBLIC_THREAD
        "guild_id": str(guild_id),
        "parent_id": str(parent_id),
        "owner_id": "1",
        "name": name,
        "last_message_id": None,
        "message_count": 0,
        "member_count": 1,
        "rate_limit_per_user": 0,
        "flags": 0,
        "total_message_sent": 0,
        "thread_metadata": {
            "archived": False,
            "auto_archive_duration": 1440,
            "archive_timestamp": TIMESTAMP,
            "locked": False,
        },
    }


def member_payload(user: dict[str, Any], role_ids: list[int]) -> dict[str, Any]:
    return {
        "user": user,
        "nick": None,
        "avatar": None,
        "roles": [str(r) for r in role_ids],
        "joined_at": TIMESTAMP,
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "flags": 0,
        "pending": False,
        "communication_disabled_until": None,
    }


def guild_create_payload(
    guild_id: int,
    name: str,
    *,
    roles: list[dict[str, Any]],
    channels: list[dict[str, Any]],
    threads: list[dict[str, Any]],
) -> dict[str, Any]:
    """GUILD_CREATE: what the gateway sends for each guild (fills discord.py's cache)."""
    return {
        "id": str(guild_id),
        "name": name,
        "icon": None,
        "splash": None,
        "discovery_splash": None,
        "owner_id": "1",
        "afk_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "roles": [role_payload(guild_id, "@everyone", 0), *roles],
        "emojis": [],
        "stickers": [],
        "features": [],
        "mfa_level": 0,
        "system_channel_id": None,
        "system_channel_flags": 0,
        "rules_channel_id": None,
        "vanity_url_code": None,
        "description": None,
        "banner": None,
        "premium_tier": 0,
        "preferred_locale": "en-US",
        "public_updates_channel_id": None,
        "nsfw_level": 0,
        "premium_progress_bar_enabled": False,
        "joined_at": TIMESTAMP,
        "large": False,
        "unavailable": False,
        "member_count": 3,
        "voice_states": [],
        "members": [],
        "channels": channels,
        "threads": threads,
        "presences": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
    }


def attachment_payload(
    attachment_id: int, url: str, filename: str, size: int, content_type: str = "image/png"
) -> dict[str, Any]:
    return {
        "id": str(attachment_id),
        "filename": filename,
        "size": size,
        "url": url,
        "proxy_url": url,
        "content_type": content_type,
        "width": 64,
        "height": 64,
    }


def interaction_payload(
    *,
    interaction_id: int,
    application_id: int,
    guild_id: int,
    channel: dict[str, Any],
    member: dict[str, Any],
    command_id: int,
    name: str,
    options: list[dict[str, Any]],
    resolved: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """INTERACTION_CREATE for an APPLICATION_COMMAND (type 2) used in a guild channel."""
    data: dict[str, Any] = {
        "id": str(command_id),
        "name": name,
        "type": 1,  # CHAT_INPUT
        "guild_id": str(guild_id),
        "options": options,
    }
    if resolved is not None:
        data["resolved"] = resolved
    return {
        "id": str(interaction_id),
        "application_id": str(application_id),
        "type": 2,
        "data": data,
        "guild": {"id": str(guild_id), "locale": "en-US", "features": []},
        "guild_id": str(guild_id),
        "channel": channel,
        "channel_id": channel["id"],
        "member": {**member, "permissions": "2248473465835073"},
        "token": f"aW50ZXJhY3Rpb246{interaction_id}",
        "version": 1,
        "app_permissions": "2248473465835073",
        "locale": "en-GB",
        "guild_locale": "en-US",
        "entitlements": [],
        "authorizing_integration_owners": {"0": str(guild_id)},
        "context": 0,
        "attachment_size_limit": 10_485_760,
    }


def message_create_payload(
    *,
    message_id: int,
    channel_id: int,
    guild_id: int,
    member: dict[str, Any],
    content: str,
    attachments: list[dict[str, Any]],
) -> dict[str, Any]:
    """MESSAGE_CREATE: the author as `author` plus a partial `member` without `user`."""
    partial_member = {k: v for k, v in member.items() if k != "user"}
    return {
        "id": str(message_id),
        "channel_id": str(channel_id),
        "guild_id": str(guild_id),
        "author": member["user"],
        "member": partial_member,
        "content": content,
        "timestamp": TIMESTAMP,
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": attachments,
        "embeds": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
        "nonce": str(message_id),
    }


def reaction_payload(
    *,
    user_id: int,
    channel_id: int,
    message_id: int,
    guild_id: int,
    emoji: str,
    member: dict[str, Any] | None,
    message_author_id: int | None = None,
) -> dict[str, Any]:
    """MESSAGE_REACTION_ADD (with `member`) or MESSAGE_REACTION_REMOVE (without)."""
    payload: dict[str, Any] = {
        "user_id": str(user_id),
        "type": 0,
        "channel_id": str(channel_id),
        "message_id": str(message_id),
        "guild_id": str(guild_id),
        "emoji": {"id": None, "name": emoji},
        "burst": False,
        "burst_colors": [],
    }
    if member is not None:
        payload["member"] = member
    if message_author_id is not None:
        payload["message_author_id"] = str(message_author_id)
    return payload


# Harness: a logged-in client against the fake server ------------------------------------

APP_ID = 1_100_000_000_000_000_001  # the bot user's id is the application's id
GUILD_ID = 1_100_000_000_000_000_100
CHANNEL_ID = 1_100_000_000_000_000_200
THREAD_ID = 1_100_000_000_000_000_300
LEAD_ROLE_ID = 1_100_000_000_000_000_400
ARTIST_ROLE_ID = 1_100_000_000_000_000_401
LEAD_USER = user_payload(1_100_000_000_000_000_500, "lena")
ARTIST_USER = user_payload(1_100_000_000_000_000_501, "arno")
FAKE_TOKEN = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GaBcDe.fake-token-for-tests-only"


def patch_route_base(monkeypatch: Any, api: FakeDiscordAPI) -> None:
    """Send discord.py's REST calls (Route.BASE is read per call) to the fake server."""
    import discord.http

    monkeypatch.setattr(discord.http.Route, "BASE", api.api_base)


def studio_guild_create() -> dict[str, Any]:
    return guild_create_payload(
        GUILD_ID,
        "Studio",
        roles=[
            role_payload(LEAD_ROLE_ID, "Art Lead", 2),
            role_payload(ARTIST_ROLE_ID, "Artist", 1),
        ],
        channels=[text_channel_payload(CHANNEL_ID, GUILD_ID, "art")],
        threads=[thread_payload(THREAD_ID, GUILD_ID, CHANNEL_ID, "inkwash")],
    )


@dataclass
class RecordingHandler:
    """A CommandHandler that records what reached it, and where (which thread) it ran."""

    replies: Callable[[Any], list[Any]] = lambda _command: []
    reaction_replies: Callable[[Any], list[Any]] = lambda _reaction: []
    commands: list[Any] = field(default_factory=list)
    reactions: list[Any] = field(default_factory=list)
    thread_ids: list[int] = field(default_factory=list)
    before: Callable[[], Any] | None = None  # called first, e.g. to observe the fake server

    def handle(self, command: Any) -> list[Any]:
        import threading

        self.thread_ids.append(threading.get_ident())
        if self.before is not None:
            self.before()
        self.commands.append(command)
        return self.replies(command)

    def handle_reaction(self, reaction: Any) -> list[Any]:
        import threading

        self.thread_ids.append(threading.get_ident())
        self.reactions.append(reaction)
        return self.reaction_replies(reaction)


async def settle() -> None:
    """Wait for the work discord.py spawned for dispatched events and commands to finish."""
    current = asyncio.current_task()
    while pending := [
        task
        for task in asyncio.all_tasks()
        if task is not current
        and not task.done()
        and task.get_name().startswith(("CommandTree-invoker", "discord.py: "))
    ]:
        await asyncio.gather(*pending, return_exceptions=True)


@asynccontextmanager
async def connected(
    api: FakeDiscordAPI,
    handler: Any,
    *,
    guild_id: int | None = None,
    sync_commands: bool = False,
    cache_guild: bool = True,
) -> AsyncIterator[Any]:
    """Start the fake server and log an AtelierDiscordClient in to it (REST only, no gateway).

    Gateway events are then fed with `client._connection.parse_<event>(payload)`, the
    same call discord.py's websocket makes for each dispatch it receives.
    """
    from bot.discord.client import AtelierDiscordClient

    await api.start()
    client = AtelierDiscordClient(handler, guild_id=guild_id, sync_commands=sync_commands)
    # An exception in an event or command is only logged by discord.py: fail the test on it.
    errors: list[BaseException] = []

    async def event_error(_event: str, *_args: Any, **_kwargs: Any) -> None:
        errors.append(sys.exc_info()[1] or RuntimeError("unknown event error"))

    async def command_error(_interaction: Any, error: BaseException) -> None:
        errors.append(error)

    client.on_error = event_error  # type: ignore[method-assign]
    client.tree.on_error = command_error  # type: ignore[method-assign]
    try:
        await client.login(FAKE_TOKEN)
        if cache_guild:
            client._connection.parse_guild_create(studio_guild_create())
        yield client
        await settle()
        if errors:
            raise AssertionError(f"discord.py swallowed errors: {errors!r}") from errors[0]
    finally:
        await client.close()
        await api.stop()
