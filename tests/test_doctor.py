"""`atelier doctor`: a healthy set-up passes; each broken part is named with its fix."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.cli import main
from bot.doctor import Check, mask, secrets_to_mask
from storage.settings import Settings

pytest_plugins = ("generation_fixtures",)
# Shaped like the real thing: base64 of a snowflake id, a timestamp part, an HMAC part.
DISCORD_TOKEN = (
    base64.b64encode(b"112233445566778899").decode().rstrip("=")
    + ".GxYzAb.k9Qw-ErTyUiOpAsDfGhJkLzXcVbNm1234567"
)
SLACK_BOT = "xoxb-1111111111-2222222222-SeCrEtBoTtOkEnVaLuE"
SLACK_APP = "xapp-1-A0123456789-3333333333-SeCrEtApPtOkEn"
SIGNING = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in list(os.environ):
        if name.startswith("ATELIER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path: Path, sqlite_template: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory with a migrated SQLite database: the healthy default set-up."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(sqlite_template, folder / "atelier.db")
    monkeypatch.setenv("ATELIER_DATA_DIR", str(folder))
    return folder


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def line(output: str, name: str) -> str:
    """The line for one check (and its fix line, if any)."""
    lines = output.splitlines()
    for i, text in enumerate(lines):
        if text[2:].startswith(f"{name}:"):
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("    fix:") else ""
            return f"{text}\n{fix}".strip()
    raise AssertionError(f"no '{name}' line in:\n{output}")


def test_healthy_setup_exits_0_with_a_tick_per_check(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys)
    assert code == 0, out
    for name in ("settings", "data directory", "database", "migrations", "default base model"):
        assert line(out, name).startswith("✓"), out
    for name in ("torch", "runner packages", "device", "base model tiny-sd15"):
        assert line(out, name).startswith("✓"), out  # from the runner's subprocess
    assert "cpu" in line(out, "device")
    assert line(out, "discord").startswith("–")  # absent tokens are not failures
    assert line(out, "slack").startswith("–")
    assert "✗" not in out
    assert out.strip().endswith("No problems found.")


def test_chat_platforms_fully_set_up_pass_when_asked_for(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_DISCORD_TOKEN", DISCORD_TOKEN)
    monkeypatch.setenv("ATELIER_DISCORD_LEAD_ROLES", "Art Lead")
    monkeypatch.setenv("ATELIER_SLACK_BOT_TOKEN", SLACK_BOT)
    monkeypatch.setenv("ATELIER_SLACK_SIGNING_SECRET", SIGNING)
    code, out = doctor(capsys, "--component", "bot", "--platform", "discord")
    assert code == 0, out
    assert line(out, "discord").startswith("✓")
    assert "112233445566778899" in line(out, "discord")  # the application id, not secret
    assert "Art Lead" in line(out, "discord art leads")
    code, out = doctor(capsys, "--component", "bot", "--platform", "slack")
    assert code == 0, out
    assert "HTTP mode" in line(out, "slack connection")
    assert line(out, "slack art leads").startswith("–")  # informative, not a failure
    monkeypatch.setenv("ATELIER_SLACK_APP_TOKEN", SLACK_APP)
    _, out = doctor(capsys, "--component", "bot", "--platform", "slack")
    assert "Socket Mode" in line(out, "slack connection")
    assert "torch" not in out  # --component bot leaves the runner alone


def test_data_dir_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "not-a-dir"
    file.write_text("oops")
    monkeypatch.setenv("ATELIER_DATA_DIR", str(file))
    code, out = doctor(capsys, "--component", "bot")
    assert code == 1
    data = line(out, "data directory")
    assert data.startswith("✗") and "is a file" in data
    assert "fix: point ATELIER_DATA_DIR at a directory" in data
    assert line(out, "database").startswith("✗")
    assert "1 problem" not in out and "problem(s) to fix" in out


def _read_only_doctor(folder: Path) -> subprocess.CompletedProcess[str]:
    """Run the doctor where `folder` cannot be written, even when the tests run as root."""
    command = [sys.executable, "-m", "bot.cli", "doctor", "--component", "bot"]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return subprocess.run(command, capture_output=True, text=True, check=False)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a folder unwritable")
    # Root ignores permissions, so bind-mount the folder read-only in a private namespace.
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    wrapped = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
    done = subprocess.run(
        [*wrapped, str(folder), *command], capture_output=True, text=True, check=False
    )
    if "data directory" not in done.stdout:
        pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()[:200]}")
    return done


def test_unwritable_data_dir(data_dir: Path) -> None:
    done = _read_only_doctor(data_dir)
    data_dir.chmod(0o755)
    assert done.returncode == 1, done.stdout
    data = line(done.stdout, "data directory")
    assert data.startswith("✗") and "is not writable" in data
    assert "fix: make it writable" in data


def test_unmigrated_and_unknown_database_revisions(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = data_dir / "atelier.db"
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    code, out = doctor(capsys, "--component", "bot")
    assert code == 1
    assert line(out, "database").startswith("✓")
    migrations = line(out, "migrations")
    assert migrations.startswith("✗") and "no Atelier schema" in migrations
    assert "fix: run `atelier db upgrade`" in migrations
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")
    code, out = doctor(capsys, "--component", "bot")
    assert code == 1
    assert "does not know" in line(out, "migrations")
    assert "update Atelier" in line(out, "migrations")


def test_missing_database_fails_only_when_nothing_would_create_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path / "fresh"))
    code, out = doctor(capsys, "--component", "bot")
    assert code == 0, out
    assert line(out, "database").startswith("–")  # the first start creates it
    assert not (tmp_path / "fresh").exists()  # the doctor itself creates nothing
    monkeypatch.setenv("ATELIER_AUTO_MIGRATE", "false")
    code, out = doctor(capsys, "--component", "bot")
    assert code == 1
    assert "fix: run `atelier db upgrade`" in line(out, "database")


def test_wrong_or_missing_tokens_for_the_platform_asked_for(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_DISCORD_TOKEN", SLACK_BOT)  # pasted into the wrong variable
    code, out = doctor(capsys, "--component", "bot", "--platform", "discord")
    assert code == 1
    discord = line(out, "discord")
    assert discord.startswith("✗") and "looks like a Slack token" in discord
    assert "fix: copy the bot token again" in discord

    monkeypatch.delenv("ATELIER_DISCORD_TOKEN")
    code, out = doctor(capsys, "--component", "bot", "--platform", "slack")
    assert code == 1
    assert "fix:" in line(out, "slack bot token")
    assert "xapp-" in line(out, "slack connection")  # how to fix: Socket Mode or HTTP mode
    assert line(out, "discord").startswith("–")  # not asked for, so not a failure

    monkeypatch.setenv("ATELIER_SLACK_BOT_TOKEN", SLACK_APP)
    monkeypatch.setenv("ATELIER_SLACK_APP_TOKEN", SLACK_BOT)  # the two swapped
    code, out = doctor(capsys, "--component", "bot", "--platform", "slack")
    assert code == 1
    assert "does not start with xoxb-" in line(out, "slack bot token")
    assert "does not start with xapp-" in line(out, "slack connection")


def test_secrets_never_appear_in_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "pg-pAssw0rd-s3cret"
    (tmp_path / ".env").write_text(f"ATELIER_SLACK_SIGNING_SECRET={SIGNING}\n")
    monkeypatch.setenv("ATELIER_DISCORD_TOKEN", DISCORD_TOKEN)
    monkeypatch.setenv("ATELIER_SLACK_BOT_TOKEN", "xoxp-" + SLACK_BOT[5:])  # wrong kind: ✗
    monkeypatch.setenv("ATELIER_SLACK_APP_TOKEN", SLACK_APP)
    # Nothing listens on port 1: the database line fails, and names the URL.
    monkeypatch.setenv(
        "ATELIER_DATABASE_URL", f"postgresql+psycopg://atelier:{password}@127.0.0.1:1/atelier"
    )
    code, out = doctor(capsys, "--component", "bot", "--platform", "slack")
    assert code == 1
    assert "127.0.0.1" in line(out, "database")
    for secret in (DISCORD_TOKEN, SLACK_BOT[5:], SLACK_APP, SIGNING, password):
        assert secret not in out
    for part in DISCORD_TOKEN.split("."):
        assert part not in out


def test_masking_covers_any_text_with_a_configured_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(f"ATELIER_SLACK_APP_TOKEN={SLACK_APP}\n")
    monkeypatch.setenv("ATELIER_DISCORD_TOKEN", DISCORD_TOKEN)
    monkeypatch.setenv("ATELIER_DATABASE_URL", "postgresql+psycopg://u:hunter22@db/x")
    from bot.doctor import read_dotenv

    secrets = secrets_to_mask(None, read_dotenv(tmp_path / ".env"))
    leaked = f"error: bad token {DISCORD_TOKEN} / {SLACK_APP} / password hunter22"
    masked = mask(leaked, secrets)
    assert DISCORD_TOKEN not in masked and SLACK_APP not in masked and "hunter22" not in masked
    assert masked.startswith("error: bad token ****")


def test_invalid_settings_are_named_and_the_rest_skipped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_MIN_IMAGE_SIDE", "big")
    monkeypatch.setenv("ATELIER_DISCORD_TOKN", "x")  # a typo, silently ignored otherwise
    code, out = doctor(capsys)
    assert code == 1
    settings = line(out, "settings")
    assert settings.startswith("✗") and "ATELIER_MIN_IMAGE_SIDE" in settings
    assert "fix:" in settings
    assert "did you mean ATELIER_DISCORD_TOKEN?" in line(out, "unknown variables")
    assert line(out, "everything else").startswith("–")


def test_default_base_model_must_be_configured(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_DEFAULT_BASE_MODEL", "sd15")
    code, out = doctor(capsys, "--component", "bot")
    assert code == 1
    assert "fix: set ATELIER_DEFAULT_BASE_MODEL" in line(out, "default base model")
    monkeypatch.setenv("ATELIER_BASE_MODELS", json.dumps({"sd15": "tiny-sd15"}))
    code, out = doctor(capsys, "--component", "bot")
    assert code == 0, out


def _diffusers_folder(folder: Path, class_name: str = "StableDiffusionPipeline") -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


def _safetensors(path: Path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"model.diffusion_model.w": np.zeros((2, 2), dtype=np.float32)}, str(path))
    return path


def _hub_cache(hf_home: Path, repo_id: str) -> None:
    """The layout huggingface_hub leaves after a download: refs/main -> a snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    _diffusers_folder(repo / "snapshots" / "0123abcd", "StableDiffusionXLPipeline")


def test_base_model_sources_are_checked_in_the_runner(
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = tmp_path / "models"
    _hub_cache(tmp_path / "hf", "studio/cached-xl")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (models / "no-index").mkdir(parents=True)
    config = {
        "good": str(_diffusers_folder(models / "sd15")),
        "klein": str(_diffusers_folder(models / "klein", "Flux2KleinPipeline")),
        "qwen": str(_diffusers_folder(models / "qwen", "QwenImagePipeline")),
        "gone": str(models / "deleted-folder"),
        "noindex": str(models / "no-index"),
        "video": str(_diffusers_folder(models / "video", "TextToVideoSDPipeline")),
        "single": {
            "source": str(_safetensors(models / "sd15.safetensors")),
            "config": str(models / "sd15"),
        },
        "single-no-config": str(models / "sd15.safetensors"),
        "cached": "studio/cached-xl",
        "uncached": "studio/never-fetched",
    }
    monkeypatch.setenv("ATELIER_BASE_MODELS", json.dumps(config))
    code, out = doctor(capsys, "--component", "runner")
    assert code == 1
    assert line(out, "base model good").startswith("✓")
    assert "StableDiffusionPipeline" in line(out, "base model good")
    assert line(out, "base model single").startswith("✓")
    assert "StableDiffusionXLPipeline" in line(out, "base model cached")
    gone = line(out, "base model gone")
    assert gone.startswith("✗") and "does not exist" in gone and "fix:" in gone
    assert "no model_index.json" in line(out, "base model noindex")
    video = line(out, "base model video")
    assert "TextToVideoSDPipeline" in video and "FLUX.2 [klein]" in video and "Qwen-Image" in video
    # Every family's pipeline passes: the families' own list, not an SD-only one.
    assert line(out, "base model klein").startswith("✓")
    assert line(out, "base model qwen").startswith("✓")
    assert "`config`" in line(out, "base model single-no-config")
    uncached = line(out, "base model uncached")
    assert uncached.startswith("✗") and "hf download studio/never-fetched" in uncached
    assert out.count("✗") == 5
    assert line(out, "base model tiny-sd15").startswith("✓")


def test_a_device_this_machine_lacks_is_a_problem(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("ATELIER_DEVICE", "cuda")
    code, out = doctor(capsys, "--component", "runner")
    assert code == 1
    device = line(out, "device")
    assert device.startswith("✗") and "no CUDA GPU" in device
    assert "fix: set ATELIER_DEVICE=auto" in device


_TORCH_FREE = """
import sys
# As in the bot's image: no torch, no runner packages, no gpu_runner.
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "gpu_runner"):
    sys.modules[name] = None
from bot.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules or sys.modules["torch"] is None
sys.exit(code)
"""


@pytest.mark.parametrize(("component", "expected"), [("all", 0), ("runner", 1)])
def test_without_torch_the_runner_checks_are_skipped(
    data_dir: Path, component: str, expected: int
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, "doctor", "--component", component],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == expected, done.stdout + done.stderr
    runner = line(done.stdout, "runner")
    if component == "all":
        assert runner.startswith("–") and "torch is not installed" in runner
    else:
        assert runner.startswith("✗") and "fix: install the runner extra" in runner
    assert line(done.stdout, "migrations").startswith("✓")


@pytest.mark.postgres
def test_healthy_postgres(
    postgres_database: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATELIER_DATABASE_URL", postgres_database)
    code, out = doctor(capsys, "--component", "bot")
    assert code == 0, out
    assert line(out, "database").startswith("✓")
    assert line(out, "migrations").startswith("✓")


# --- the runner's half, in this process (diffusers is loaded once per session) -----------


@pytest.mark.runner
def test_source_kinds_match_the_pipeline_loader(tmp_path: Path) -> None:
    from gpu_runner import doctor as runner_doctor
    from gpu_runner.pipelines import BUILTIN_MODELS, BaseModelSpec

    assert runner_doctor.BUILTIN_MODELS == BUILTIN_MODELS
    (tmp_path / "folder").mkdir()
    sources = ["tiny-sd15", str(tmp_path / "folder"), "x/model.safetensors", "org/name"]
    for source in sources:
        assert runner_doctor.source_kind(source) == BaseModelSpec("m", source).kind


@pytest.mark.runner
def test_load_models_loads_each_base_model(tmp_path: Path, tiny_sd15: Any) -> None:
    from gpu_runner.doctor import base_model_checks

    tiny_sd15.save_pretrained(tmp_path / "saved")
    broken = _diffusers_folder(tmp_path / "broken")  # an index, but no components
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        base_models={"saved": str(tmp_path / "saved"), "broken": str(broken)},
    )
    checks = {check.name: check for check in base_model_checks(settings, load=True)}
    assert checks["base model saved"].status == "ok"
    assert "loads as SD1.5" in checks["base model saved"].detail
    assert "loads as SDXL" in checks["base model tiny-sdxl"].detail
    assert checks["base model broken"].status == "fail"
    assert "does not load" in checks["base model broken"].detail
    assert checks["base model broken"].fix


def test_check_reports_are_plain_data() -> None:
    # The runner's subprocess sends its checks as JSON; they must rebuild as the same Check.
    from dataclasses import asdict

    from gpu_runner.doctor import RunnerCheck

    sent = RunnerCheck("device", "fail", "why", "fix")
    assert Check(**json.loads(json.dumps(asdict(sent)))) == Check("device", "fail", "why", "fix")
