"""Run the Slack front end: Socket Mode when an app token is set, else HTTP request mode."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_bolt.error import BoltError
from slack_sdk import WebClient

from bot.commands import CommandHandler, TextParser
from bot.delivery import DelivererFactory
from bot.slack.app import build_slack_app
from bot.slack.http import SlackHttpServer
from bot.slack.sender import SlackSender
from storage.settings import ConfigError, Settings

log = logging.getLogger(__name__)


class SlackBot:
    """The Slack front end's parts, started and stopped together (see `run_slack`)."""

    def __init__(
        self,
        settings: Settings,
        handler: CommandHandler,
        deliverer_factory: DelivererFactory,
        *,
        text_parser: TextParser | None = None,
        http_host: str = "0.0.0.0",
        http_port: int = 3000,
        http_path: str = "/slack/events",
        base_url: str = WebClient.BASE_URL,
        workers: int = 8,
    ) -> None:
        bot_token = _secret(settings.slack_bot_token)
        app_token = _secret(settings.slack_app_token)
        signing_secret = _secret(settings.slack_signing_secret)
        if not bot_token:
            raise ConfigError(
                "ATELIER_SLACK_BOT_TOKEN is not set; copy the Bot User OAuth Token (xoxb-...) "
                "from your Slack app's OAuth & Permissions page."
            )
        if app_token and not app_token.startswith("xapp-"):
            raise ConfigError(
                "ATELIER_SLACK_APP_TOKEN must be an app-level token starting with xapp- "
                "(Basic Information > App-Level Tokens, scope connections:write)."
            )
        if not app_token and not signing_secret:
            raise ConfigError(
                "ATELIER_SLACK_SIGNING_SECRET is not set; HTTP mode needs it (Basic Information "
                "> App Credentials), or set ATELIER_SLACK_APP_TOKEN to use Socket Mode."
            )
        parser = text_parser or getattr(handler, "text_parser", None)
        if parser is None:
            raise TypeError("run_slack needs a text_parser (or a handler with .text_parser).")

        self.socket_mode = bool(app_token)
        self._app_token = app_token
        self._http = (http_host, http_port, http_path)
        self._stopped = threading.Event()
        self._socket: SocketModeHandler | None = None
        self._server: SlackHttpServer | None = None
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="slack-work")
        self.client = WebClient(token=bot_token, base_url=base_url)
        try:
            self.app = build_slack_app(
                handler,
                parser,
                client=self.client,
                signing_secret=signing_secret,
                lead_groups=[settings.slack_lead_group] if settings.slack_lead_group else [],
                executor=self._executor,
            )
        except BoltError as exc:
            raise ConfigError(
                f"Slack did not accept ATELIER_SLACK_BOT_TOKEN ({_reason(exc)}); copy the bot "
                "token again and check the app is installed in the workspace."
            ) from None
        except OSError as exc:  # URLError, timeouts: auth.test never got an answer
            raise ConfigError(
                f"Could not reach Slack at {base_url} ({exc}); check the network and try again."
            ) from None
        self.deliverer = deliverer_factory(SlackSender(self.client))

    @property
    def http_address(self) -> tuple[str, int]:
        """Where HTTP mode listens (the real port once started, if 0 was asked for)."""
        if self._server is None:
            return self._http[0], self._http[1]
        return self._server.address

    def start(self) -> None:
        self.deliverer.start()
        if self.socket_mode:
            self._socket = SocketModeHandler(self.app, self._app_token)
            self._socket.connect()
            log.info("Slack front end connected in Socket Mode.")
            return
        host, port, path = self._http
        self._server = SlackHttpServer(self.app, host=host, port=port, path=path)
        self._server.start()
        shown_host, shown_port = self.http_address
        log.info("Slack front end listening on http://%s:%d%s", shown_host, shown_port, path)

    def wait(self) -> None:
        self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()
        if self._socket is not None:
            self._socket.close()
        if self._server is not None:
            self._server.stop()
        self.deliverer.shutdown()
        self._executor.shutdown(wait=True)


def run_slack(
    settings: Settings,
    handler: CommandHandler,
    deliverer_factory: DelivererFactory,
    *,
    text_parser: TextParser | None = None,
    http_port: int = 3000,
    http_path: str = "/slack/events",
) -> int:
    """Run until interrupted. `handler` is the command core (its `.text_parser` is used
    unless one is given); `deliverer_factory(sender)` builds the outbox deliverer for
    Slack. Raises ConfigError (one line, no secrets) when the settings cannot work."""
    bot = SlackBot(
        settings,
        handler,
        deliverer_factory,
        text_parser=text_parser,
        http_port=http_port,
        http_path=http_path,
    )
    bot.start()
    try:
        bot.wait()
    except KeyboardInterrupt:
        log.info("Stopping the Slack front end.")
    finally:
        bot.stop()
    return 0


def _secret(value: Any) -> str:
    return value.get_secret_value() if value is not None else ""


def _reason(exc: BoltError) -> str:
    text = str(exc)
    for code in ("invalid_auth", "not_authed", "account_inactive", "token_revoked"):
        if code in text:
            return code
    return "auth.test failed"
