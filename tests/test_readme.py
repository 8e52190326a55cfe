"""The README only shows commands, flags, settings and files that exist, and CI runs its
set-up, test and demo lines exactly as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import build_parser
from bot.doctor import OTHER_ENV_VARS
from storage.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")

SETUP, DEMO = "./install.sh", ".venv/bin/atelier demo"
TESTS = ".venv/bin/python -m pytest -n auto --maxprocesses 4 --dist loadfile"


def _code_lines() -> list[str]:
    """Lines of the README's ```bash blocks, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def _atelier_commands() -> list[list[str]]:
    """Every `atelier ...` the README shows, in code blocks or inline code, as argv."""
    found = [line for line in _code_lines() if line.startswith(".venv/bin/atelier ")]
    found += re.findall(r"`((?:\.venv/bin/)?atelier [^`]+)`", README)
    return [shlex.split(command)[1:] for command in found]


def test_ci_runs_the_readme_lines_exactly() -> None:
    lines = _code_lines()
    for line in (SETUP, TESTS, DEMO):
        assert line in lines, f"README lost its line {line!r}"
    ci = [line.strip() for line in CI.splitlines() if line.strip() and not line.startswith("#")]
    runs = [line for line in ci if line in (SETUP, TESTS, DEMO)]
    assert runs == [SETUP, TESTS, DEMO]  # in that order: the demo after the tests


def test_every_shell_command_is_one_ci_runs_or_atelier() -> None:
    for line in _code_lines():
        assert line in (SETUP, TESTS) or line.startswith(".venv/bin/atelier "), line


def test_every_atelier_command_parses_with_the_real_cli() -> None:
    commands = _atelier_commands()
    assert {argv[0] for argv in commands} >= {"demo", "doctor", "bot", "db", "runner"}
    parser = build_parser()
    for argv in commands:
        if argv[0] == "runner":
            continue  # parsed by the runner itself: checked against its --help below
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README shows `atelier {' '.join(argv)}`, which atelier rejects")


def test_runner_flags_in_the_readme_exist() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "runner", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    flags = set(re.findall(r"--[a-z][a-z-]+", README.split("## Run it for a team")[1]))
    runner_flags = {f for f in flags if f in ("--device", "--id", "--kinds", "--until-idle")}
    assert runner_flags == {"--device"}
    for flag in runner_flags:
        assert flag in done.stdout


def test_every_setting_named_is_one_atelier_reads() -> None:
    named = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+\b", README))
    known = {f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields}
    assert named - known - set(OTHER_ENV_VARS) == set()
    # The ones a newcomer must find: leads, Slack modes, real weights, dev guild.
    assert {
        "ATELIER_DISCORD_LEAD_ROLES",
        "ATELIER_SLACK_LEAD_USERS",
        "ATELIER_SLACK_LEAD_GROUP",
        "ATELIER_SLACK_APP_TOKEN",
        "ATELIER_SLACK_SIGNING_SECRET",
        "ATELIER_BASE_MODELS",
        "ATELIER_DISCORD_GUILD_ID",
    } <= named


def test_linked_files_exist_and_the_picture_is_small() -> None:
    targets = re.findall(r"\]\(([^)#:]+)\)", README)
    assert "docs/demo-report.png" in targets
    for target in targets:
        assert (ROOT / target).is_file(), f"README links to {target}, which is missing"
    picture = ROOT / "docs" / "demo-report.png"
    assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size < 300_000


def test_slack_http_mode_matches_the_code() -> None:
    from bot.slack.run import SlackBot

    defaults = SlackBot.__init__.__kwdefaults__ or {}
    assert f"port {defaults['http_port']}" in README
    assert f"`{defaults['http_path']}`" in README
