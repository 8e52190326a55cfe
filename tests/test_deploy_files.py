"""docker-compose.yml, the Dockerfiles and .env.example agree with each other and the code.

Docker cannot run here, so these read the files: services, volumes and variables must match
the settings Atelier reads, and every command the containers run must be a real command.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from bot.cli import build_parser
from bot.doctor import OTHER_ENV_VARS, secret_field_names
from storage.settings import ENV_PREFIX, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
PLATFORMS = ("discord", "slack")
SETTING_NAMES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
_ATELIER_NAME = re.compile(r"\bATELIER_[A-Z0-9_]+\b")
_ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


# --- reading the files ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def read_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def args_of(instructions: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in instructions if i.keyword == keyword]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(instructions, "ENV"):
        for pair in shlex.split(args):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and $$."""

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", one, value).replace("$$", "$")


def example_assignments() -> list[tuple[str, str, bool]]:
    """(name, value, commented) for each `NAME=value` or `# NAME=value` line of .env.example."""
    found = []
    for raw in ENV_EXAMPLE.read_text().splitlines():
        match = _ASSIGNMENT.match(raw.strip())
        if match:
            found.append((match.group(2), match.group(3), bool(match.group(1))))
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def dockerfile(services: dict[str, Any], name: str) -> list[Instruction]:
    build = services[name]["build"]
    return read_dockerfile(REPO / build.get("context", ".") / build["dockerfile"])


def assert_atelier_command(argv: list[str]) -> None:
    assert argv[0] == "atelier", argv
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(argv)}` is not an atelier command")


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> named volume."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        mounts[target] = source
    return mounts


# --- compose -------------------------------------------------------------------------------


def test_services_and_profiles(services: dict[str, Any]) -> None:
    assert set(services) == {"runner", "bot", "postgres"}
    assert "profiles" not in services["runner"] and "profiles" not in services["bot"]
    assert services["postgres"]["profiles"] == ["postgres"]
    for name, service in services.items():
        assert service["restart"] in ("unless-stopped", "always"), name
        assert service["healthcheck"]["test"], name
    for name in ("runner", "bot"):
        assert services[name]["env_file"] == ".env"
        assert (REPO / services[name]["build"]["dockerfile"]).is_file()
    assert "env_file" not in services["postgres"]  # the chat secrets stay out of it


def test_runner_reserves_an_nvidia_gpu(services: dict[str, Any]) -> None:
    devices = services["runner"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services["bot"]


def test_one_data_volume_at_the_data_dir_for_both(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    volumes = {}
    for name in ("runner", "bot"):
        data_dir = services[name]["environment"]["ATELIER_DATA_DIR"]
        assert env_of(dockerfile(services, name))["ATELIER_DATA_DIR"] == data_dir
        volumes[name] = volume_mounts(services[name]).get(data_dir)
        assert data_dir in " ".join(args_of(dockerfile(services, name), "VOLUME"))
    assert volumes["runner"] == volumes["bot"] is not None
    used = {v for s in services.values() for v in volume_mounts(s).values()}
    assert used == set(compose["volumes"])  # every named volume declared, none unused


def test_model_cache_is_a_volume_on_the_runner(services: dict[str, Any]) -> None:
    runner = services["runner"]
    hf_home = runner["environment"]["HF_HOME"]
    assert env_of(dockerfile(services, "runner"))["HF_HOME"] == hf_home
    mounts = volume_mounts(runner)
    assert any(hf_home.startswith(target + "/") for target in mounts if target != "/data")


def test_every_command_is_an_atelier_command(services: dict[str, Any]) -> None:
    for platform in PLATFORMS:
        env = {"ATELIER_PLATFORM": platform}
        for name in ("runner", "bot"):
            command = [interpolate(part, env) for part in services[name]["command"]]
            assert_atelier_command(command)
            check = services[name]["healthcheck"]["test"]
            assert check[0] == "CMD"
            assert_atelier_command([interpolate(part, env) for part in check[1:]])
        bot_command = [interpolate(p, env) for p in services["bot"]["command"]]
        assert bot_command == ["atelier", "bot", platform]
    assert interpolate(services["bot"]["command"][-1], {}) in PLATFORMS  # the default
    for name in ("runner", "bot"):
        for cmd in args_of(dockerfile(services, name), "CMD"):
            assert_atelier_command(json.loads(cmd))


def test_slack_http_port_is_published(services: dict[str, Any]) -> None:
    from bot.slack.run import SlackBot

    port = inspect.signature(SlackBot).parameters["http_port"].default
    assert f"{port}:{port}" in services["bot"]["ports"]
    assert str(port) in args_of(dockerfile(services, "bot"), "EXPOSE")


def test_postgres_profile_matches_the_documented_url(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    env = postgres["environment"]
    documented = re.search(r"postgresql\+psycopg://\S+", ENV_EXAMPLE.read_text())
    assert documented, ".env.example shows no PostgreSQL URL"
    url = make_url(documented.group(0))
    assert (url.host, url.port) == ("postgres", 5432)  # the service's name on compose's network
    assert (url.username, url.database) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    check = postgres["healthcheck"]["test"]
    assert f"-U {env['POSTGRES_USER']}" in check[-1] and f"-d {env['POSTGRES_DB']}" in check[-1]
    assert volume_mounts(postgres).get("/var/lib/postgresql/data")
    for name in ("runner", "bot"):
        dependency = services[name]["depends_on"]["postgres"]
        assert dependency == {"condition": "service_healthy", "required": False}


# --- variables -----------------------------------------------------------------------------


def test_every_atelier_variable_in_the_deploy_files_is_read_by_atelier(
    services: dict[str, Any],
) -> None:
    texts = [COMPOSE.read_text(), ENV_EXAMPLE.read_text()]
    texts += [
        (REPO / s["build"]["dockerfile"]).read_text() for s in services.values() if "build" in s
    ]
    names = {name for text in texts for name in _ATELIER_NAME.findall(text)}
    unknown = names - SETTING_NAMES - set(OTHER_ENV_VARS)
    assert not unknown, f"not settings and not known elsewhere: {sorted(unknown)}"


def test_other_variables_are_really_read_somewhere() -> None:
    # The doctor's list of non-Settings ATELIER_* names must not go stale.
    sources = [*REPO.glob("*/**/*.py"), REPO / "install.sh", COMPOSE]
    skip = {REPO / "bot" / "doctor.py", Path(__file__).resolve()}
    text = "\n".join(p.read_text() for p in sources if p not in skip and ".venv" not in p.parts)
    for name in OTHER_ENV_VARS:
        assert name in text, f"{name} is listed in bot/doctor.py but nothing reads it"


def test_env_example_lists_every_setting_with_a_comment() -> None:
    names = [name for name, _, _ in example_assignments()]
    assert not SETTING_NAMES - set(names), "missing from .env.example"
    assert len(names) == len(set(names)), "a variable is listed twice"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, raw in enumerate(lines):
        if not _ASSIGNMENT.match(raw.strip()):
            continue
        j = i - 1
        while j >= 0 and _ASSIGNMENT.match(lines[j].strip()):
            j -= 1  # lines that share one comment
        assert j >= 0 and lines[j].startswith("# ") and len(lines[j]) > 10, raw


def test_secrets_are_empty_in_the_example() -> None:
    values = {name: value for name, value, _ in example_assignments()}
    for field in secret_field_names():
        assert values[f"{ENV_PREFIX}{field.upper()}"] == "", field
    assert "POSTGRES_PASSWORD" in values and not values["POSTGRES_PASSWORD"]


def _normalized(settings: Settings) -> dict[str, Any]:
    out = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        out[name] = None if value in ("", [], {}, None) else value
    return out


def test_env_example_as_dotenv_gives_the_documented_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    defaults = _normalized(Settings(_env_file=None))  # type: ignore[call-arg]
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text())
    assert _normalized(load_settings()) == defaults
    # A commented `# NAME=value` line shows the default: uncommented, nothing changes.
    uncommented = [
        f"{name}={value}"
        for name, value, commented in example_assignments()
        if commented and value and name in SETTING_NAMES
    ]
    assert len(uncommented) >= 8
    (tmp_path / ".env").write_text("\n".join(uncommented) + "\n")
    assert _normalized(load_settings()) == defaults
    platform = {n: v for n, v, _ in example_assignments()}["ATELIER_PLATFORM"]
    assert platform in PLATFORMS


# --- images --------------------------------------------------------------------------------


def _ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (its simple patterns)."""
    ignored = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").removeprefix("**/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes + list(parts)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_and_the_venv_out() -> None:
    assert _ignored(".env") and _ignored(".venv") and _ignored("atelier-data")
    assert not _ignored(".env.example") and not _ignored("bot/cli.py")


@pytest.mark.parametrize("name", ["runner", "bot"])
def test_copied_files_exist_in_the_build_context(services: dict[str, Any], name: str) -> None:
    copies = args_of(dockerfile(services, name), "COPY")
    assert copies
    for args in copies:
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
            assert not _ignored(source), f"{name}: COPY {source} is in .dockerignore"


def _base_and_runner_requirements() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    return names(project["dependencies"]), names(project["optional-dependencies"]["runner"])


def test_the_bot_image_installs_no_torch(services: dict[str, Any]) -> None:
    instructions = dockerfile(services, "bot")
    runs = " ".join(args_of(instructions, "RUN"))
    assert re.search(r"pip install \.(\s|$)", runs), "the bot image installs the package"
    assert "torch" not in runs and "runner" not in runs and ".[" not in runs
    copied = " ".join(args_of(instructions, "COPY"))
    assert "gpu_runner" not in copied
    base, runner = _base_and_runner_requirements()
    assert "torch" in runner and not base & runner  # `pip install .` pulls none of them


def test_the_runner_image_installs_torch_then_the_runner_extra(services: dict[str, Any]) -> None:
    instructions = dockerfile(services, "runner")
    runs = args_of(instructions, "RUN")
    torch_run = next(i for i, run in enumerate(runs) if "TORCH_SPEC" in run)
    extra_run = next(i for i, run in enumerate(runs) if '".[runner]"' in run)
    assert torch_run < extra_run
    assert "-c " in runs[extra_run]  # constrained to the torch installed first
    keywords = [i.keyword for i in instructions]
    first_copy = keywords.index("COPY")
    assert instructions.index(Instruction("RUN", runs[torch_run])) < first_copy  # cached layer


def test_both_images_write_the_shared_volume_as_the_same_user(services: dict[str, Any]) -> None:
    users = set()
    for name in ("runner", "bot"):
        instructions = dockerfile(services, name)
        runs = " ".join(args_of(instructions, "RUN"))
        uid = re.search(r"useradd .*--uid (\d+) (\w+)", runs)
        assert uid, name
        assert args_of(instructions, "USER") == [uid.group(2)]
        users.add(uid.groups())
    assert len(users) == 1


def test_bot_and_storage_import_without_torch() -> None:
    script = """
import importlib, pkgutil, sys
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "gpu_runner"):
    sys.modules[name] = None  # as in the bot's image
import bot, storage
for package in (bot, storage):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
print("imported", len([m for m in sys.modules if m.startswith(("bot.", "storage."))]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 20
