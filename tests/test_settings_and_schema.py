"""Configuration, migrations and the `atelier` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from bot.cli import main
from storage.db import Database, SchemaOutOfDate
from storage.models import Base
from storage.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in list(__import__("os").environ):
        if name.startswith("ATELIER_"):
            monkeypatch.delenv(name)


def test_defaults_put_sqlite_in_the_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_DATA_DIR", "/srv/atelier")
    settings = load_settings()
    assert settings.database_url == "sqlite:////srv/atelier/atelier.db"
    assert settings.blob_dir == Path("/srv/atelier/blobs")


def test_lists_and_secrets_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_DISCORD_LEAD_ROLES", "Art Lead, 1234")
    monkeypatch.setenv("ATELIER_SLACK_BOT_TOKEN", "xoxb-secret-value")
    settings = load_settings()
    assert settings.discord_lead_roles == ["Art Lead", "1234"]
    assert "xoxb-secret-value" not in repr(settings)
    assert settings.slack_bot_token is not None
    assert settings.slack_bot_token.get_secret_value() == "xoxb-secret-value"


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ATELIER_MIN_IMAGE_SIDE=768\n")
    assert load_settings().min_image_side == 768


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ATELIER_MIN_IMAGE_SIDE", "big", "ATELIER_MIN_IMAGE_SIDE"),
        ("ATELIER_MAX_UPLOAD_BYTES", "-5", "a positive number of bytes"),
        ("ATELIER_DATABASE_URL", "mysql://x", "postgresql"),
        ("ATELIER_DISCORD_GUILD_ID", "my-guild", "ATELIER_DISCORD_GUILD_ID"),
    ],
)
def test_wrong_setting_names_variable_and_expectation(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value) and expected in str(info.value)


def test_cli_reports_bad_setting_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ATELIER_AUTO_MIGRATE", "perhaps")
    assert main(["db", "upgrade"]) == 2
    assert "ATELIER_AUTO_MIGRATE" in capsys.readouterr().err


def test_migrations_build_every_table_and_checks_pass(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(SchemaOutOfDate, match="atelier db upgrade"):
        db.check_current()
    db.prepare(auto_migrate=True)
    db.check_current()
    tables = set(inspect(db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables


def test_migrations_match_models(tmp_path: Path) -> None:
    """A model change without a migration fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    db.upgrade()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_atelier_db_upgrade_command(tmp_path: Path) -> None:
    env = {"ATELIER_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "bot.cli", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "revision" in run.stdout
    assert (tmp_path / "data" / "atelier.db").exists()
    check = subprocess.run(
        [sys.executable, "-m", "bot.cli", "db", "check"],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        check=False,
    )
    assert check.returncode == 0 and "current" in check.stdout


def test_storage_and_bot_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
        "import storage.db, storage.models, storage.queue, storage.outbox, storage.blobs\n"
        "import storage.ingest, storage.work_signal, bot.cli\n"
        "print('ok')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        check=False,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_base_models_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ATELIER_BASE_MODELS",
        '{"sd15": "/m/sd15", "sdxl": {"source": "/m/x.safetensors", "config": "/m/cfg"}}',
    )
    settings = load_settings()
    assert settings.base_models["sd15"] == "/m/sd15"
    assert settings.base_models["sdxl"] == {"source": "/m/x.safetensors", "config": "/m/cfg"}


def test_bad_base_models_json_and_device_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_DEVICE", "tpu")
    with pytest.raises(ConfigError, match=r"ATELIER_DEVICE(.|\n)*auto, cpu, mps or cuda"):
        load_settings()
    monkeypatch.delenv("ATELIER_DEVICE")
    monkeypatch.setenv("ATELIER_BASE_MODELS", "{not json")
    with pytest.raises(ConfigError, match="ATELIER_BASE_MODELS"):
        load_settings()


def test_unreachable_database_is_one_line_without_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ATELIER_DATABASE_URL", "postgresql+psycopg://bob:hunter2@127.0.0.1:9/x")
    assert main(["db", "check"]) == 2
    err = capsys.readouterr().err
    assert "Cannot use the database" in err and "ATELIER_DATABASE_URL" in err
    assert "hunter2" not in err and "Traceback" not in err
