"""Qwen-Image through the chat commands and the runner's jobs on its tiny model, on SQLite and
PostgreSQL: `/style create ... style tiny-qwenimage`, a lead's approval, `/style train`
(textual inversion refused by name), then `/imagine` with the family's sampler defaults,
trigger words, two LoRAs combined, compare and a batch of two, adapters switched without
reloading the pipeline, a team's LoRA file imported by its family, and a quick generation
served while a training pauses."""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bot_fixtures import LEAD, build_rig, images, mem_file
from PIL import Image
from runner_fixtures import make_runner
from sqlalchemy import select

from bot.core.policy import CorePolicy
from storage.db import Database
from storage.job_payloads import result_key
from storage.models import Generation, JobStatus, ModelVersion
from storage.settings import load_settings

pytest_plugins = ("runner_fixtures", "bot_fixtures")
pytestmark = pytest.mark.runner

BASE = "tiny-qwenimage"


class Studio:
    """The bot's command core (bot_fixtures' rig) and a runner in this process, on one data
    folder and one database; /imagine without a trigger draws on tiny-qwenimage."""

    def __init__(self, db: Database, db_url: str, tmp: Path) -> None:
        from gpu_runner.services import open_services

        # A whole session's commands within the fake clock's one minute.
        policy = CorePolicy(rate_limit_commands=100)
        self.rig = build_rig(db, tmp, policy=policy, default_base_model=BASE)
        config = load_settings(
            data_dir=self.rig.settings.data_dir, database_url=db_url, device="cpu"
        )
        self.services = open_services(config)

    def say(self, slash: str, text: str, **kw: Any) -> str:
        return self.rig.say(slash, text, **kw)

    def work(self) -> None:
        runner = make_runner(self.services)
        while runner.run_once():
            pass
        self.rig.deliverer.deliver_due()

    def style(self, name: str, trigger: str, seeds: tuple[int, ...], steps: int) -> ModelVersion:
        """A style on tiny-qwenimage made, filled, approved and trained from chat."""
        created = self.say("/style", f"create {name} {trigger} style {BASE}")
        assert f"with trigger `{trigger}` on {BASE}" in created, created
        self.rig.run("style add", {"name": name}, files=images(*seeds))
        self.rig.run("style review", {"name": name})
        dataset = self.rig.datasets(name)[-1]
        approved = self.rig.react(f"review:dataset:{dataset.id}", "✅", user=LEAD)
        assert "approved" in approved[0].text
        queued = self.say("/style", f"train {name} steps={steps}", user=LEAD)
        assert f"Training **{name}** (lora" in queued and f"base {BASE}: job #" in queued
        self.work()
        (job,) = [j for j in self.services.queue.list_jobs() if j.kind == "train"][-1:]
        assert job.status == JobStatus.SUCCEEDED, job.error
        style_id = self.rig.style(name).id
        with self.services.db.session() as s:
            return s.scalar(select(ModelVersion).where(ModelVersion.style_id == style_id))

    def imagine(self, text: str) -> tuple[Generation, Any]:
        """The generation a /imagine makes and its result message."""
        assert "Queued" in (said := self.say("/imagine", text)), said
        self.work()
        with self.services.db.session() as s:
            generation = s.scalars(select(Generation).order_by(Generation.id.desc())).first()
        assert generation is not None
        return generation, self.services.outbox.get(result_key(generation.job_id))

    def png(self, blob: str) -> Image.Image:
        image = Image.open(io.BytesIO(self.services.blobs.read_bytes(blob)))
        image.load()
        return image


@pytest.fixture
def studio(db: Database, db_url: str, tmp_path: Path, tiny_builders: Any) -> Studio:
    return Studio(db, db_url, tmp_path)


def _header(studio: Studio, blob: str) -> dict[str, str]:
    raw = studio.services.blobs.read_bytes(blob)
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]


def test_a_qwen_image_style_trains_and_generates_from_chat(studio: Studio) -> None:
    from gpu_runner.png_metadata import parse_parameters

    ink = studio.style("ink", "inkstyle", (1, 2, 3, 4, 5, 6), steps=16)
    assert ink.base_model == BASE and ink.method == "lora"
    header = _header(studio, ink.kohya_blob)
    assert header["modelspec.architecture"] == "Qwen-Image/lora"
    assert header["modelspec.trigger_phrase"] == "inkstyle"
    # The base it was trained on (the weights' sha256, as loaded) and its dataset's hash.
    assert header["ss_new_sd_model_hash"] == studio.services.models.get(BASE).model_hash
    assert re.fullmatch(r"[0-9a-f]{64}", header["atelier.dataset_hash"])
    refused = studio.say("/style", "train ink method=ti", user=LEAD)
    assert "Qwen-Image base models cannot train textual inversion" in refused
    assert "use method=lora or method=dora" in refused

    base, message = studio.imagine("a harbour seed=7 steps=4 negative=blurry")
    parsed = parse_parameters(studio.png(base.image_blobs[0]).text["parameters"])
    # The family's own defaults where the person said nothing: Euler and CFG 4 (true CFG).
    assert (parsed["seed"], parsed["steps"], parsed["size"]) == (7, 4, (64, 64))
    assert (parsed["sampler"], parsed["cfg"], parsed["model"]) == ("Euler", 4.0, BASE)
    assert parsed["negative"] == "blurry"  # Qwen-Image takes a negative prompt
    assert base.record["base_model"]["family"] == "qwenimage" and not base.adapters
    assert "Negative prompt ignored" not in message.text
    pipe = studio.services.models.get(BASE).pipe
    plain = np.asarray(studio.png(base.image_blobs[0]))

    styled, _ = studio.imagine("inkstyle, a harbour seed=7 steps=4 negative=blurry")
    assert [a["name"] for a in styled.adapters] == ["ink"]
    assert "<lora:inkstyle:1>" in studio.png(styled.image_blobs[0]).text["parameters"]
    inked = np.asarray(studio.png(styled.image_blobs[0]))
    assert not np.array_equal(plain, inked)

    again, _ = studio.imagine("a harbour seed=7 steps=4 negative=blurry")
    np.testing.assert_array_equal(plain, np.asarray(studio.png(again.image_blobs[0])))
    assert studio.services.models.get(BASE).pipe is pipe  # switched off, never reloaded

    # Two styles combined: both adapters at once change the image again.
    studio.style("zz", "zzstyle", (7, 8, 9, 10, 11, 12), steps=8)
    both, _ = studio.imagine("inkstyle zzstyle, a harbour seed=7 steps=4 negative=blurry")
    assert sorted(a["name"] for a in both.adapters) == ["ink", "zz"]
    combined = np.asarray(studio.png(both.image_blobs[0]))
    assert not np.array_equal(combined, inked) and not np.array_equal(combined, plain)

    # A batch of two with compare: each seed's base | style side by side, the halves the
    # pixels a plain and a styled generation of that seed make (batched: within 2/255).
    compared, message = studio.imagine(
        "inkstyle, a harbour seed=7 steps=4 negative=blurry count=2 compare=yes"
    )
    assert len(compared.image_blobs) == 2
    sheets = [studio.png(a.blob_sha256) for a in message.attachments]
    assert [s.size for s in sheets] == [(128, 64), (128, 64)]
    first = np.asarray(sheets[0].convert("RGB")).astype(int)
    assert np.abs(inked.astype(int) - plain).max() > 8  # the style's change, far past 2
    assert np.abs(first[:, :64] - plain).max() <= 2
    assert np.abs(first[:, 64:] - inked).max() <= 2
    assert studio.services.models.get(BASE).pipe is pipe

    # A team's own Qwen-Image LoRA file imports onto a Qwen-Image base, not onto SD1.5.
    lora = studio.services.blobs.read_bytes(ink.kohya_blob)
    studio.rig.run(
        "style import",
        {"name": "copy", "trigger": "copystyle", "base": BASE},
        files=[mem_file("team-ink.safetensors", lora)],
    )
    studio.say("/style", "create sdink sdinkstyle style tiny-sd15")
    studio.rig.run(
        "style import",
        {"name": "sdink", "trigger": "sdinkstyle"},
        files=[mem_file("team-ink.safetensors", lora)],
    )
    studio.work()
    imports = [j for j in studio.services.queue.list_jobs() if j.kind == "import"]
    assert [j.status for j in imports] == [JobStatus.SUCCEEDED, JobStatus.FAILED]
    assert "Imported team-ink.safetensors as **copy** v1 (Qwen-Image)" in (
        studio.services.outbox.get(result_key(imports[0].id)).text
    )
    assert "was made for Qwen-Image, but sdink is on tiny-sd15 (SD1.5)" in imports[1].error


def test_a_quick_generation_is_served_while_a_qwen_image_training_pauses(
    studio: Studio,
) -> None:
    """Queued mid-training, it runs between two steps on the training's base model with the
    training adapter off, and gives the pixels an idle runner gives."""
    from storage.work_signal import open_work_signal

    studio.say("/style", f"create ink inkstyle style {BASE}")
    studio.rig.run("style add", {"name": "ink"}, files=images(1, 2, 3, 4))
    studio.rig.run("style review", {"name": "ink"})
    dataset = studio.rig.datasets("ink")[-1]
    studio.rig.react(f"review:dataset:{dataset.id}", "✅", user=LEAD)
    studio.say("/style", "train ink steps=24", user=LEAD)
    (train,) = studio.services.queue.list_jobs()
    worker = threading.Thread(target=make_runner(studio.services).run_once)
    worker.start()
    wake = open_work_signal(studio.services.db)
    try:
        while not studio.services.queue.progress(train.id) and worker.is_alive():
            wake.wait(0.5)
    finally:
        wake.close()
    assert "Queued" in studio.say("/imagine", "a quiet harbour seed=99 steps=4")
    worker.join(timeout=300)
    jobs = {j.kind: j for j in studio.services.queue.list_jobs()}
    training, generation = jobs["train"], jobs["generate"]
    assert training.status == JobStatus.SUCCEEDED, training.error
    assert generation.status == JobStatus.SUCCEEDED, generation.error
    assert training.started_at < generation.finished_at < training.finished_at
    during = generation.result["images"][0]
    idle, _ = studio.imagine("a quiet harbour seed=99 steps=4")
    assert studio.png(idle.image_blobs[0]).tobytes() == studio.png(during).tobytes()
