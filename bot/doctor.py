"""`atelier doctor`: what is set up and what is not, one line each, with the fix for each problem.

    ✓ set up   ✗ a problem (the line below says how to fix it)   – not set up or skipped

The bot's half (settings, data directory, database, migrations, chat tokens) runs here. The
runner's half (torch, device, base models) runs as `python -m gpu_runner.doctor --json` in a
subprocess, so this process never imports torch, and it is skipped where torch is not installed
(the bot's container). Secrets are never printed: every configured secret is masked in the
output, whatever a library put in an error message.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from storage.db import MIGRATIONS_DIR
from storage.settings import ENV_PREFIX, ConfigError, Settings, load_settings

Status = Literal["ok", "fail", "skip"]
Component = Literal["bot", "runner", "all"]
Platform = Literal["discord", "slack"]

SYMBOLS: dict[Status, str] = {"ok": "✓", "fail": "✗", "skip": "–"}
ASCII_SYMBOLS: dict[Status, str] = {"ok": "+", "fail": "x", "skip": "-"}
# ATELIER_* names that are read, but not as Settings: anything else with the prefix is a typo.
OTHER_ENV_VARS: dict[str, str] = {
    "ATELIER_PLATFORM": "docker-compose.yml: the bot service's chat platform (discord or slack)",
    "ATELIER_DTYPE": "the runner's precision: auto, fp32, fp16 or bf16 (gpu_runner/devices.py)",
    "ATELIER_TORCH": "install.sh: the torch requirement to install",
    "ATELIER_TEST_POSTGRES_URL": "the tests' PostgreSQL server",
}
DB_CONNECT_TIMEOUT_S = 5
RUNNER_TIMEOUT_S = 300
RUNNER_LOAD_TIMEOUT_S = 3600
DISCORD_PORTAL = "https://discord.com/developers/applications"
SLACK_APPS = "https://api.slack.com/apps"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class DoctorOptions:
    component: Component = "all"
    platform: Platform | None = None  # a platform named here must be fully set up
    load_models: bool = False


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # masked wherever the report is shown

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if check.status == "fail"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# --- settings ---------------------------------------------------------------------------


def _secret(value: object) -> str:
    getter = getattr(value, "get_secret_value", None)
    return str(getter()).strip() if getter else ""


def secret_field_names() -> list[str]:
    return [
        name for name, info in Settings.model_fields.items() if "SecretStr" in str(info.annotation)
    ]


def secrets_to_mask(settings: Settings | None, dotenv: dict[str, str | None]) -> list[str]:
    """Every secret value this run could see: from settings, the environment and .env."""
    values: list[str] = []
    for name in secret_field_names():
        env_name = f"{ENV_PREFIX}{name.upper()}"
        values += [os.environ.get(env_name, ""), dotenv.get(env_name) or ""]
        if settings is not None:
            values.append(_secret(getattr(settings, name)))
    urls = [os.environ.get(f"{ENV_PREFIX}DATABASE_URL", ""), dotenv.get("ATELIER_DATABASE_URL")]
    if settings is not None:
        urls.append(settings.database_url)
    for url in urls:
        try:
            password = make_url(url).password if url else None
        except Exception:  # not a URL: nothing to mask in it
            password = None
        if password:
            values.append(str(password))
    # Longest first, so a secret that contains another is masked whole.
    return sorted({v.strip() for v in values if len(v.strip()) >= 4}, key=len, reverse=True)


def mask(text_: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text_ = text_.replace(secret, "****")
    return text_


def read_dotenv(path: Path = Path(".env")) -> dict[str, str | None]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values  # pydantic-settings reads .env with python-dotenv too

    return dict(dotenv_values(path))


def settings_check(dotenv_path: Path) -> tuple[Check, Settings | None]:
    if dotenv_path.is_file():
        source = f"from the environment and {dotenv_path.resolve()}"
    else:
        source = f"from the environment; no .env in {Path.cwd()}"
    try:
        settings = load_settings()
    except ConfigError as exc:
        lines = str(exc).splitlines()
        problems = "; ".join(line.strip() for line in lines[1:] if line.startswith("  "))
        return (
            Check(
                "settings",
                "fail",
                f"not valid: {problems or lines[0]}",
                "set each variable named here in .env or the environment (see .env.example)",
            ),
            None,
        )
    return Check("settings", "ok", f"valid ({source})"), settings


def unknown_variables_check(dotenv: dict[str, str | None]) -> Check | None:
    """ATELIER_* names that nothing reads: usually a typo, silently ignored otherwise."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | set(OTHER_ENV_VARS)
    seen = {name for name in [*os.environ, *dotenv] if name.upper().startswith(ENV_PREFIX)}
    unknown = sorted(name for name in seen if name.upper() not in known)
    if not unknown:
        return None
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        described.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return Check(
        "unknown variables",
        "skip",
        "ignored, Atelier does not read: " + ", ".join(described),
    )


def default_base_model_check(settings: Settings) -> Check:
    from bot.core.policy import known_base_models

    known = sorted(known_base_models(settings))
    if settings.default_base_model in known:
        return Check("default base model", "ok", settings.default_base_model)
    return Check(
        "default base model",
        "fail",
        f"ATELIER_DEFAULT_BASE_MODEL is '{settings.default_base_model}', which is not a "
        f"configured base model ({', '.join(known)})",
        "set ATELIER_DEFAULT_BASE_MODEL to one of those, or add it to ATELIER_BASE_MODELS",
    )


# --- data directory -----------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def _writable(folder: Path) -> str | None:
    """None when a file can be created in the folder, else why not."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".atelier-doctor-"):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def data_dir_check(data_dir: Path) -> Check:
    shown = data_dir.expanduser().absolute()
    fix_where = "or point ATELIER_DATA_DIR at a writable directory"
    if shown.exists() and not shown.is_dir():
        return Check(
            "data directory",
            "fail",
            f"{shown} is a file, not a directory",
            "point ATELIER_DATA_DIR at a directory (or move that file away)",
        )
    if not shown.exists():
        parent = _nearest_existing(shown)
        if not parent.is_dir():
            return Check(
                "data directory",
                "fail",
                f"{shown} cannot be created: {parent} is a file",
                f"move {parent} away, {fix_where}",
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            return Check(
                "data directory",
                "fail",
                f"{shown} does not exist and cannot be created in {parent}",
                f"create it and make it writable for this user, {fix_where}",
            )
        return Check(
            "data directory", "ok", f"{shown} does not exist yet; Atelier creates it at start"
        )
    for folder in (shown, shown / "blobs"):
        if folder.is_dir() and (why := _writable(folder)):
            return Check(
                "data directory",
                "fail",
                f"{folder} is not writable ({why})",
                f"make it writable for the user running Atelier (chown/chmod), {fix_where}",
            )
    free = shutil.disk_usage(shown).free / 1024**3
    return Check("data directory", "ok", f"{shown} is writable ({free:.1f} GiB free)")


# --- database and migrations --------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    return lines[0] if lines else type(original).__name__


def database_checks(database_url: str, *, auto_migrate: bool = True) -> list[Check]:
    """Whether the database answers, and whether its schema matches this code."""
    url: URL = make_url(database_url)
    shown = url.render_as_string(hide_password=True)
    skipped = Check("migrations", "skip", "skipped: no database to check")
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite and url.database and url.database != ":memory:":
        path = Path(url.database)
        if path.parent.exists() and not path.parent.is_dir():
            return [
                Check(
                    "database",
                    "fail",
                    f"SQLite file {path.absolute()} cannot exist: {path.parent} is not a folder",
                    "point ATELIER_DATA_DIR (or ATELIER_DATABASE_URL) at a directory",
                ),
                skipped,
            ]
        if path.exists() and not path.is_file():
            return [
                Check(
                    "database",
                    "fail",
                    f"SQLite file {path.absolute()} is not a file",
                    "move it away, or point ATELIER_DATABASE_URL at a file",
                ),
                skipped,
            ]
        if not path.exists():
            # A first start creates it, unless migrations are left to people.
            if auto_migrate:
                detail = f"no SQLite file yet at {path.absolute()}; the first start creates it"
                return [Check("database", "skip", detail), skipped]
            return [
                Check(
                    "database",
                    "fail",
                    f"no SQLite file at {path.absolute()} (and ATELIER_AUTO_MIGRATE=false)",
                    "run `atelier db upgrade` to create it",
                ),
                skipped,
            ]
    connect_args = {} if is_sqlite else {"connect_timeout": DB_CONNECT_TIMEOUT_S}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        fix = (
            "check the file is an Atelier database and readable, or remove it and run "
            "`atelier db upgrade`"
            if is_sqlite
            else "check PostgreSQL is running and ATELIER_DATABASE_URL's host, port, user, "
            "password and database (with docker compose: `docker compose --profile postgres "
            "up -d`)"
        )
        return [Check("database", "fail", f"{shown}: {_first_line(exc)}", fix), skipped]
    finally:
        engine.dispose()
    return [Check("database", "ok", f"{shown} answers"), migrations_check(current)]


def migrations_check(current: str | None) -> Check:
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    if current == head:
        return Check("migrations", "ok", f"the schema is current (revision {head})")
    upgrade = "run `atelier db upgrade`"
    if current is None:
        return Check("migrations", "fail", "the database has no Atelier schema yet", upgrade)
    try:
        script.get_revision(current)
    except CommandError:
        return Check(
            "migrations",
            "fail",
            f"the database is at revision {current}, which this Atelier does not know (a newer "
            "version wrote it)",
            "update Atelier to the version that wrote it; do not downgrade the database",
        )
    return Check(
        "migrations",
        "fail",
        f"the schema is at revision {current}; this Atelier needs {head}",
        upgrade,
    )


# --- chat platforms ---------------------------------------------------------------------


def _discord_token_problem(token: str) -> str | None:
    from bot.discord.run import application_id_from_token

    parts = token.split(".")
    try:
        if len(parts) != 3 or not all(parts):
            raise ConfigError("not three parts")
        application_id_from_token(token)
    except ConfigError:
        hint = " (it looks like a Slack token)" if token.startswith("xox") else ""
        return f"ATELIER_DISCORD_TOKEN does not look like a Discord bot token{hint}"
    return None


def discord_checks(settings: Settings, *, required: bool) -> list[Check]:
    token = _secret(settings.discord_token)
    if not token:
        return [
            Check(
                "discord",
                "fail" if required else "skip",
                "not set up (ATELIER_DISCORD_TOKEN is not set)",
                f"create a bot at {DISCORD_PORTAL} and put its token in .env as "
                "ATELIER_DISCORD_TOKEN=..."
                if required
                else "",
            )
        ]
    problem = _discord_token_problem(token)
    if problem:
        return [
            Check(
                "discord",
                "fail",
                problem,
                f"copy the bot token again from {DISCORD_PORTAL} (Bot > Reset Token) into "
                "ATELIER_DISCORD_TOKEN",
            )
        ]
    from bot.discord.run import application_id_from_token

    where = (
        f", commands synced to server {settings.discord_guild_id}"
        if settings.discord_guild_id
        else ""
    )
    checks = [
        Check(
            "discord",
            "ok",
            f"bot token present (application {application_id_from_token(token)}){where}",
        )
    ]
    if settings.discord_lead_roles:
        roles = ", ".join(settings.discord_lead_roles)
        checks.append(Check("discord art leads", "ok", f"roles {roles}"))
    else:
        checks.append(
            Check(
                "discord art leads",
                "skip",
                "none: nobody can approve datasets yet (set ATELIER_DISCORD_LEAD_ROLES to role "
                "names or ids)",
            )
        )
    return checks


def slack_checks(settings: Settings, *, required: bool) -> list[Check]:
    bot_token = _secret(settings.slack_bot_token)
    app_token = _secret(settings.slack_app_token)
    signing = _secret(settings.slack_signing_secret)
    if not (bot_token or app_token or signing or required):
        return [Check("slack", "skip", "not set up (no ATELIER_SLACK_* tokens are set)")]
    checks: list[Check] = []
    if not bot_token:
        checks.append(
            Check(
                "slack bot token",
                "fail",
                "ATELIER_SLACK_BOT_TOKEN is not set",
                f"install the app ({SLACK_APPS}, from bot/slack/manifest.yaml) and copy its Bot "
                "User OAuth Token (xoxb-...) from OAuth & Permissions",
            )
        )
    elif not bot_token.startswith("xoxb-"):
        checks.append(
            Check(
                "slack bot token",
                "fail",
                "ATELIER_SLACK_BOT_TOKEN does not start with xoxb-, so it is not a bot token",
                "copy the Bot User OAuth Token (xoxb-...) from OAuth & Permissions",
            )
        )
    else:
        checks.append(Check("slack bot token", "ok", "present (xoxb-...)"))
    if app_token and not app_token.startswith("xapp-"):
        checks.append(
            Check(
                "slack connection",
                "fail",
                "ATELIER_SLACK_APP_TOKEN does not start with xapp-, so it is not an app-level "
                "token",
                "create one under Basic Information > App-Level Tokens (scope connections:write)",
            )
        )
    elif app_token:
        checks.append(Check("slack connection", "ok", "Socket Mode (app-level token present)"))
    elif signing:
        checks.append(
            Check(
                "slack connection",
                "ok",
                "HTTP mode: Slack must reach this bot at https://<your host>/slack/events "
                "(port 3000)",
            )
        )
    else:
        checks.append(
            Check(
                "slack connection",
                "fail",
                "neither ATELIER_SLACK_APP_TOKEN (Socket Mode) nor ATELIER_SLACK_SIGNING_SECRET "
                "(HTTP mode) is set",
                "set ATELIER_SLACK_APP_TOKEN=xapp-... (no public URL needed), or "
                "ATELIER_SLACK_SIGNING_SECRET from Basic Information > App Credentials",
            )
        )
    if settings.slack_lead_users or settings.slack_lead_group:
        who = [*settings.slack_lead_users, *filter(None, [settings.slack_lead_group])]
        checks.append(Check("slack art leads", "ok", ", ".join(who)))
    else:
        checks.append(
            Check(
                "slack art leads",
                "skip",
                "none: nobody can approve datasets yet (set ATELIER_SLACK_LEAD_USERS to user ids "
                "or ATELIER_SLACK_LEAD_GROUP to a user group id)",
            )
        )
    return checks


# --- the runner's half (subprocess) -------------------------------------------------------


def runner_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "gpu_runner"))


def runner_checks(options: DoctorOptions) -> list[Check]:
    if not runner_installed():
        if options.component == "runner":
            return [
                Check(
                    "runner",
                    "fail",
                    "torch is not installed here, so the runner cannot run in this environment",
                    "install the runner extra (./install.sh), or run this in the runner's "
                    "container: `docker compose exec runner atelier doctor`",
                )
            ]
        return [
            Check(
                "runner",
                "skip",
                "skipped: torch is not installed here (as in the bot's container); check the "
                "runner where it runs: `docker compose exec runner atelier doctor`",
            )
        ]
    command = [sys.executable, "-m", "gpu_runner.doctor", "--json"]
    if options.load_models:
        command.append("--load-models")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    timeout = RUNNER_LOAD_TIMEOUT_S if options.load_models else RUNNER_TIMEOUT_S
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return [Check("runner", "fail", f"its checks did not finish in {timeout} s", "")]
    for line in reversed(done.stdout.splitlines()):
        try:
            data = json.loads(line)
            return [Check(**item) for item in data["checks"]]
        except (ValueError, KeyError, TypeError):
            continue
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    return [
        Check(
            "runner",
            "fail",
            f"its checks crashed: {errors[-1] if errors else f'exit status {done.returncode}'}",
            "run `python -m gpu_runner.doctor` to see the whole error",
        )
    ]


# --- putting it together ------------------------------------------------------------------


def run_checks(options: DoctorOptions, dotenv_path: Path = Path(".env")) -> DoctorReport:
    report = DoctorReport()
    dotenv = read_dotenv(dotenv_path)
    check, settings = settings_check(dotenv_path)
    report.checks.append(check)
    report.secrets = secrets_to_mask(settings, dotenv)
    if unknown := unknown_variables_check(dotenv):
        report.checks.append(unknown)
    if settings is None:
        report.checks.append(
            Check("everything else", "skip", "skipped until the settings are valid")
        )
        return report
    report.checks.append(data_dir_check(settings.data_dir))
    report.checks += database_checks(settings.database_url, auto_migrate=settings.auto_migrate)
    if options.component in ("bot", "all"):
        report.checks.append(default_base_model_check(settings))
        report.checks += discord_checks(settings, required=options.platform == "discord")
        report.checks += slack_checks(settings, required=options.platform == "slack")
    if options.component in ("runner", "all"):
        report.checks += runner_checks(options)
    return report


def _symbols(stream: TextIO) -> dict[Status, str]:
    try:
        "".join(SYMBOLS.values()).encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return ASCII_SYMBOLS
    return SYMBOLS


def render(report: DoctorReport, symbols: dict[Status, str] = SYMBOLS) -> str:
    lines = []
    for check in report.checks:
        lines.append(f"{symbols[check.status]} {check.name}: {check.detail}")
        if check.status == "fail" and check.fix:
            lines.append(f"    fix: {check.fix}")
    count = len(report.failed)
    lines.append("No problems found." if not count else f"{count} problem(s) to fix (above).")
    return "\n".join(lines)


def doctor(options: DoctorOptions, out: TextIO | None = None) -> int:
    """Run the checks, print one line each (secrets masked) and return the exit code."""
    stream = out or sys.stdout
    report = run_checks(options)
    print(mask(render(report, _symbols(stream)), report.secrets), file=stream)
    return report.exit_code


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser("doctor", help="check the set-up and say how to fix what is not")
    parser.add_argument(
        "--component",
        choices=["bot", "runner", "all"],
        default="all",
        help="check what the bot needs, what the runner needs, or both (default)",
    )
    parser.add_argument(
        "--platform",
        choices=["discord", "slack"],
        help="fail unless this chat platform is fully set up",
    )
    parser.add_argument(
        "--load-models", action="store_true", help="also load every base model (slow)"
    )


def run_doctor(args: argparse.Namespace) -> int:
    return doctor(
        DoctorOptions(
            component=args.component, platform=args.platform, load_models=args.load_models
        )
    )
