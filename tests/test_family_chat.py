"""Every family through the same chat commands, on SQLite and PostgreSQL: a style created
on the family's built-in tiny model trains from `/style train` (wide references at a wide
bucket, which the result and `/style info` say), and `/imagine` with its trigger draws with
the LoRA and says which model and family made the picture."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from bot_fixtures import png_bytes
from PIL import Image
from runner_fixtures import console_studio
from sqlalchemy import select

from storage.families import BUILTIN_MODELS, FAMILY_LABELS, FAMILY_SIZE_MULTIPLE, aspect_size
from storage.models import Generation, JobStatus, ModelVersion

pytest_plugins = ("runner_fixtures", "bot_fixtures")
pytestmark = pytest.mark.runner

# One random-weight tiny model per family: the path every real model of it takes.
TINY = sorted(
    {m.family: m.name for m in BUILTIN_MODELS.values() if m.random}.items(),
    key=lambda item: item[0],
)


@pytest.mark.parametrize(("family", "base"), TINY, ids=[f for f, _ in TINY])
def test_a_style_trains_and_draws_on_every_family_from_chat(
    family: str, base: str, db_url: str, tmp_path: Path, tiny_builders: Any
) -> None:
    studio = console_studio(db_url, tmp_path)
    session, services = studio.session, studio.services

    def work() -> list[str]:
        return studio.work().splitlines()

    # Two square references and two wide ones.
    studio.approved_style(
        base, {f"p{n}.png": png_bytes(n, (96, 96) if n < 3 else (192, 96)) for n in (1, 2, 3, 4)}
    )

    assert "Training **ink**" in session.run_line("/style train ink steps=12")[0]
    trained = "\n".join(work())
    with services.db.session() as s:
        version = s.scalar(select(ModelVersion))
    assert version is not None, trained
    assert version.kohya_blob, trained
    # 2:1 at 64 px goes to the 80x48 bucket; the squares stay square.
    told = "trained at 64x64 (2 images) and 80x48 (2)"
    assert told in trained, trained
    assert told in "\n".join(session.run_line("/style info ink"))

    session.run_line("/imagine inkstyle, a harbour seed=3 steps=2")
    session.run_line("/imagine a harbour seed=3 steps=2")
    posted = "\n".join(work())
    with services.db.session() as s:
        styled, plain = s.scalars(select(Generation).order_by(Generation.id)).all()
    for generation in (styled, plain):
        job = services.queue.get(generation.job_id)
        assert job.status == JobStatus.SUCCEEDED, job.error
    # The result names the model and its family; the trigger put the style on.
    assert f"model {base} ({FAMILY_LABELS[family]})" in posted
    assert "Styles: ink (1)" in posted and "Styles: none" in posted
    assert [a["name"] for a in styled.record["adapters"]] == ["ink"]
    assert styled.record["base_model"]["family"] == family
    assert services.blobs.read_bytes(styled.image_blobs[0]) != services.blobs.read_bytes(
        plain.image_blobs[0]
    )


@pytest.mark.parametrize(("family", "base"), TINY, ids=[f for f, _ in TINY])
def test_an_aspect_ratio_draws_at_the_size_the_result_records_on_every_family(
    family: str, base: str, db_url: str, tmp_path: Path, tiny_builders: Any
) -> None:
    """`ar=3:4` at 64 px lands on the family's grid (88 px is none of 16), so the picture
    has the size its record, its infotext and the result's row say."""
    from test_runner_chat import Chat

    from gpu_runner.png_metadata import parse_parameters

    data = tmp_path / "data"
    data.mkdir()
    chat = Chat(data, database_url=db_url, default_base_model=base)
    assert "Queued" in chat.say("/imagine", "a harbour ar=3:4 seed=3 steps=2")
    chat.work()
    (job,) = chat.services.queue.list_jobs()
    assert job.status == JobStatus.SUCCEEDED, job.error
    with chat.services.db.session() as s:
        (generation,) = s.scalars(select(Generation))
    png = Image.open(io.BytesIO(chat.services.blobs.read_bytes(generation.image_blobs[0])))
    png.load()
    record = json.loads(png.text["atelier"])
    assert png.size[0] < png.size[1]  # 3:4 stays portrait
    assert png.size == (record["width"], record["height"]) == (generation.width, generation.height)
    assert parse_parameters(png.text["parameters"])["size"] == png.size
    assert png.size == aspect_size(base, {}, (3, 4))
    assert not png.size[0] % FAMILY_SIZE_MULTIPLE[family]
    assert not png.size[1] % FAMILY_SIZE_MULTIPLE[family]
