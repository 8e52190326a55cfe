"""Job handlers by kind: each takes the runner's services and a job context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpu_runner.jobs.caption import run_caption
from gpu_runner.jobs.generate import run_generate
from gpu_runner.jobs.import_lora import run_import
from gpu_runner.jobs.train import run_train
from gpu_runner.services import RunnerServices
from gpu_runner.worker import JobContext
from storage.job_payloads import JobKind

handlers: dict[str, Callable[[RunnerServices, JobContext], dict[str, Any]]] = {
    JobKind.TRAIN: run_train,
    JobKind.GENERATE: run_generate,
    JobKind.CAPTION: run_caption,
    JobKind.IMPORT: run_import,
}
