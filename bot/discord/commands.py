"""The slash commands as discord.py app_commands: typed options in, one dispatch call out.

Each callback only names the neutral command and hands its options to `dispatch`, which
defers, runs the core off the event loop and answers (see bot.discord.client).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

import discord
from discord import app_commands

from storage.training_bounds import (
    REAL_BOUNDS,
    WHOLE_BOUNDS,
    LayerSet,
    Optimizer,
    Preset,
    Quantization,
)

Dispatch = Callable[
    [discord.Interaction, str, dict[str, object], list[discord.Attachment]], Awaitable[None]
]
# (interaction, option name, what is typed so far) -> choices (the core's suggestions).
Suggest = Callable[[discord.Interaction, str, str], Awaitable[list[str]]]
Completer = Callable[[discord.Interaction, str], Awaitable[list[app_commands.Choice[str]]]]
# Which options of which commands get autocomplete: the team's style names, base models,
# methods, aspect ratios (the core's bot.core.suggestions answers).
AUTOCOMPLETE: dict[str, tuple[str, ...]] = {
    "caption": ("name",),
    "add": ("name",),
    "review": ("name",),
    "train": ("name", "method"),
    "info": ("name",),
    "export": ("name",),
    "versions": ("name",),
    "use": ("name",),
    "import": ("name", "base"),
    "create": ("base",),
}

MAX_ADD_ATTACHMENTS = 10  # Discord allows 25 options; 10 images per command is plenty
# Ranges mirror storage.job_payloads.GeneratePayload so Discord's own form refuses bad input.
SEED_MAX = 2**32 - 1
# The training bounds the core checks (storage.training_bounds), shown in Discord's form.
_STEPS = WHOLE_BOUNDS["steps"]
_RANK = WHOLE_BOUNDS["rank"]
_LR = REAL_BOUNDS["learning_rate"]
_OFFSET = REAL_BOUNDS["noise_offset"]
_PRESERVE = REAL_BOUNDS["output_preservation"]
_KEEP = WHOLE_BOUNDS["keep_tags"]
_EPOCHS = WHOLE_BOUNDS["epochs"]
_ACCUMULATE = WHOLE_BOUNDS["gradient_accumulation"]
_MIN_T = WHOLE_BOUNDS["min_timestep"]
_MAX_T = WHOLE_BOUNDS["max_timestep"]
OnOff = Literal["on", "off"]


def _images(*attachments: discord.Attachment | None) -> list[discord.Attachment]:
    return [a for a in attachments if a is not None]


@app_commands.guild_only()
class StyleGroup(app_commands.Group):
    """`/style ...`: create a style, add references, review, train, list, inspect, export."""

    def __init__(self, dispatch: Dispatch, suggest: Suggest) -> None:
        super().__init__(name="style", description="Your team's styles and concepts")
        self._dispatch = dispatch
        for command_name, options in AUTOCOMPLETE.items():
            command = self.get_command(command_name)
            assert isinstance(command, app_commands.Command)
            for option in options:
                command.autocomplete(option)(completer(suggest, option))

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
        number="the image's number on the review sheet, or auto (the captioning model)",
        text="the new caption (leave out with auto)",
    )
    async def caption(
        self,
        interaction: discord.Interaction,
        name: str,
        number: str,
        text: str | None = None,
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
        method="lora, dora or ti (textual inversion)",
        quantize="nf4: the frozen base in 4 bits (QLoRA), for big models on small cards",
        layers="attention, full (+ feed-forwards) or locon (+ convolutions, SD only)",
        optimizer="adamw, adamw8bit (CUDA) or prodigy (sets its own learning rate)",
        flip="mirrored copies of the references (on for styles)",
        noise_offset="0-0.2: lets very dark or bright styles train",
        shuffle="on: caption tags in a new order each step",
        keep_tags="with shuffle: the first N tags stay put",
        epochs="passes over the images (sets the steps from their count)",
        accumulate="micro-batches a step: a bigger batch in the same memory",
        text_encoder="on: a LoRA on the text encoder too (SD1.5, SDXL)",
        preserve="0-4: prompts without the trigger keep the base model's look (0: off)",
        min_timestep="0-999: train from this noise level up (of 1000)",
        max_timestep="1-1000: train up to this noise level (lower: textures learn faster)",
        init_word="method=ti: the word its new token starts from, one near the look (sketch)",
    )
    async def train(
        self,
        interaction: discord.Interaction,
        name: str,
        preset: Preset | None = None,
        steps: app_commands.Range[int, _STEPS[0], _STEPS[1]] | None = None,
        rank: app_commands.Range[int, _RANK[0], _RANK[1]] | None = None,
        lr: app_commands.Range[float, _LR[0], _LR[1]] | None = None,
        method: str | None = None,
        quantize: Quantization | None = None,
        layers: LayerSet | None = None,
        optimizer: Optimizer | None = None,
        flip: OnOff | None = None,
        noise_offset: app_commands.Range[float, _OFFSET[0], _OFFSET[1]] | None = None,
        shuffle: OnOff | None = None,
        keep_tags: app_commands.Range[int, _KEEP[0], _KEEP[1]] | None = None,
        epochs: app_commands.Range[int, _EPOCHS[0], _EPOCHS[1]] | None = None,
        accumulate: app_commands.Range[int, _ACCUMULATE[0], _ACCUMULATE[1]] | None = None,
        text_encoder: OnOff | None = None,
        preserve: app_commands.Range[float, _PRESERVE[0], _PRESERVE[1]] | None = None,
        min_timestep: app_commands.Range[int, _MIN_T[0], _MIN_T[1]] | None = None,
        max_timestep: app_commands.Range[int, _MAX_T[0], _MAX_T[1]] | None = None,
        init_word: app_commands.Range[str, 1, 32] | None = None,
    ) -> None:
        args = {
            "name": name,
            "preset": preset,
            "steps": steps,
            "rank": rank,
            "lr": lr,
            "method": method,
            "quantize": quantize,
            "layers": layers,
            "optimizer": optimizer,
            "flip": flip,
            "noise_offset": noise_offset,
            "shuffle": shuffle,
            "keep_tags": keep_tags,
            "epochs": epochs,
            "accumulate": accumulate,
            "text_encoder": text_encoder,
            "preserve": preserve,
            "min_timestep": min_timestep,
            "max_timestep": max_timestep,
            "init_word": init_word,
        }
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

    @app_commands.command(name="versions", description="List a style's model versions")
    @app_commands.describe(name="the style")
    async def versions(self, interaction: discord.Interaction, name: str) -> None:
        await self._dispatch(interaction, "style versions", {"name": name}, [])

    @app_commands.command(name="use", description="Art leads: make a checkpoint the style's")
    @app_commands.describe(name="the style", step="the checkpoint's step")
    async def use(
        self,
        interaction: discord.Interaction,
        name: str,
        step: app_commands.Range[int, 1, _STEPS[1]],
    ) -> None:
        await self._dispatch(interaction, "style use", {"name": name, "step": step}, [])

    @app_commands.command(name="import", description="Import a LoRA .safetensors you have")
    @app_commands.describe(
        name="the style (created if new)",
        trigger="its trigger word",
        file="the LoRA .safetensors file",
        base="base model, for a new style",
    )
    async def import_(
        self,
        interaction: discord.Interaction,
        name: str,
        trigger: str,
        file: discord.Attachment,
        base: str | None = None,
    ) -> None:
        args = {"name": name, "trigger": trigger, "base": base}
        await self._dispatch(interaction, "style import", args, [file])


def completer(suggest: Suggest, option: str) -> Completer:
    async def complete(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = await suggest(interaction, option, current)
        return [app_commands.Choice(name=n[:100], value=n[:100]) for n in names[:25]]

    return complete


def build_commands(
    dispatch: Dispatch, suggest: Suggest
) -> list[app_commands.Command | app_commands.Group]:
    """Every slash command Atelier registers, bound to `dispatch` (and `suggest`, for
    autocomplete)."""

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
        ar="aspect ratio, e.g. 16:9 (the model's native size at that shape)",
        image="start from this picture (image-to-image)",
        strength="with image: how much of it to repaint, 0.05-1 (default 0.6)",
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
        ar: str | None = None,
        image: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.05, 1.0] | None = None,
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
            "ar": ar,
            "strength": strength,
        }
        await dispatch(interaction, "imagine", args, _images(image))

    imagine.autocomplete("ar")(completer(suggest, "ar"))

    @app_commands.command(name="jobs", description="The queue: your jobs and everyone's")
    @app_commands.guild_only()
    async def jobs(interaction: discord.Interaction) -> None:
        await dispatch(interaction, "jobs", {}, [])

    @app_commands.command(name="cancel", description="Cancel a queued or running job")
    @app_commands.describe(job="the job number shown by /jobs")
    @app_commands.guild_only()
    async def cancel(interaction: discord.Interaction, job: str) -> None:
        await dispatch(interaction, "cancel", {"job": job}, [])

    @app_commands.command(name="audit", description="Art leads: the latest audit events")
    @app_commands.describe(style="only this style's events", count="how many (default 20)")
    @app_commands.guild_only()
    async def audit(
        interaction: discord.Interaction,
        style: str | None = None,
        count: app_commands.Range[int, 1, 100] | None = None,
    ) -> None:
        await dispatch(interaction, "audit", {"style": style, "count": count}, [])

    audit.autocomplete("style")(completer(suggest, "style"))

    return [StyleGroup(dispatch, suggest), imagine, jobs, cancel, audit]
