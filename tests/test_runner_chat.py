"""The chat surface end to end with the runner on the tiny pipeline: Vary and Upscale from a
result's buttons, `/style import` of a LoRA file, `/style caption NAME auto` editing the
cards in place. Commands go through the real CommandCore on the runner's own database."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from bot_fixtures import LEAD, MEMBER, RecordingSender, command, images, mem_file, reaction
from PIL import Image
from sqlalchemy import select

from bot.commands import Press
from bot.core import CommandCore
from bot.delivery import OutboxDeliverer
from storage.job_payloads import result_key
from storage.models import Caption, Generation, JobStatus, ModelVersion
from storage.result_buttons import ButtonId
from storage.settings import load_settings

pytest_plugins = ("runner_fixtures", "generation_fixtures", "bot_fixtures")
pytestmark = pytest.mark.runner


@pytest.fixture
def data_dir(tmp_path: Path, sqlite_template: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "atelier.db").write_bytes(sqlite_template.read_bytes())
    return data


class Chat:
    """The bot's core and delivery beside a runner, on one data folder and database."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        from gpu_runner.jobs import handlers
        from gpu_runner.services import open_services
        from gpu_runner.worker import Runner

        config = load_settings(
            data_dir=data_dir,
            device="cpu",
            slack_lead_users=[LEAD],
            min_image_side=64,
            **settings,
        )
        self.services = open_services(config)
        s = self.services
        self.core = CommandCore(s.db, s.blobs, config, s.queue, s.outbox)
        self.sender = RecordingSender()
        self.deliverer = OutboxDeliverer(s.outbox, s.blobs, self.sender, "slack")
        self.runner = Runner(
            queue=s.queue,
            outbox=s.outbox,
            handlers={kind: partial(h, s) for kind, h in handlers.items()},
            worker_id="test-runner",
        )

    def say(self, slash: str, text: str, **kw: Any) -> str:
        parsed = self.core.text_parser(slash, text)
        replies = self.core.handle(command(parsed.name, parsed.args, **kw))
        return "\n".join(r.text for r in replies)

    def work(self) -> None:
        while self.runner.run_once():
            pass
        self.deliverer.deliver_due()

    def press(self, action: str, generation_id: int, **values: str) -> str:
        from bot_fixtures import TEAM, actor

        replies = self.core.handle_press(
            Press(
                f"press-{action}-{generation_id}",
                TEAM,
                "C1",
                actor(MEMBER),
                ButtonId(action, generation_id).encode(),
                values=values,
            )
        )
        return "\n".join(r.text for r in replies)

    def generations(self) -> list[Generation]:
        with self.services.db.session() as s:
            return list(s.scalars(select(Generation).order_by(Generation.id)))


@pytest.fixture
def chat(data_dir: Path, tiny_builders: Any) -> Chat:
    return Chat(data_dir)


def test_vary_and_upscale_results_carry_their_parent(chat: Chat) -> None:
    assert "Queued" in chat.say("/imagine", "a harbour seed=5 steps=2")
    chat.work()
    (first,) = chat.generations()
    assert first.mode == "txt2img" and (first.width, first.height) == (64, 64)
    assert "Upscale ×2" in chat.press("upscale", first.id)
    assert "Variation" in chat.press("vary-subtle", first.id)
    chat.work()
    _, upscale, vary = chat.generations()
    assert upscale.mode == "upscale" and upscale.parent_generation_id == first.id
    assert (upscale.width, upscale.height) == (128, 128) and upscale.seed == first.seed
    png = Image.open(io.BytesIO(chat.services.blobs.read_bytes(upscale.image_blobs[0])))
    assert png.size == (128, 128)
    assert upscale.record["img2img"]["strength"] == pytest.approx(0.35)
    assert vary.mode == "vary" and vary.parent_generation_id == first.id
    for generation, said in ((upscale, "Upscaled ×2"), (vary, "Variation")):
        message = chat.services.outbox.get(result_key(generation.job_id))
        assert f"{said} from generation #{first.id}" in message.text
        assert message.extra["parent_generation_id"] == first.id
        ids = [b["id"] for row in message.extra["buttons"] for b in row]
        assert f"atelier:reroll:{generation.id}" in ids


def test_style_import_publishes_a_version_a_lead_approves(chat: Chat, sd15_lora: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(sd15_lora))
    labelled = sd15_lora.parent / "team-ink.safetensors"
    metadata = {"modelspec.trigger_phrase": "inkwash", "ss_network_dim": "4"}
    save_file(tensors, str(labelled), metadata=metadata)
    lora = mem_file("team-ink.safetensors", labelled.read_bytes())
    text = chat.say("/style", "import ink inkwash", files=[lora])
    assert "Created style **ink**" in text
    chat.work()
    with chat.services.db.session() as s:
        (version,) = s.scalars(select(ModelVersion))
    assert version.kohya_blob and version.approved_at is None
    assert version.file_metadata["header"] == {"trigger phrase": "inkwash", "rank": "4"}
    (job,) = [j for j in chat.services.queue.list_jobs() if j.kind == "import"]
    message = chat.services.outbox.get(result_key(job.id))
    assert "Imported team-ink.safetensors as **ink** v1 (SD1.5)" in message.text
    assert "rank: 4" in message.text and "approves it with ✅" in message.text
    ts = chat.sender.id_of(result_key(job.id))
    assert chat.core.handle_reaction(reaction(ts, "✅", user=MEMBER))[0].private  # not a lead
    (approved,) = chat.core.handle_reaction(reaction(ts, "✅", user=LEAD))
    assert "approved **ink** model v1" in approved.text


def test_an_import_for_another_family_is_refused_with_the_reason(
    chat: Chat, sdxl_lora: Path
) -> None:
    lora = mem_file("xl.safetensors", sdxl_lora.read_bytes())
    chat.say("/style", "import ink inkwash", files=[lora])
    chat.work()
    (job,) = [j for j in chat.services.queue.list_jobs() if j.kind == "import"]
    assert job.status == JobStatus.FAILED and "made for SDXL" in (job.error or "")
    with chat.services.db.session() as s:
        assert list(s.scalars(select(ModelVersion))) == []


# Every captioner kind, through the configured folder and the real caption job.
@pytest.mark.parametrize("kind", ["blip", "florence2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_auto_captions_edit_the_cards_and_never_replace_a_persons(
    kind: Any, data_dir: Path, tiny_builders: Any, tmp_path: Path
) -> None:
    from gpu_runner.captioning.tiny import save_tiny_captioner

    folder = save_tiny_captioner(tmp_path / f"tiny-{kind}", kind)
    chat = Chat(data_dir, caption_model=str(folder))
    chat.say("/style", "create ink inkstyle")
    chat.core.handle(command("style add", {"name": "ink"}, files=images(1, 2, 3)))
    chat.say("/style", "caption ink 2 a person wrote this")
    chat.say("/style", "review ink", user=LEAD)
    chat.deliverer.deliver_due()
    assert "Queued auto captions for 2 image(s)" in chat.say("/style", "caption ink auto")
    chat.work()
    with chat.services.db.session() as s:
        captions = list(s.scalars(select(Caption).order_by(Caption.id)))
    autos = [c for c in captions if c.source == "auto"]
    assert len(autos) == 2 and all(c.author == f"auto:tiny-{kind}" for c in autos)
    assert all(c.text.strip() for c in autos)
    edited = {item.key: item for _, item, _ in chat.sender.edits}
    cards = [i for k, i in edited.items() if k.startswith("card:image:")]
    assert len(cards) == 2 and all("(auto caption)" in c.text for c in cards)
    assert not any("#2:" in c.text for c in cards)  # the person's caption stays as it was
