"""Z-Image through chat and the runner's jobs on its tiny model, on SQLite and PostgreSQL: a
style on tiny-zimage is created, approved and trained from chat (textual inversion refused,
a generation served while it trains), `/imagine` makes images with their parameters
recorded, the LoRA changes them, combines with an imported one, compares and batches, and
switches off without a reload; a training killed after a checkpoint resumes from it."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bot_fixtures import LEAD, MEMBER, images, mem_file, reaction
from PIL import Image
from runner_fixtures import make_runner
from runner_seed import approved_style, enqueue_training
from sqlalchemy import select
from test_runner_chat import Chat
from test_runner_jobs import _restart_after_crash, _run_until_killed

from storage.job_payloads import result_key
from storage.models import Generation, Job, JobStatus, ModelVersion
from storage.settings import load_settings
from storage.work_signal import open_work_signal

pytest_plugins = ("runner_fixtures",)
pytestmark = pytest.mark.runner

BASE = "tiny-zimage"
MATE = "U2"  # a second member: chat allows one person 12 commands a minute


@pytest.fixture
def chat(tmp_path: Path, db_url: str, tiny_builders: Any) -> Chat:
    data = tmp_path / "data"
    data.mkdir()
    # Generations without a style run on the default base: Z-Image's tiny model.
    return Chat(data, database_url=db_url, default_base_model=BASE)


def _png(chat: Chat, generation: Generation, index: int = 0) -> Image.Image:
    png = Image.open(io.BytesIO(chat.services.blobs.read_bytes(generation.image_blobs[index])))
    png.load()
    return png


def _pixels(chat: Chat, generation: Generation, index: int = 0) -> np.ndarray:
    return np.asarray(_png(chat, generation, index)).astype(int)


def _imagine(chat: Chat, text: str, user: str = MEMBER) -> Generation:
    assert "Queued" in chat.say("/imagine", text, user=user)
    chat.work()
    generation = chat.generations()[-1]
    job = chat.services.queue.get(generation.job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    return generation


def _train_serving_a_generation(chat: Chat) -> tuple[Job, Job]:
    """`/style train` runs; a quick `/imagine` queued once it has begun is served between
    two of its steps (the runner pauses the training for it)."""
    assert "Training **ink**" in chat.say("/style", "train ink steps=30")
    (train_job,) = [j for j in chat.services.queue.list_jobs() if j.kind == "train"]
    worker = threading.Thread(target=chat.runner.run_once)
    worker.start()
    wake = open_work_signal(chat.services.db)
    try:
        while not chat.services.queue.progress(train_job.id) and worker.is_alive():
            wake.wait(0.5)
    finally:
        wake.close()
    assert "Queued" in chat.say("/imagine", "a quiet harbour seed=99 steps=2")
    worker.join(timeout=300)
    chat.deliverer.deliver_due()
    (served,) = [j for j in chat.services.queue.list_jobs() if j.kind == "generate"]
    return chat.services.queue.get(train_job.id), chat.services.queue.get(served.id)


def test_a_zimage_style_trains_from_chat_and_its_lora_renders(chat: Chat) -> None:
    from gpu_runner.png_metadata import parse_parameters

    assert "Created style **ink**" in chat.say("/style", f"create ink inkstyle style {BASE}")
    chat.core.handle(_add(images(*range(1, 9))))
    chat.say("/style", "review ink", user=LEAD)
    chat.deliverer.deliver_due()
    dataset_key = next(i.key for _, i, _ in chat.sender.posts if i.key.startswith("review:"))
    (approved,) = chat.core.handle_reaction(reaction(chat.sender.id_of(dataset_key), "✅"))
    assert "approved" in approved.text
    refused = chat.say("/style", "train ink method=ti")
    assert "Z-Image base models cannot train textual inversion; use method=lora or" in refused

    training, served = _train_serving_a_generation(chat)
    assert training.status == JobStatus.SUCCEEDED, training.error
    assert served.status == JobStatus.SUCCEEDED, served.error
    assert training.started_at < served.finished_at < training.finished_at
    with chat.services.db.session() as s:
        version = s.scalar(select(ModelVersion))
    raw = chat.services.blobs.read_bytes(version.kohya_blob)
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = header.pop("__metadata__")
    assert meta["modelspec.architecture"] == "Z-Image/lora"
    assert meta["modelspec.trigger_phrase"] == "inkstyle"
    assert header and all(k.startswith("diffusion_model.") for k in header)

    base = _imagine(chat, "a harbour seed=7 steps=2 negative=blurry")
    parsed = parse_parameters(_png(chat, base).text["parameters"])
    assert (parsed["seed"], parsed["steps"], parsed["size"]) == (7, 2, (64, 64))
    assert parsed["sampler"] == "Euler" and parsed["cfg"] == 5.0 and parsed["model"] == BASE
    assert base.record["base_model"]["family"] == "zimage"
    # Z-Image's pipeline takes a negative prompt: it is used and recorded, no notice.
    assert base.record["negative_prompt"] == "blurry" and not base.record.get("notices")
    assert parsed["negative"] == "blurry"
    # Served mid-training with the training adapter off: an idle runner's pixels.
    quiet = _imagine(chat, "a quiet harbour seed=99 steps=2", MATE)
    (mid,) = [g for g in chat.generations() if g.job_id == served.id]
    assert np.array_equal(_pixels(chat, quiet), _pixels(chat, mid))
    pipe = chat.services.models.get(BASE).pipe

    styled = _imagine(chat, "inkstyle, a harbour seed=7 steps=2 negative=blurry")
    assert [a["name"] for a in styled.adapters] == ["ink"]
    assert "<lora:" in _png(chat, styled).text["parameters"]
    assert not np.array_equal(_pixels(chat, base), _pixels(chat, styled))
    # A batch: consecutive seeds in one pipeline call, the first as it renders alone (a
    # batched image may differ by one level).
    batch = _imagine(chat, "inkstyle, a harbour seed=7 steps=2 negative=blurry count=2")
    assert len(batch.image_blobs) == 2
    assert np.abs(_pixels(chat, batch) - _pixels(chat, styled)).max() <= 1
    assert not np.array_equal(_pixels(chat, batch), _pixels(chat, batch, 1))

    compared = _imagine(chat, "inkstyle, a harbour seed=7 steps=2 negative=blurry compare=yes")
    (shown,) = chat.services.outbox.get(result_key(compared.job_id)).attachments
    assert shown.filename.endswith("-base-vs-style.png")
    pair = Image.open(io.BytesIO(chat.services.blobs.read_bytes(shown.blob_sha256)))
    assert pair.size == (128, 64)
    halves = np.asarray(pair).astype(int)
    assert np.abs(halves[:, 64:] - _pixels(chat, styled)).max() <= 1  # the style's side
    assert np.abs(halves[:, :64] - halves[:, 64:]).max() > 10  # the base's differs

    # Vary and Upscale: image-to-image on Z-Image's own img2img pipeline, styles kept.
    assert "Variation" in chat.press("vary-subtle", styled.id)
    assert "Upscale ×2" in chat.press("upscale", styled.id)
    chat.work()
    vary, upscale = chat.generations()[-2:]
    assert (vary.mode, upscale.mode) == ("vary", "upscale")
    assert [a["name"] for a in upscale.adapters] == ["ink"]
    assert _png(chat, upscale).size == (128, 128) and _png(chat, vary).size == (64, 64)
    assert not np.array_equal(_pixels(chat, vary), _pixels(chat, styled))

    # A teammate imports the same file as a second Z-Image style; both combine in one prompt.
    lora = mem_file("wash.safetensors", raw)
    chat.say("/style", f"import wash washstyle base={BASE}", files=[lora], user=MATE)
    chat.work()
    (imported,) = [j for j in chat.services.queue.list_jobs() if j.kind == "import"]
    assert imported.status == JobStatus.SUCCEEDED, imported.error
    assert "(Z-Image)" in chat.services.outbox.get(result_key(imported.id)).text
    both = _imagine(chat, "inkstyle washstyle, a harbour seed=7 steps=2 negative=blurry", MATE)
    assert sorted(a["name"] for a in both.adapters) == ["ink", "wash"]
    assert not np.array_equal(_pixels(chat, both), _pixels(chat, styled))
    # An SD1.5 style refuses it, naming the family the file was made for.
    chat.say("/style", "import sdink sdinkstyle base=tiny-sd15", files=[lora], user=MATE)
    chat.work()
    imports = [j for j in chat.services.queue.list_jobs() if j.kind == "import"]
    refused_import = max(imports, key=lambda j: j.id)
    assert refused_import.status == JobStatus.FAILED
    assert "made for Z-Image" in (refused_import.error or "")

    again = _imagine(chat, "a harbour seed=7 steps=2 negative=blurry", MATE)
    assert np.array_equal(_pixels(chat, base), _pixels(chat, again))
    assert chat.services.models.get(BASE).pipe is pipe  # never reloaded


def _add(files: list[Any]) -> Any:
    from bot_fixtures import command

    return command("style add", {"name": "ink"}, files=files)


def test_a_zimage_training_killed_after_a_checkpoint_resumes_from_it(
    tmp_path: Path, db_url: str, tiny_builders: Any, demo_items: list[tuple[Any, str]]
) -> None:
    from gpu_runner.services import open_services

    data = tmp_path / "data"
    data.mkdir()
    services = open_services(load_settings(data_dir=data, database_url=db_url, device="cpu"))
    style_id = approved_style(services, demo_items, base_model=BASE)
    run_id, job_id = enqueue_training(services, style_id, steps=20, checkpoint_every=10)
    crashed = _run_until_killed(data, "after_checkpoint", database_url=db_url)
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    job = _restart_after_crash(services, job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 2, job.error
    assert job.result.get("resumed_from") == 10  # not from step 0
    with services.db.session() as s:
        versions = list(
            s.scalars(select(ModelVersion).where(ModelVersion.training_run_id == run_id))
        )
    assert len(versions) == 1 and versions[0].base_model == BASE
    assert make_runner(services).run_once() is False
