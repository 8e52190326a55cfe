"""The slack_bolt App: listeners that ack at once and hand the work to the command core."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from slack_bolt import Ack, App, BoltRequest, BoltResponse
from slack_bolt.context.respond import Respond
from slack_bolt.middleware import Middleware
from slack_sdk import WebClient

from bot.commands import CommandHandler, Reply, TextParser
from bot.slack import translate
from bot.slack.dedupe import RecentIds
from bot.slack.files import SlackFiles
from bot.slack.replies import ReplyPoster
from bot.slack.roles import GroupRoles

log = logging.getLogger(__name__)

INTERNAL_ERROR = (
    "Atelier hit an internal error and did nothing; try again, and tell your admin if it repeats."
)


def build_slack_app(
    handler: CommandHandler,
    text_parser: TextParser,
    *,
    client: WebClient,
    signing_secret: str | None,
    lead_groups: Sequence[str] = (),
    executor: Executor | None = None,
    roles: GroupRoles | None = None,
    recent: RecentIds | None = None,
) -> App:
    """A bolt App whose listeners ack first and run the core on `executor` afterwards.

    `client` carries the bot token (and `base_url` in tests); bolt calls auth.test on it
    once here. `signing_secret` verifies HTTP requests; pass None only for Socket Mode,
    where Slack's websocket is the authentication (HTTP requests then always fail).
    """
    work = executor or ThreadPoolExecutor(8, thread_name_prefix="slack-work")
    app = App(
        name="atelier",
        client=client,
        # Unknown random secret when absent, so no HTTP request can ever verify.
        signing_secret=signing_secret or secrets.token_hex(32),
        # Listeners run inline in the request thread: each acks, hands the work to
        # `work` and returns, so the HTTP answer (the ack) goes out at once.
        process_before_response=True,
        listener_executor=work,
    )
    listeners = SlackListeners(
        handler,
        text_parser,
        executor=work,
        roles=roles or GroupRoles(client, lead_groups),
        files=SlackFiles(client),
        poster=ReplyPoster(client),
        recent=recent or RecentIds(),
    )
    listeners.register(app)
    return app


def _ack(ack: Ack) -> None:
    ack()


class RedeliveryGuard(Middleware):
    """Slack retries (X-Slack-Retry-Num) repeat the same event_id: ack them, do nothing.

    The fast path in memory; the core's stored event-id guard catches a retry that comes
    after a restart.
    """

    def __init__(self, recent: RecentIds) -> None:
        self._recent = recent

    def process(
        self, *, req: BoltRequest, resp: BoltResponse, next: Callable[[], BoltResponse]
    ) -> BoltResponse | None:
        key = translate.delivery_id(req.body)
        if key is None or self._recent.first_time(key):
            return next()
        log.info("Acked a repeated Slack delivery (%s) without running it again.", key)
        return BoltResponse(status=200, body="")


class SlackListeners:
    """Bolt listeners: ack, then (on the executor) translate, call the core, reply.

    Handing the work to our executor directly (rather than bolt's lazy listeners, which
    deep-copy and re-parse each request) keeps the ack path to well under a millisecond.
    """

    def __init__(
        self,
        handler: CommandHandler,
        text_parser: TextParser,
        *,
        executor: Executor,
        roles: GroupRoles,
        files: SlackFiles,
        poster: ReplyPoster,
        recent: RecentIds,
    ) -> None:
        self._handler = handler
        self._parser = text_parser
        self._executor = executor
        self._roles = roles
        self._files = files
        self._poster = poster
        self._recent = recent

    def register(self, app: App) -> None:
        app.use(RedeliveryGuard(self._recent))
        for name in translate.SLASH_COMMANDS:
            app.command(name)(self._on_command)
        # First match wins: the work listener, then a plain ack for every other message /
        # reaction (an unhandled event would get a 404 and Slack would retry it).
        app.event("message", matchers=[_thread_upload])(self._on_upload)
        app.event("message")(_ack)
        for kind in ("reaction_added", "reaction_removed"):
            app.event(kind, matchers=[_known_reaction])(self._on_reaction)
            app.event(kind)(_ack)
        # Buttons under results (block_actions) and the edit form's submit (view_submission).
        app.action(_ATELIER_ID)(self._on_action)
        app.view(_ATELIER_ID)(self._on_view)

    # -- the ack path ---------------------------------------------------------------------

    def _on_command(self, ack: Ack, body: dict[str, Any], respond: Respond) -> None:
        ack()
        self._later(self._run_command, body, respond)

    def _on_upload(self, ack: Ack, body: dict[str, Any]) -> None:
        ack()
        self._later(self._run_upload, body)

    def _on_reaction(self, ack: Ack, body: dict[str, Any]) -> None:
        ack()
        self._later(self._run_reaction, body)

    def _on_action(self, ack: Ack, body: dict[str, Any]) -> None:
        ack()
        self._later(self._run_press, body)

    def _on_view(self, ack: Ack, body: dict[str, Any]) -> None:
        ack()  # closes the modal; what it queued is said in the channel
        self._later(self._run_view, body)

    def _later(self, work: Callable[..., None], *args: Any) -> None:
        self._executor.submit(_logged, work, *args)

    # -- the work (after the ack) -----------------------------------------------------------

    def _run_command(self, body: dict[str, Any], respond: Respond) -> None:
        channel = str(body["channel_id"])
        if self._open_command_form(body):
            return
        try:
            parsed = translate.parse_slash(body, self._parser)
        except Exception as exc:  # the parser's message says what was wrong and the form
            respond(text=str(exc), response_type="ephemeral")
            return
        replies = self._call(
            lambda: self._handler.handle(
                translate.slash_command(body, parsed, self._roles.roles_for(str(body["user_id"])))
            )
        )
        self._poster.answer_command(respond, channel, replies)

    def _open_command_form(self, body: dict[str, Any]) -> bool:
        """A bare `/imagine` or `/style train` opens its form, with pick lists for styles,
        presets, methods and base models, where the core has one for it."""
        name = translate.form_request(body)
        if name is None:
            return False
        try:
            form = self._handler.command_form(translate.team_of(body), name)
        except Exception:
            log.exception("Could not build the form for /%s.", name)
            return False
        if form is None:
            return False
        # trigger_id is valid for 3 s after the command: this runs right after the ack.
        self._poster.open_form(str(body["trigger_id"]), form, str(body["channel_id"]), None)
        return True

    def _run_upload(self, body: dict[str, Any]) -> None:
        event = body["event"]
        user = str(event["user"])

        def handle() -> list[Reply]:
            files = [self._files.incoming(f) for f in event["files"]]
            roles = self._roles.roles_for(user)
            command = translate.thread_upload(body, files, roles, self._parser)
            return self._handler.handle(command)

        replies = self._call(handle)
        self._poster.answer_event(str(event["channel"]), user, str(event["thread_ts"]), replies)

    def _run_reaction(self, body: dict[str, Any]) -> None:
        event = body["event"]
        user = str(event["user"])
        replies = self._call(
            lambda: self._handler.handle_reaction(
                translate.reaction(body, self._roles.roles_for(user))
            )
        )
        item = event["item"]
        self._poster.answer_event(str(item["channel"]), user, str(item["ts"]), replies)

    def _run_press(self, body: dict[str, Any]) -> None:
        user = str((body.get("user") or {}).get("id") or "")
        press = translate.block_press(body, self._roles.roles_for(user))
        replies = self._call(lambda: self._handler.handle_press(press))
        form = next((r.form for r in replies if r.form is not None), None)
        if form is not None:
            # trigger_id is valid for 3 s after the press: open the modal first.
            self._poster.open_form(str(body["trigger_id"]), form, press.channel, press.thread)
            replies = [r for r in replies if r.form is None]
        self._poster.answer_event(press.channel, user, press.thread, replies)

    def _run_view(self, body: dict[str, Any]) -> None:
        user = str((body.get("user") or {}).get("id") or "")
        roles = self._roles.roles_for(user)
        if translate.is_command_form(body):
            command = translate.view_command(body, roles)
            replies = self._call(lambda: self._handler.handle(command))
            self._poster.answer_event(command.channel, user, command.thread, replies)
            return
        press = translate.view_press(body, roles)
        replies = self._call(lambda: self._handler.handle_press(press))
        self._poster.answer_event(press.channel, user, press.thread, replies)

    @staticmethod
    def _call(work: Callable[[], list[Reply]]) -> list[Reply]:
        try:
            return work()
        except Exception:
            log.exception("The command core failed on a Slack request.")
            return [Reply(INTERNAL_ERROR, private=True)]


def _logged(work: Callable[..., None], *args: Any) -> None:
    try:
        work(*args)
    except Exception:
        log.exception("Handling a Slack request failed after its ack.")


_ATELIER_ID = re.compile("^" + re.escape(translate.BUTTON_PREFIX))


def _thread_upload(event: Mapping[str, Any]) -> bool:
    return translate.is_thread_upload(event)


def _known_reaction(event: Mapping[str, Any]) -> bool:
    return translate.is_known_reaction(event)
