"""FLUX.1 [dev] through chat and the runner's jobs, on SQLite and PostgreSQL: a style on
tiny-flux1 is created, approved and trained by chat commands; /imagine renders it with the
family's sampler and guidance, compares it with the base, batches, combines it with an
imported LoRA and switches it off again without a reload; an import checks the file's family
against the style's. A configured FLUX.1 base takes styles, refuses textual inversion with
the methods it has, and queues training with the family's memory estimate."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bot_fixtures import LEAD, build_rig, command, images, mem_file, reaction
from PIL import Image
from sqlalchemy import select
from test_runner_chat import Chat

from storage.db import Database
from storage.job_payloads import JobKind, result_key
from storage.models import DatasetVersion, Generation, JobStatus, ModelVersion, Style

pytest_plugins = ("runner_fixtures", "bot_fixtures")
pytestmark = pytest.mark.runner

BASE = "tiny-flux1"


@pytest.fixture
def chat(db_url: str, tmp_path: Path, tiny_builders: Any) -> Chat:
    data = tmp_path / "data"
    data.mkdir()
    return Chat(data, database_url=db_url, default_base_model=BASE)


def _approve_dataset(chat: Chat, style: str) -> None:
    with chat.services.db.session() as s:
        style_id = s.scalar(select(Style.id).where(Style.name == style))
        dataset_id = s.scalar(select(DatasetVersion.id).where(DatasetVersion.style_id == style_id))
    chat.deliverer.deliver_due()
    ts = chat.sender.id_of(f"review:dataset:{dataset_id}")
    assert "approved" in chat.core.handle_reaction(reaction(ts, "✅", user=LEAD))[0].text


def _imagine(chat: Chat, text: str) -> tuple[Generation, Any]:
    assert "Queued" in chat.say("/imagine", text)
    chat.work()
    with chat.services.db.session() as s:
        generation = s.scalars(select(Generation).order_by(Generation.id.desc())).first()
    assert generation is not None
    return generation, chat.services.outbox.get(result_key(generation.job_id))


def _png(chat: Chat, blob: str) -> Image.Image:
    png = Image.open(io.BytesIO(chat.services.blobs.read_bytes(blob)))
    png.load()
    return png


def test_a_flux1_style_trains_and_renders_through_chat(chat: Chat) -> None:
    from gpu_runner.png_metadata import parse_parameters

    base, _ = _imagine(chat, "a harbour seed=7 steps=2")
    assert "Created style **ink**" in chat.say("/style", f"create ink inkstyle style {BASE}")
    chat.core.handle(command("style add", {"name": "ink"}, files=images(*range(1, 7))))
    chat.say("/style", "review ink", user=LEAD)
    _approve_dataset(chat, "ink")
    assert "Training **ink**" in chat.say("/style", "train ink steps=10")
    chat.work()
    with chat.services.db.session() as s:
        (version,) = s.scalars(select(ModelVersion))
    raw = chat.services.blobs.read_bytes(version.kohya_blob)
    meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.trigger_phrase"] == "inkstyle"
    pipe = chat.services.models.get(BASE).pipe

    styled, message = _imagine(chat, "inkstyle, a harbour neg=blurry seed=7 steps=2")
    png = _png(chat, styled.image_blobs[0])
    parsed = parse_parameters(png.text["parameters"])
    assert (parsed["seed"], parsed["steps"], parsed["size"]) == (7, 2, (64, 64))
    # The family's sampler and its guidance (the dev model's embedding), not SD's CFG 7.
    assert parsed["sampler"] == "Euler" and parsed["cfg"] == 3.5 and parsed["model"] == BASE
    assert "<lora:" in png.text["parameters"]
    record = json.loads(png.text["atelier"])
    assert record["base_model"]["family"] == "flux1"
    assert "Negative prompt ignored: FLUX.1" in message.text and record["negative_prompt"] == ""
    plain = np.asarray(_png(chat, base.image_blobs[0]))
    assert not np.array_equal(plain, np.asarray(png))

    # compare: base and style side by side on one seed.
    _, message = _imagine(chat, "inkstyle, a harbour seed=7 steps=2 compare=yes")
    (pair,) = message.attachments
    pixels = np.asarray(_png(chat, pair.blob_sha256))
    assert pixels.shape[:2] == (64, 128)
    np.testing.assert_array_equal(pixels[:, 64:], np.asarray(png))  # the style, as before
    assert not np.array_equal(pixels[:, :64], pixels[:, 64:])  # the base: adapters off

    # A batch: two images of the style in one request.
    batch, _ = _imagine(chat, "inkstyle, a harbour seed=7 steps=2 count=2")
    assert len(batch.image_blobs) == 2 and batch.image_blobs[0] != batch.image_blobs[1]

    # Combining: the style's diffusers file imported as a second style on the same base.
    lora = mem_file("team-ink.safetensors", chat.services.blobs.read_bytes(version.diffusers_blob))
    assert "Created style **wash**" in chat.say(
        "/style", f"import wash washword base={BASE}", files=[lora]
    )
    chat.work()
    both, _ = _imagine(chat, "inkstyle, washword, a harbour seed=7 steps=2")
    names = [
        a["name"] for a in json.loads(_png(chat, both.image_blobs[0]).text["atelier"])["adapters"]
    ]
    assert sorted(names) == ["ink", "wash"]
    assert not np.array_equal(np.asarray(_png(chat, both.image_blobs[0])), np.asarray(png))

    # The same file is refused for a FLUX.2 [klein] style: its keys say FLUX.1.
    chat.say("/style", "import kleinwash kleinword base=tiny-flux2-klein", files=[lora])
    chat.work()
    job = max(
        (j for j in chat.services.queue.list_jobs() if j.kind == "import"), key=lambda j: j.id
    )
    assert job.status == JobStatus.FAILED
    assert "made for FLUX.1, but kleinwash is on tiny-flux2-klein" in (job.error or "")

    again, _ = _imagine(chat, "a harbour seed=7 steps=2")
    np.testing.assert_array_equal(np.asarray(_png(chat, again.image_blobs[0])), plain)
    assert chat.services.models.get(BASE).pipe is pipe  # never reloaded


def test_a_configured_flux1_base_takes_styles_and_refuses_textual_inversion(
    db: Database, tmp_path: Path
) -> None:
    from storage.families import memory_needed_mb

    configured = {"flux1": {"source": "/models/FLUX.1-dev", "family": "flux1"}}
    rig = build_rig(db, tmp_path, base_models=configured, default_base_model="flux1")
    # /imagine on it: FluxPipeline's own defaults, the shape at FLUX.1's native area.
    assert "Queued" in rig.say("/imagine", "a harbour ar=16:9")
    (job,) = rig.jobs("generate")
    settings = {k: job.payload[k] for k in ("width", "height", "steps", "cfg", "sampler")}
    assert settings == {"width": 1344, "height": 768, "steps": 28, "cfg": 3.5, "sampler": "Euler"}
    assert job.min_memory_mb == memory_needed_mb(
        JobKind.GENERATE, "flux1", configured, width=1344, height=768
    )
    text = rig.say("/style", "create ink inkstyle style flux1")
    assert "Created style **ink** with trigger `inkstyle` on flux1" in text
    rig.run("style add", {"name": "ink"}, files=images(1, 2, 3))
    rig.run("style review", {"name": "ink"})
    rig.react(f"review:dataset:{rig.datasets('ink')[-1].id}", "✅", user=LEAD)
    refused = rig.say("/style", "train ink method=ti")
    assert (
        "ink is on flux1: FLUX.1 base models cannot train textual inversion; "
        "use method=lora or method=dora." in refused
    )
    assert rig.jobs("train") == []
    assert "Training **ink**" in rig.say("/style", "train ink")
    (job,) = rig.jobs("train")
    assert job.min_memory_mb == memory_needed_mb(JobKind.TRAIN, "flux1", configured)
