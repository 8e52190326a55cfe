"""Everything a runner process holds for its lifetime, built once from settings."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gpu_runner.devices import (
    DeviceChoice,
    device_memory_bytes,
    free_memory_bytes,
    pin_device,
    resolve_device,
)
from gpu_runner.generation import Generator
from gpu_runner.pipelines import BUILTIN_MODELS, BaseModelSpec, PipelineCache
from storage.blobs import BlobStore
from storage.db import Database
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.settings import Settings


@dataclass
class RunnerServices:
    settings: Settings
    db: Database
    queue: JobQueue
    outbox: Outbox
    blobs: BlobStore
    device: DeviceChoice
    models: PipelineCache
    generator: Generator

    @property
    def runs_dir(self) -> Path:
        """Checkpoints and training outputs, one folder per training run."""
        return self.settings.data_dir / "runs"

    @property
    def memory_mb(self) -> int:
        """Memory a job could have on this device now (MiB): jobs needing more are left to
        other runners. Read at each claim, since other programs come and go on a GPU.

        On a GPU: what is free, plus this runner's warm models. A job on a warm model finds
        its weights already there (its estimate counts them), and one on a cold model gets
        the room of unpinned warm models by eviction; only a cold model claimed while a
        training pins another can find less than this (the generator reports that OOM).
        On CPU/MPS: all of RAM, where the OS pages and no limit applies.
        """
        free = free_memory_bytes(self.device)
        if free is None:
            return device_memory_bytes(self.device) >> 20
        total = device_memory_bytes(self.device)
        return min(total, free + self.models.used_bytes) >> 20

    def adapter_file(self, sha256: str) -> Path:
        """A `.safetensors` name for a stored adapter blob (loaders go by the suffix)."""
        target = self.settings.data_dir / "adapters" / f"{sha256}.safetensors"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.blobs.path(sha256)
            try:
                os.link(source, target)  # same bytes, no copy
            except FileExistsError:
                pass
            except OSError:
                shutil.copyfile(source, target)
        return target


def base_model_specs(settings: Settings) -> list[BaseModelSpec]:
    specs = {name: BaseModelSpec(name=name, source=name) for name in BUILTIN_MODELS}
    for name, value in settings.base_models.items():
        specs[name] = BaseModelSpec.from_config(name, value)
    return list(specs.values())


def open_services(settings: Settings, *, device: str | None = None) -> RunnerServices:
    db = Database(settings.database_url)
    db.prepare(auto_migrate=settings.auto_migrate)
    choice = resolve_device(device or settings.device)
    pin_device(choice)  # before anything touches CUDA, so nothing lands on GPU 0
    models = PipelineCache(base_model_specs(settings), choice, settings.model_cache_bytes)
    return RunnerServices(
        settings=settings,
        db=db,
        queue=JobQueue(db),
        outbox=Outbox(db),
        blobs=BlobStore(settings.blob_dir, settings.max_blob_bytes),
        device=choice,
        models=models,
        generator=Generator(models),
    )
