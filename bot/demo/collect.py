"""What the report shows, read back from the database, the blob store and the chat's files.

Seeds and settings come from what Atelier recorded (the result message and the Generation
row); each image's `parameters` text is read from the PNG itself, so the report shows both
and anyone can check that they agree.
"""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import select

from bot.demo.report import ReportFile, ReportGeneration, ReportImage, ReportTraining
from bot.demo.transcript import Entry
from storage.blobs import BlobStore
from storage.db import Database
from storage.job_payloads import result_key
from storage.models import Generation, ModelVersion, OutboxMessage, Style, TrainingRun


def png_parameters(data: bytes) -> str:
    """The A1111 `parameters` text chunk of a PNG ("" when there is none)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # text chunks after the image data are read only on load
        return str(getattr(image, "text", {}).get("parameters", ""))


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header (no tensors are read)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path.name} is not a safetensors file")
        header: dict[str, Any] = json.loads(f.read(length))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def generation(db: Database, blobs: BlobStore, job_id: int) -> ReportGeneration:
    """The images a generate job posted, each with the seed Atelier recorded for it."""
    with db.session() as s:
        message = s.scalar(select(OutboxMessage).where(OutboxMessage.key == result_key(job_id)))
        row = s.scalar(select(Generation).where(Generation.job_id == job_id))
        if message is None or row is None:
            raise LookupError(f"job {job_id} has no recorded result")
        extra = dict(message.extra or {})
        attachments = list(message.attachments or [])
        loras = ", ".join(f"{a.get('name', '?')}:{a.get('weight', 1):g}" for a in _named(row))
        settings = (
            f"{row.steps} steps · CFG {row.cfg:g} · {row.width}x{row.height} · {row.sampler} · "
            f"model {row.base_model} · LoRA {loras or 'none'}"
        )
        prompt, compare = row.prompt, _is_compare(attachments)
    seeds = [int(seed) for seed in extra.get("seed", [])]
    if len(seeds) != len(attachments):
        raise LookupError(f"job {job_id} recorded {len(seeds)} seeds for {len(attachments)} images")
    images = []
    for seed, attachment in zip(seeds, attachments, strict=True):
        data = blobs.read_bytes(attachment["blob_sha256"])
        images.append(
            ReportImage(
                filename=str(attachment["filename"]),
                data=data,
                seed=seed,
                parameters=png_parameters(data),
            )
        )
    return ReportGeneration(job_id, prompt, settings, compare, tuple(images))


def _named(row: Generation) -> list[dict[str, Any]]:
    """The generation's adapters with style names (the row holds model version ids)."""
    return [dict(a) for a in row.record.get("adapters", [])] if row.record else []


def _is_compare(attachments: list[dict[str, Any]]) -> bool:
    return any(str(a.get("filename", "")).endswith("-base-vs-style.png") for a in attachments)


def training(db: Database, blobs: BlobStore, job_id: int, seconds: float) -> ReportTraining:
    with db.session() as s:
        run = s.scalar(select(TrainingRun).where(TrainingRun.job_id == job_id))
        if run is None:
            raise LookupError(f"job {job_id} has no training run")
        version = s.scalar(select(ModelVersion).where(ModelVersion.training_run_id == run.id))
        style = s.get(Style, run.style_id)
        assert style is not None
        metrics = dict(run.metrics or {})
        files = dict(version.file_metadata or {}) if version else {}
        number = version.version if version else 0
        steps = int(run.last_checkpoint_step or run.params.get("steps") or 0)
        name, trigger = style.name, style.trigger

    def blob(key: str) -> bytes | None:
        sha = files.get(key)
        return blobs.read_bytes(sha) if sha and blobs.exists(sha) else None

    return ReportTraining(
        style=name,
        trigger=trigger,
        version=number,
        steps=steps,
        base_val_loss=metrics.get("base_val_loss"),
        val_loss=metrics.get("val_loss"),
        seconds=seconds,
        loss_curve=blob("loss_curve"),
        grid=blob("grid"),
        held_out=bool(metrics.get("held_out", True)),
    )


_NUMBERED = re.compile(r"^\d{4}-")
_NOTE = re.compile(r"^• (?P<name>[^:]+): (?P<note>.+)$", re.MULTILINE)


def exports(entry: Entry) -> list[ReportFile]:
    """The files of the `/style export` reply, under the names the chat offered them."""
    notes = {m.group("name"): m.group("note") for m in _NOTE.finditer(entry.text)}
    out: list[ReportFile] = []
    for path in entry.files:
        name = _NUMBERED.sub("", path.name)
        metadata = {}
        if path.suffix == ".safetensors":
            meta = safetensors_metadata(path)
            metadata = {k: v for k, v in sorted(meta.items()) if k.startswith("modelspec.")}
        out.append(ReportFile(path, name, notes.get(name, ""), metadata))
    return out
