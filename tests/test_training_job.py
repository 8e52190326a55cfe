"""The train job's inputs and its failures, through a real runner on the tiny pipeline.

A failure that says what to change (a bad base model, an unusable checkpoint, a trigger
textual inversion cannot take, a reference training cannot use) ends the job once, tells the
requester why, and marks the training run failed with that reason.
"""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image, ImageDraw
from runner_fixtures import make_runner
from runner_seed import approved_style, enqueue_training

from storage.job_payloads import result_key
from storage.models import JobStatus, RunStatus, TrainingRun

pytest_plugins = ("runner_fixtures",)


def _assert_failed_once(services: Any, run_id: int, job_id: int, reason: str) -> None:
    """Failed on the first try, not queued again, one message with the reason, run failed."""
    job = services.queue.get(job_id)
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1), job.error
    assert reason in (job.error or "")
    assert make_runner(services).run_once() is False  # nothing left to retry
    message = services.outbox.get(result_key(job_id))
    assert message is not None
    assert message.text == f"Job {job_id} (train) failed: {job.error}"
    with services.db.session() as s:
        run = s.get(TrainingRun, run_id)
        assert run.status == RunStatus.FAILED and run.error == job.error
        assert run.finished_at is not None


def test_an_unknown_base_model_ends_the_job_once(
    services: Any, demo_items: list[tuple[Any, str]]
) -> None:
    style_id = approved_style(services, demo_items, base_model="sd15-gone")
    run_id, job_id = enqueue_training(services, style_id, steps=4)
    assert make_runner(services).run_once()
    _assert_failed_once(services, run_id, job_id, "unknown base model 'sd15-gone'")


def test_an_unreadable_checkpoint_ends_the_job_once(
    services: Any, demo_items: list[tuple[Any, str]]
) -> None:
    style_id = approved_style(services, demo_items)
    run_id, job_id = enqueue_training(services, style_id, steps=4)
    # A checkpoint a full disk or a dying runner left as garbage.
    broken = services.runs_dir / str(run_id) / "checkpoints" / "step-00000002"
    broken.mkdir(parents=True)
    (broken / "trainable.safetensors").write_bytes(b"not safetensors")
    (broken / "state.pt").write_bytes(b"not a torch file")
    assert make_runner(services).run_once()
    _assert_failed_once(services, run_id, job_id, "checkpoint step-00000002 is unreadable")


def test_a_trigger_textual_inversion_cannot_take_ends_the_job_once(
    services: Any, demo_items: list[tuple[Any, str]]
) -> None:
    style_id = approved_style(services, demo_items)
    run_id, job_id = enqueue_training(services, style_id, steps=4, initializer_token="")
    with services.db.session(write=True) as s:
        s.get(TrainingRun, run_id).method = "textual_inversion"
    assert make_runner(services).run_once()
    _assert_failed_once(services, run_id, job_id, "init_word '' has no tokens: use a word")


def _strip(size: tuple[int, int], shade: int = 0) -> Image.Image:
    image = Image.new("RGB", size, (240, 230 - shade, 200))
    ImageDraw.Draw(image).line((0, 0, *size), fill=(20, 20, 20), width=3)
    return image


def test_a_reference_beyond_eight_to_one_is_refused_by_its_number(
    services: Any, demo_items: list[tuple[Any, str]]
) -> None:
    # Taken before intake refused such shapes; training must never scale it up.
    items = [*demo_items[:3], (_strip((1024, 64)), "a long strip")]
    style_id = approved_style(services, items)
    run_id, job_id = enqueue_training(services, style_id, steps=4)
    assert make_runner(services).run_once()
    _assert_failed_once(
        services, run_id, job_id, "reference image #4 is 1024×64 pixels, beyond the 8:1 limit"
    )


def _rss_bytes() -> int:
    psutil = pytest.importorskip("psutil")
    return int(psutil.Process().memory_info().rss)


def test_loaded_references_are_not_held_at_full_size(services: Any) -> None:
    """Six 6 MP references are ~108 MB decoded; loading the run's inputs must not keep them."""
    from gpu_runner.jobs.train import _load_inputs
    from gpu_runner.training.dataset import prepare_data

    photos = [(_strip((3000, 2000), shade=n), f"photo {n}") for n in range(6)]
    style_id = approved_style(services, photos)
    run_id, _ = enqueue_training(services, style_id, steps=4)
    before = _rss_bytes()
    inputs = _load_inputs(services, run_id)
    held = _rss_bytes() - before
    assert held < 30_000_000, f"loading the inputs kept {held / 1e6:.0f} MB"
    # Prepared one at a time, they give the pixels the decoded images give.
    data = prepare_data(inputs.items, "inkstyle", 64, 0.15, 0)
    everything = range(6)
    assert data.stack(everything).shape == (6, 3, 48, 80)  # 3:2 photos: the 80x48 bucket
    decoded = prepare_data(photos, "inkstyle", 64, 0.15, 0)
    assert data.stack(everything).equal(decoded.stack(everything))
