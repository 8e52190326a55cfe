"""The `atelier` command: one entry point for every process and chore."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.exc import OperationalError

from bot.doctor import add_parser as add_doctor_parser
from bot.doctor import run_doctor
from storage.db import Database, SchemaOutOfDate
from storage.settings import ConfigError, Settings, load_settings


def _db_upgrade(settings: Settings, _args: argparse.Namespace) -> int:
    db = Database(settings.database_url)
    db.upgrade()
    print(f"Database is at revision {db.current_revision()}.")
    return 0


def _db_check(settings: Settings, _args: argparse.Namespace) -> int:
    Database(settings.database_url).check_current()
    print("Database schema is current.")
    return 0


def _runner(runner_args: list[str]) -> int:
    # The runner lives in its own process with torch; the bot side never imports it.
    os.execv(sys.executable, [sys.executable, "-m", "gpu_runner", *runner_args])
    return 0  # not reached


def _bot(settings: Settings, args: argparse.Namespace) -> int:
    if args.platform == "console":
        from bot.console import main as console_main  # imported only when used

        return console_main(settings)
    if args.platform == "discord" and args.invite:
        from bot.discord.run import print_invite_url

        print_invite_url(settings)
        return 0
    return _serve_chat(settings, args.platform)


def _serve_chat(settings: Settings, platform: str) -> int:
    """Run the Discord or Slack bot: the command core, and outbox delivery beside it."""
    from bot.core import CommandCore
    from bot.delivery import MessageSender, OutboxDeliverer
    from bot.scheduler import build_scheduler
    from storage.blobs import BlobStore
    from storage.outbox import Outbox
    from storage.queue import JobQueue

    db = Database(settings.database_url)
    db.prepare(auto_migrate=settings.auto_migrate)
    blobs = BlobStore(settings.blob_dir, settings.max_blob_bytes)
    queue, outbox = JobQueue(db), Outbox(db)
    core = CommandCore(db, blobs, settings, queue, outbox)

    def background(sender: MessageSender):  # type: ignore[no-untyped-def]
        deliverer = OutboxDeliverer(outbox, blobs, sender, platform)
        return build_scheduler(deliverers=[deliverer], queue=queue, blobs=blobs, db=db)

    if platform == "discord":
        from bot.discord.run import run_discord

        run_discord(settings, core, background)
        return 0
    from bot.slack.run import run_slack

    return run_slack(settings, core, background)


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from bot.demo import main as demo_main  # imported only when used

    return demo_main(settings, data_dir=args.data_dir, steps=args.steps)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier", description="Train and use your team's image styles from chat."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    db.add_parser("upgrade", help="apply pending migrations").set_defaults(run=_db_upgrade)
    db.add_parser("check", help="fail unless the schema is current").set_defaults(run=_db_check)

    # Parsed by the runner itself (see main); listed here for --help.
    commands.add_parser("runner", help="run the GPU worker (claims and runs jobs)")

    bot = commands.add_parser("bot", help="run a chat front end")
    bot.add_argument("platform", choices=["console", "discord", "slack"])
    bot.add_argument(
        "--invite", action="store_true", help="discord: print the link that adds the bot"
    )
    bot.set_defaults(run=_bot)

    add_doctor_parser(commands)  # reports invalid settings itself, so main runs it before loading

    demo = commands.add_parser(
        "demo",
        help="the whole story on the built-in toy model (toy-sd15), on the CPU",
        description=(
            "Create a style, add 12 images, approve them as an art lead, train a LoRA, "
            "generate and export it, all on the CPU with the built-in toy-sd15; then write "
            "an HTML report. A second run reuses the style and its approved images and trains "
            "a new version."
        ),
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        help="the demo's own data folder (default: ATELIER_DATA_DIR/demo: ./atelier-data/demo)",
    )
    demo.add_argument(
        "--steps",
        type=_positive,
        help="training steps (default: a short run that shows the style)",
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["runner"]:
        # Everything after `runner` is the runner's own (its --help included).
        return _runner(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        return run_doctor(args)
    try:
        settings = load_settings()
        return int(args.run(settings, args))
    except (ConfigError, SchemaOutOfDate) as exc:
        print(exc, file=sys.stderr)
        return 2
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(
            f"Cannot use the database ({reason}). Check ATELIER_DATABASE_URL and that the "
            "server is running; `atelier doctor` checks the whole set-up.",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
