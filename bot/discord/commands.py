"""The slash commands as discord.py app_commands: typed options in, one dispatch call out.

Each callback only names the neutral command and hands its options to `dispatch`, which
defers, runs the core off the event loop and answers (see bot.discord.client).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

import discord
from discord import app_commands

from storage.training_bounds import REAL_BOUNDS, WHOLE_BOUNDS, Preset

Dispatch = Callable[
    [discord.Interaction, str, dict[str, object], list[discord.Attachment]], Awaitable[None]
]

MAX_ADD_ATTACHMENTS = 10  # Discord allows 25 options; 10 images per command is plenty
# Ranges mirror storage.job_payloads.GeneratePayload so Discord's own form refuses bad input.
SEED_MAX = 2**32 - 1
# The training bounds the core checks (storage.training_bounds), shown in Discord's form.
_STEPS = WHOLE_BOUNDS["steps"]
_RANK = WHOLE_BOUNDS["rank"]
_LR = REAL_BOUNDS["learning_rate"]


def _images(*attachments: discord.Attachment | None) -> list[discord.Attachment]:
    return [a for a in attachments if a is not None]


@app_commands.guild_only()
class StyleGroup(app_commands.Group):
    """`/style ...`: create a style, add references, review, train, list, inspect, export."""

    def __init__(self, dispatch: Dispatch) -> None:
        super().__init__(name="style", description="Your team's styles and concepts")
        self._dispatch = dispatch

    @app_commands.command(name="create", description="Create a style or concept")
    @app_commands.describe(
        name="a short name, e.g. inkwash",
        trigger="the word that calls this style in a prompt",
        kind="style (a look) or concept (a subject)",
        base="the base model to train on (default: the team's)",
    )
    async def create(
        self,
        interaction: discord.Interaction,
        name: str,
        trigger: str,
        kind: Literal["style", "concept"] | None = None,
        base: str | None = None,
    ) -> None:
        args = {"name": name, "trigger": trigger, "kind": kind, "base": base}
        await self._dispatch(interaction, "style create", args, [])

    @app_commands.command(name="add", description="Add reference images to a style")
    @app_commands.describe(
        name="the style",
        image1="an image (you can also post images in the style's thread)",
        **{f"image{i}": "another image" for i in range(2, MAX_ADD_ATTACHMENTS + 1)},
    )
    async def add(
        self,
        interaction: discord.Interaction,
        name: str,
        image1: discord.Attachment | None = None,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
        image5: discord.Attachment | None = None,
        image6: discord.Attachment | None = None,
        image7: discord.Attachment | None = None,
        image8: discord.Attachment | None = None,
        image9: discord.Attachment | None = None,
        image10: discord.Attachment | None = None,
    ) -> None:
        images = _images(
            image1, image2, image3, image4, image5, image6, image7, image8, image9, image10
        )
        await self._dispatch(interaction, "style add", {"name": name}, images)

    @app_commands.command(name="caption", description="Set the caption of one reference image")
    @app_commands.describe(
        name="the style",
        number="the image's number on the review sheet",
        text="the new caption",
    )
    async def caption(
        self,
        interaction: discord.Interaction,
        name: str,
        number: app_commands.Range[int, 1, 10_000],
        text: str,
    ) -> None:
        args = {"name": name, "number": number, "text": text}
        await self._dispatch(interaction, "style caption", args, [])

    @app_commands.command(name="review", description="Post the dataset's review sheet")
    @app_commands.describe(name="the style")
    async def review(self, interaction: discord.Interaction, name: str) -> None:
        await self._dispatch(interaction, "style review", {"name": name}, [])

    @app_commands.command(name="train", description="Train the approved dataset")
    @app_commands.describe(
        name="the style",
        preset="training defaults for a style or a concept",
        steps="training steps",
        rank="LoRA rank",
        lr="learning rate, e.g. 0.0001",
    )
    async def train(
        self,
        interaction: discord.Interaction,
        name: str,
        preset: Preset | None = None,
        steps: app_commands.Range[int, _STEPS[0], _STEPS[1]] | None = None,
        rank: app_commands.Range[int, _RANK[0], _RANK[1]] | None = None,
        lr: app_commands.Range[float, _LR[0], _LR[1]] | None = None,
    ) -> None:
        args = {"name": name, "preset": preset, "steps": steps, "rank": rank, "lr": lr}
        await self._dispatch(interaction, "style train", args, [])

    @app_commands.command(name="list", description="List the team's styles")
    async def list_(self, interaction: discord.Interaction) -> None:
        await self._dispatch(interaction, "style list", {}, [])

    @app_commands.command(name="info", description="Show a style's dataset, runs and models")
    @app_commands.describe(name="the style")
    async def info(self, interaction: discord.Interaction, name: str) -> None:
        await self._dispatch(interaction, "style info", {"name": name}, [])

    @app_commands.command(name="export", description="Download a style's LoRA files")
    @app_commands.describe(name="the style")
    async def export(self, interaction: discord.Interaction, name: str) -> None:
        await self._dispatch(interaction, "style export", {"name": name}, [])


def build_commands(dispatch: Dispatch) -> list[app_commands.Command | app_commands.Group]:
    """Every slash command Atelier registers, bound to `dispatch`."""

    @app_commands.command(name="imagine", description="Generate images; trigger words pick styles")
    @app_commands.describe(
        prompt="what to draw; include a style's trigger word to use it",
        negative="what to avoid",
        seed="a fixed seed to reproduce an image",
        steps="sampling steps",
        cfg="guidance scale",
        size="WIDTHxHEIGHT, e.g. 512x768",
        count="how many images",
        compare="also render the base model on the same seed",
    )
    @app_commands.guild_only()
    async def imagine(
        interaction: discord.Interaction,
        prompt: str,
        negative: str | None = None,
        seed: app_commands.Range[int, 0, SEED_MAX] | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
        cfg: app_commands.Range[float, 0.0, 30.0] | None = None,
        size: str | None = None,
        count: app_commands.Range[int, 1, 8] | None = None,
        compare: bool | None = None,
    ) -> None:
        args = {
            "prompt": prompt,
            "negative": negative,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "size": size,
            "count": count,
            "compare": compare,
        }
        await dispatch(interaction, "imagine", args, [])

    @app_commands.command(name="jobs", description="The queue: your jobs and everyone's")
    @app_commands.guild_only()
    async def jobs(interaction: discord.Interaction) -> None:
        await dispatch(interaction, "jobs", {}, [])

    @app_commands.command(name="cancel", description="Cancel a queued or running job")
    @app_commands.describe(job="the job number shown by /jobs")
    @app_commands.guild_only()
    async def cancel(interaction: discord.Interaction, job: str) -> None:
        await dispatch(interaction, "cancel", {"job": job}, [])

    return [StyleGroup(dispatch), imagine, jobs, cancel]
