"""Atelier configuration, read from ATELIER_* environment variables or a `.env` file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

ENV_PREFIX = "ATELIER_"

CommaList = Annotated[list[str], NoDecode]


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the variable and what it expects."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(Path("./atelier-data"), description="a writable directory")
    database_url: str = Field(
        "",
        description=(
            "an SQLAlchemy URL such as sqlite:///path/atelier.db or "
            "postgresql+psycopg://user@host/db (empty: a SQLite file in the data directory)"
        ),
    )
    auto_migrate: bool = Field(True, description="true or false")

    discord_token: SecretStr | None = Field(None, description="the Discord bot token")
    discord_guild_id: int | None = Field(
        None, description="a Discord server (guild) id to sync commands to while developing"
    )
    discord_lead_roles: CommaList = Field(
        default_factory=list, description="comma-separated Discord role names or ids"
    )
    slack_bot_token: SecretStr | None = Field(None, description="a Slack bot token (xoxb-...)")
    slack_app_token: SecretStr | None = Field(
        None, description="a Slack app-level token (xapp-...) for Socket Mode"
    )
    slack_signing_secret: SecretStr | None = Field(None, description="the Slack signing secret")
    slack_lead_users: CommaList = Field(
        default_factory=list, description="comma-separated Slack user ids (U...)"
    )
    slack_lead_group: str | None = Field(None, description="a Slack user group id (S...)")

    device: str = Field(
        "auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, mps or cuda[:N]"
    )
    base_models: dict[str, str | dict[str, str]] = Field(
        default_factory=dict,
        description=(
            'JSON naming base models, e.g. {"sd15": "/models/sd15-diffusers", "sdxl": '
            '{"source": "/models/sdxl.safetensors", "config": "/models/sdxl-config"}}; '
            "the built-in tiny-sd15, tiny-sdxl and toy-sd15 are always there"
        ),
    )
    default_base_model: str = Field(
        "tiny-sd15", description="the name of a base model new styles use"
    )
    caption_model: str | None = Field(
        None,
        description="a local folder with an image-captioning model: BLIP, Florence-2 or Qwen-VL",
    )
    model_cache_bytes: int | None = Field(
        None, gt=0, description="bytes of warm pipelines to keep (default: from device memory)"
    )

    max_queued_jobs_per_user: int = Field(
        20, ge=1, description="how many queued jobs one person may have at once (a positive number)"
    )
    max_upload_bytes: int = Field(30_000_000, gt=0, description="a positive number of bytes")
    max_image_pixels: int = Field(40_000_000, gt=0, description="a positive number of pixels")
    min_image_side: int = Field(512, ge=0, description="a number of pixels (0 disables)")
    max_blob_bytes: int = Field(2_000_000_000, gt=0, description="a positive number of bytes")

    @field_validator("discord_lead_roles", "slack_lead_users", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:", "postgresql")):
            raise ValueError("only sqlite:/// and postgresql URLs are supported")
        return value

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'atelier.db').as_posix()}"
        return self

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one message per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:  # a structured value that is not valid JSON
        match = re.search(r'field "(\w+)"', str(exc))
        field = match.group(1) if match else "?"
        info = Settings.model_fields.get(field)
        expects = info.description if info and info.description else "valid JSON"
        raise ConfigError(
            f"Atelier's configuration is not valid:\n  {ENV_PREFIX}{field.upper()}: "
            f"is not valid JSON; expected {expects}."
        ) from None


def _describe(exc: ValidationError) -> str:
    lines = ["Atelier's configuration is not valid:"]
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        info = Settings.model_fields.get(field)
        expects = info.description if info and info.description else "a valid value"
        # Never echo the value: it may be a secret.
        lines.append(f"  {ENV_PREFIX}{field.upper()}: {error['msg']}; expected {expects}.")
    lines.append("Set it in the environment or in .env (see .env.example).")
    return "\n".join(lines)
