"""The `import` job: a team's existing LoRA (or embedding) file becomes a model version.

The file is checked the way the generator checks adapters (gpu_runner.lora_import: only
safetensors, header parsed by hand, pickles in disguise refused, LyCORIS and checkpoints
refused) and its family must match the style's base model. What its header says (trigger
phrase, base, training settings) is stored and shown; a lead approves it with ✅ on the
result message, as for a trained version.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from gpu_runner.lora_import import (
    FAMILY_LABELS,
    LoraImportError,
    inspect_adapter_file,
    read_safetensors_header,
)
from gpu_runner.services import RunnerServices
from gpu_runner.worker import JobContext, JobFailed
from storage.families import model_family
from storage.job_payloads import ImportPayload, result_key
from storage.models import ModelVersion, Style, TrainingMethod

# Header keys worth showing (kohya's ss_* and the modelspec.* standard), in this order.
SHOWN_METADATA: dict[str, str] = {
    "modelspec.trigger_phrase": "trigger phrase",
    "modelspec.title": "title",
    "modelspec.architecture": "architecture",
    "ss_base_model_version": "base",
    "ss_sd_model_name": "trained on",
    "ss_network_module": "network",
    "ss_network_dim": "rank",
    "ss_network_alpha": "alpha",
    "ss_learning_rate": "learning rate",
    "ss_max_train_steps": "steps",
    "ss_num_epochs": "epochs",
    "ss_resolution": "resolution",
    "ss_num_train_images": "images",
}
MAX_VALUE = 120


def run_import(services: RunnerServices, ctx: JobContext) -> dict[str, Any]:
    payload = ImportPayload.model_validate(ctx.job.payload)
    with services.db.session() as s:
        style = s.get(Style, payload.style_id)
        if style is None or style.team_id != payload.reply.team_id:
            raise JobFailed("the style to import into no longer exists")
        name, trigger, base = style.name, style.trigger, style.base_model
    if not services.blobs.exists(payload.blob_sha256):
        raise JobFailed(f"{payload.filename} is missing from the data folder; attach it again")
    path = services.adapter_file(payload.blob_sha256)
    try:
        info = inspect_adapter_file(path)
        header = read_safetensors_header(path)
    except LoraImportError as exc:
        raise JobFailed(str(exc).replace(path.name, payload.filename)) from None
    want = model_family(base, services.settings.base_models)
    if info.family is not None and info.family != want:
        raise JobFailed(
            f"{payload.filename} was made for {FAMILY_LABELS[info.family]}, but {name} is on "
            f"{base} ({FAMILY_LABELS[want]}); import it into a style on a "
            f"{FAMILY_LABELS[info.family]} base (`/style import NEWNAME TRIGGER base=...`)"
        )
    shown = {
        label: header.metadata[key][:MAX_VALUE]
        for key, label in SHOWN_METADATA.items()
        if header.metadata.get(key)
    }
    method = TrainingMethod.TEXTUAL_INVERSION if info.kind == "embedding" else TrainingMethod.LORA
    blob_field = "embedding_blob" if info.kind == "embedding" else "kohya_blob"
    for attempt in range(3):
        try:
            with services.db.session(write=True) as s:
                latest = s.scalar(
                    select(func.max(ModelVersion.version)).where(
                        ModelVersion.style_id == payload.style_id
                    )
                )
                number = (latest or 0) + 1
                version = ModelVersion(
                    style_id=payload.style_id,
                    version=number,
                    method=method,
                    base_model=base,
                    file_metadata={
                        "imported_from": payload.filename,
                        "header": shown,
                        "family": info.family,
                    },
                    validation={"imported": True},
                    **{blob_field: payload.blob_sha256},
                )
                s.add(version)
                s.flush()
                version_id = version.id
                ctx.post(
                    result_key(ctx.job.id),
                    _text(name, number, trigger, payload.filename, info.family, shown),
                    session=s,
                    model_version_id=version_id,
                    kind="model_version",
                )
            break
        except IntegrityError:
            if attempt == 2:
                raise
    return {"model_version_id": version_id, "version": number, "metadata": shown}


def _text(
    style: str, number: int, trigger: str, filename: str, family: str | None, shown: dict
) -> str:
    made_for = FAMILY_LABELS.get(family or "", "an unknown family")
    lines = [
        f"📦 Imported {filename} as **{style}** v{number} ({made_for}).",
        *(f"{label}: {value}" for label, value in shown.items()),
    ]
    phrase = shown.get("trigger phrase")
    if phrase and trigger.lower() not in phrase.lower():
        lines.append(
            f"⚠ Its header's trigger phrase is “{phrase}”, not `{trigger}`; Atelier applies it "
            f"for `{trigger}` in a prompt."
        )
    lines.append(
        f"An art lead approves it with ✅ on this message; until then `{trigger}` uses it "
        "only where no approved version exists."
    )
    return "\n".join(lines)
