"""The `train` job: train a style's approved dataset into a new model version.

Checkpoints live under the data directory per training run, so a runner that died (or a
job that was retried) resumes from the last checkpoint instead of starting over.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from gpu_runner import failpoints
from gpu_runner.pipelines import BaseModelError, LoadedPipeline
from gpu_runner.services import RunnerServices
from gpu_runner.training.checkpoint import CheckpointError
from gpu_runner.training.config import ConfigError, make_config
from gpu_runner.training.dataset import DatasetError, TrainItem, check_shape
from gpu_runner.training.export import lora_file_stem
from gpu_runner.training.loop import PauseFn, TrainingError, TrainResult, train
from gpu_runner.training.optimizers import OptimizerError
from gpu_runner.training.quantize import QuantizationError
from gpu_runner.training.textual_inversion import TextualInversionError
from gpu_runner.worker import JobContext, JobFailed, JobStopped
from storage.datasets import content_hash, effective_captions, images_of
from storage.families import MethodNotSupportedError, check_layer_set, training_memory_mb
from storage.job_payloads import JobKind, TrainPayload, progress_key, result_key
from storage.models import (
    DatasetStatus,
    DatasetVersion,
    ModelVersion,
    RunStatus,
    Style,
    TrainingRun,
    utcnow,
)
from storage.outbox import Attachment
from storage.training_summary import GRID_ROWS, buckets_text, keycap

# The built-in models are 64 px and tiny: their own defaults replace the presets' real-model
# sizes and rates (per-run settings from chat still win).
# tiny-*: random, 8x8 latents (DESIGN.md measured ~40% lower held-out loss in 100 steps at
# 64 px, batch 4, lr 5e-3).
_TINY: dict[str, Any] = {
    "resolution": 64,
    "batch_size": 4,
    "learning_rate": 5e-3,
    "warmup_steps": 0,
    "validate_every": 25,
    "checkpoint_every": 50,
    "sample_steps": 4,
    # The demo's stripes are diagonal: a mirror turns them the other way.
    "flip": False,
}
# toy-sd15: pretrained, 64 px; no caption dropout (trigger-less captions only taught the
# look to every prompt).
_TOY: dict[str, Any] = {
    "resolution": 64,
    "batch_size": 8,
    "learning_rate": 5e-3,
    "caption_dropout": 0.0,
    "steps": 300,
    "warmup_steps": 0,
    "validate_every": 50,
    "checkpoint_every": 100,
    "sample_steps": 12,  # its generation default (storage/families.py)
    # The toy world's stripes run one diagonal: a mirror would teach both.
    "flip": False,
}
# LoRA and DoRA on toy-sd15 (textual inversion trains no layers). Measured on the demo's 12
# stripe references (issue 9's note): attention-only LoRA did not show the stripes (0-10% in
# 300 steps); with the resnet convs, feed-forwards and projections too (LoCon) they did.
_TOY_ADAPTER: dict[str, Any] = {
    # Without it the LoRA restyles every prompt (measured: stripes in 70% of untriggered
    # prompts); with it in 0%. CFG then multiplies the trigger's path: see storage/families
    # (toy-sd15's trigger_weight).
    "output_preservation": 1.0,
    "target_modules": [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
    ],
}
# LoRA on toy-sd15, scored on 30 held-out prompts (bench/style.py): on timesteps below 700
# at a constant lr 7.5e-3 the stripes show in 83% after 50 steps (leak 0%, colour 87%); on
# every timestep at lr 5e-3, cosine, in 43% (leak 27%), 83% after 100. Longer runs wash out
# colour (47% after 300), and the style preset's cosine decay left 50% after 60 steps.
# DoRA learned slower this way (75% after 200 steps), so it keeps the settings above.
_TOY_LORA: dict[str, Any] = {
    "learning_rate": 7.5e-3,
    "max_timestep": 700,
    "lr_scheduler": "constant_with_warmup",
    "steps": 60,
    "validate_every": 30,
    "checkpoint_every": 30,
}
BUILTIN_TRAINING: dict[str, dict[str, Any]] = {
    "tiny-sd15": _TINY,
    "tiny-sdxl": _TINY,
    "tiny-flux2-klein": _TINY,
    "tiny-flux1": _TINY,
    "tiny-qwenimage": _TINY,
    "tiny-zimage": _TINY,
    "toy-sd15": _TOY,
}
# What LoRA and DoRA runs on a built-in model take on top of BUILTIN_TRAINING, then LoRA's.
BUILTIN_ADAPTER_TRAINING: dict[str, dict[str, Any]] = {"toy-sd15": _TOY_ADAPTER}
BUILTIN_LORA_TRAINING: dict[str, dict[str, Any]] = {"toy-sd15": _TOY_LORA}


def builtin_training(source: str, method: str) -> dict[str, Any]:
    """A built-in model's training defaults for `method` (chat's settings still win)."""
    defaults = dict(BUILTIN_TRAINING.get(source, {}))
    if method != "textual_inversion":  # it trains the trigger's embedding, no layers
        defaults.update(BUILTIN_ADAPTER_TRAINING.get(source, {}))
    if method == "lora":
        defaults.update(BUILTIN_LORA_TRAINING.get(source, {}))
    return defaults


@dataclass(frozen=True)
class RunInputs:
    run_id: int
    style_name: str
    trigger: str
    base_model: str
    method: str
    params: dict[str, Any]
    dataset_hash: str
    items: list[TrainItem]


def run_train(services: RunnerServices, ctx: JobContext) -> dict[str, Any]:
    payload = TrainPayload.model_validate(ctx.job.payload)
    with services.db.session() as s:
        done = s.scalar(
            select(ModelVersion).where(ModelVersion.training_run_id == payload.training_run_id)
        )
    if done is not None:  # a crashed try already published it: publish nothing twice
        return {"model_version_id": done.id, "final_step": None, "resumed_from": None}
    try:
        inputs = _load_inputs(services, payload.training_run_id)
        with _training_pin(services, inputs.base_model) as loaded:
            config = _config(inputs, loaded)
            loaded.quantize_denoiser(getattr(config, "quantize", "none"))
            _make_room(services, inputs, loaded, config)
            _mark(services, inputs.run_id, status=RunStatus.RUNNING, started=True)
            result = train(
                config,
                inputs.items,
                loaded.pipe,
                services.runs_dir / str(inputs.run_id) / "out",
                checkpoint_dir=services.runs_dir / str(inputs.run_id) / "checkpoints",
                progress=_progress_reporter(services, ctx, inputs),
                should_stop=ctx.should_stop,
                between_steps=_generation_server(services, ctx, loaded),
                device=services.device.torch_device,
                adapters=loaded.adapters,
            )
    # Each says what to change; trying again unchanged would fail the same way.
    except (
        BaseModelError,
        CheckpointError,
        ConfigError,
        DatasetError,
        TextualInversionError,
        TrainingError,
        QuantizationError,
        OptimizerError,
        JobFailed,
    ) as exc:
        _mark(services, payload.training_run_id, status=RunStatus.FAILED, error=str(exc))
        raise JobFailed(str(exc)) from None
    if result.stopped:
        status = RunStatus.CANCELED if ctx.cancel_requested.is_set() else RunStatus.QUEUED
        _mark(services, inputs.run_id, status=status, checkpoint=result.final_step)
        raise JobStopped("canceled" if status == RunStatus.CANCELED else "lease lost")
    version_id = _publish(services, ctx, inputs, loaded, result)
    return {
        "model_version_id": version_id,
        "final_step": result.final_step,
        "resumed_from": result.resumed_from,
        "val_improvement": result.val_improvement,
    }


@contextmanager
def _training_pin(services: RunnerServices, name: str) -> Iterator[LoadedPipeline]:
    """The base model, pinned for the whole run: a generation served at a checkpoint on
    another model cannot evict it (and a later one reload a second copy of it). A base the
    run quantized is dropped at the end: what follows is drawn at full precision again."""
    loaded: LoadedPipeline | None = None
    try:
        with services.models.pinned(name) as loaded:
            yield loaded
    finally:
        if loaded is not None and loaded.quantization != "none":
            services.models.evict(name)


def _load_inputs(services: RunnerServices, run_id: int) -> RunInputs:
    with services.db.session() as s:
        run = s.get(TrainingRun, run_id)
        if run is None:
            raise JobFailed(f"training run {run_id} no longer exists")
        dataset = s.get(DatasetVersion, run.dataset_version_id)
        style = s.get(Style, run.style_id)
        assert dataset is not None and style is not None
        if dataset.status != DatasetStatus.APPROVED:
            raise JobFailed(
                f"dataset v{dataset.version} of '{style.name}' is not approved; "
                f"ask an art lead to approve it with ✅ on `/style review {style.name}`"
            )
        images = images_of(s, dataset.id)
        captions = effective_captions(s, [image.id for image in images])
        if dataset.content_hash and content_hash(images, captions) != dataset.content_hash:
            raise JobFailed(
                f"dataset v{dataset.version} of '{style.name}' changed after it was approved; "
                "review and approve it again"
            )
        items = [
            TrainItem(
                image=_open_blob(services, image.blob_sha256, image.position),
                caption=captions[image.id].text if image.id in captions else "",
            )
            for image in images
        ]
        return RunInputs(
            run_id=run.id,
            style_name=style.name,
            trigger=style.trigger,
            base_model=style.base_model,
            method=run.method,
            params=dict(run.params or {}),
            dataset_hash=dataset.content_hash or content_hash(images, captions),
            items=items,
        )


def _open_blob(services: RunnerServices, sha256: str, number: int) -> Path:
    """The reference's file, checked here so a damaged one is named by its number. Training
    decodes and downsizes one at a time: a run never holds all references at full size."""
    try:
        path = services.blobs.path(sha256)
        with Image.open(path) as image:
            image.verify()  # every PNG chunk's checksum, without decoding the pixels
            size = image.size
    except Exception as exc:
        raise JobFailed(
            f"reference image #{number} cannot be read ({type(exc).__name__}); "
            "drop it with ❌ on its card and approve the dataset again"
        ) from None
    check_shape(size, f"reference image #{number}")
    return path


def _config(inputs: RunInputs, loaded: LoadedPipeline) -> Any:
    params = dict(inputs.params)
    preset = params.pop("preset", None) or "style"
    defaults = (
        builtin_training(loaded.spec.source, inputs.method) if loaded.spec.kind == "builtin" else {}
    )
    if inputs.method != "textual_inversion":
        # The layer set asked for in chat; else the family's own layers unless the built-in
        # model's defaults name others (SD's equal LoraConfig's default, so their runs and
        # fingerprints are unchanged).
        layers = params.pop("layers", None)
        if layers is not None:
            try:  # the chat checked it against the configured family; this is the loaded one
                check_layer_set(loaded.family, layers)
            except MethodNotSupportedError as exc:
                raise ConfigError(str(exc)) from None
            defaults["target_modules"] = list(loaded.model_family.lora_layer_sets[layers])
        defaults.setdefault("target_modules", list(loaded.model_family.lora_targets))
    epochs = params.pop("epochs", None)
    if epochs is not None:  # steps from the dataset: every image `epochs` times (repeats 1)
        probe = make_config(
            inputs.method, loaded.family, preset, trigger=inputs.trigger, **{**defaults, **params}
        )
        per_step = probe.batch_size * probe.gradient_accumulation
        params["steps"] = epochs * math.ceil(len(inputs.items) / per_step)
    return make_config(
        inputs.method,
        loaded.family,
        preset,
        trigger=inputs.trigger,
        output_name=lora_file_stem(inputs.trigger),
        base_model_name=inputs.base_model,
        base_model_hash=loaded.model_hash,
        dataset_hash=inputs.dataset_hash,
        **{**defaults, **params},
    )


def _make_room(
    services: RunnerServices, inputs: RunInputs, loaded: LoadedPipeline, config: Any
) -> None:
    """Release other warm models first when the device lacks what this training needs."""
    need_mb = training_memory_mb(
        inputs.base_model,
        loaded.family,
        method=config.method,
        resolution=config.resolution,
        batch_size=config.batch_size,
        rank=getattr(config, "rank", None),
        gradient_checkpointing=config.gradient_checkpointing,
        quantize=getattr(config, "quantize", "none"),
    )
    if need_mb is not None:
        services.models.make_room(need_mb << 20, keep=loaded.name)


def _progress_reporter(services: RunnerServices, ctx: JobContext, inputs: RunInputs):  # type: ignore[no-untyped-def]
    def report(step: int, total: int, loss: float, extras: dict[str, Any]) -> None:
        failpoints.hit("mid_training")
        rate = extras.get("steps_per_s") or 0.0
        eta = f" · ETA {_duration((total - step) / rate)}" if rate > 0 else ""
        text = (
            f"Training **{inputs.style_name}**: step {step}/{total} · loss {loss:.4f}"
            f" · {rate:.1f} steps/s{eta}"
        )
        if "val_loss" in extras:
            which = "Held-out loss" if extras.get("held_out", True) else "Loss on the training set"
            text += f"\n{which} {extras['val_loss']:.4f} (base {extras['base_val_loss']:.4f})"
        samples = tuple(
            Attachment(services.blobs.put_bytes(Path(p).read_bytes()).sha256, Path(p).name)
            for p in extras.get("samples", [])
        )
        checkpoint = "checkpoint" in extras
        if checkpoint:
            _mark(services, inputs.run_id, status=RunStatus.RUNNING, checkpoint=step)
        ctx.progress(
            step,
            total,
            text,
            data={
                "loss": loss,
                **{k: v for k, v in extras.items() if isinstance(v, float)},
                # Whether the validation loss is on held-out images (front ends say which).
                **({"held_out": bool(extras["held_out"])} if "held_out" in extras else {}),
            },
            attachments=samples,
            force=bool(samples) or step == total,
        )

    return report


# At most this many generations per pause, so a stream of requests cannot stall training.
MAX_GENERATIONS_PER_PAUSE = 8


def _generation_server(services: RunnerServices, ctx: JobContext, loaded: LoadedPipeline):  # type: ignore[no-untyped-def]
    """Between steps, serve queued generations: those on the model being trained at once
    (it is loaded already), those on other models only at a checkpoint."""

    def serve(pause: PauseFn, at_checkpoint: bool) -> None:
        if ctx.run_nested is None:
            return
        models = services.models.names() if at_checkpoint else [loaded.name]
        for _ in range(MAX_GENERATIONS_PER_PAUSE):
            if ctx.should_stop():  # a stopping runner claims nothing more
                return
            job = services.queue.claim(
                ctx.worker_id,
                kinds=[JobKind.GENERATE],
                base_models=models,
                memory_mb=services.memory_mb,
            )
            if job is None:
                return
            with pause():  # the adapter owner hands the pipeline over with no adapter on
                ctx.run_nested(job)

    return serve


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _publish(
    services: RunnerServices,
    ctx: JobContext,
    inputs: RunInputs,
    loaded: LoadedPipeline,
    result: TrainResult,
) -> int:
    failpoints.hit("before_outputs")

    def put(path: Path | None) -> str | None:
        return None if path is None else services.blobs.put_bytes(path.read_bytes()).sha256

    report = result.report
    files = {
        "loss_curve": put(report.loss_curve if report else None),
        "grid": put(report.grid if report else None),
        "report_json": put(report.json if report else None),
        "checkpoints_grid": put(report.checkpoints if report else None),
        # The earlier checkpoints, as files a lead may pick instead (`/style use NAME STEP`).
        "checkpoints": [
            {
                "step": v.step,
                "val_loss": v.val_loss,
                "kohya_blob": put(v.kohya_path),
                "diffusers_blob": put(v.diffusers_path),
                "embedding_blob": put(v.embedding_path),
            }
            for v in result.step_versions
        ],
    }
    validation = {
        "base_val_loss": result.base_val_loss,
        "val_loss": result.val_loss,
        "val_improvement": result.val_improvement,
        "val_history": result.val_history,
        "held_out": result.held_out,
        "buckets": result.buckets,
        "step": result.final_step,
    }
    improvement = result.val_improvement
    which = "held-out loss" if result.held_out else "loss on the training images"
    summary = (
        f"{which} {result.val_loss:.4f} vs base {result.base_val_loss:.4f}"
        + (f" ({improvement:+.0%} better)" if improvement is not None else "")
        if result.val_loss is not None
        else "no held-out loss"
    )
    attachments = tuple(
        Attachment(sha, name)
        for sha, name in (
            (files["loss_curve"], "loss-curve.png"),
            (files["grid"], "base-vs-style.png"),
            (files["checkpoints_grid"], "checkpoints.png"),
        )
        if sha
    )
    blobs = {
        "kohya_blob": put(result.kohya_path),
        "diffusers_blob": put(result.diffusers_path),
        "embedding_blob": put(result.embedding_path),
    }
    for attempt in range(3):
        try:
            with services.db.session(write=True) as s:
                run = s.get(TrainingRun, inputs.run_id)
                assert run is not None
                latest = s.scalar(
                    select(func.max(ModelVersion.version)).where(
                        ModelVersion.style_id == run.style_id
                    )
                )
                number = (latest or 0) + 1
                version = ModelVersion(
                    style_id=run.style_id,
                    version=number,
                    training_run_id=run.id,
                    method=run.method,
                    base_model=inputs.base_model,
                    file_metadata={"base_model_hash": loaded.model_hash, **files},
                    validation=validation,
                    **blobs,
                )
                s.add(version)
                run.status = RunStatus.SUCCEEDED
                run.finished_at = utcnow()
                run.last_checkpoint_step = result.final_step
                run.metrics = {**validation, "loss_history": result.loss_history}
                s.flush()
                version_id = version.id
                # The messages commit with the model version: neither exists without the other.
                ctx.post(
                    progress_key(ctx.job.id),
                    f"Training **{inputs.style_name}**: done, "
                    f"{result.final_step}/{result.final_step} steps.",
                    session=s,
                )
                ctx.post(
                    result_key(ctx.job.id),
                    f"Style **{inputs.style_name}** v{number} is trained: {summary}"
                    + (f"; {buckets_text(result.buckets)}" if result.buckets else "")
                    + ".\n"
                    f"Use it with `/imagine {inputs.trigger} ...`; download it with "
                    f"`/style export {inputs.style_name}`. An art lead approves it with ✅ "
                    "on this message" + _checkpoints_text(inputs.style_name, result) + ".",
                    attachments=attachments,
                    session=s,
                    model_version_id=version_id,
                )
            break
        except IntegrityError:
            # Another runner published a version of this style at the same moment.
            if attempt == 2:
                raise
    failpoints.hit("after_outputs")
    return version_id


def _checkpoints_text(style: str, result: TrainResult) -> str:
    """How a lead picks an earlier checkpoint instead ("" when the run kept none)."""
    steps = [v.step for v in result.step_versions]
    if not steps:
        return ""
    listed = ", ".join(map(str, steps[:-1])) + (" and " if len(steps) > 1 else "") + str(steps[-1])
    rows = len(steps) + 1  # the final step is the grid's last row
    react = (
        f" or a reaction: {keycap(1)} for its first row, {keycap(min(rows, GRID_ROWS))} for "
        f"the {'last' if rows <= GRID_ROWS else f'{GRID_ROWS}th'}"
    )
    return (
        f", or picks an earlier checkpoint (steps {listed}; their samples are rows of "
        f"checkpoints.png) with `/style use {style} STEP`{react}"
    )


def _mark(
    services: RunnerServices,
    run_id: int,
    *,
    status: RunStatus,
    started: bool = False,
    checkpoint: int | None = None,
    error: str | None = None,
) -> None:
    with services.db.session(write=True) as s:
        run = s.get(TrainingRun, run_id)
        if run is None:
            return
        run.status = status
        if started and run.started_at is None:
            run.started_at = utcnow()
        if checkpoint is not None:
            run.last_checkpoint_step = checkpoint
        if error is not None:
            run.error = error
            run.finished_at = utcnow()
