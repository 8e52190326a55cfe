"""A quantized frozen base (QLoRA, `/style train ... quantize=nf4`): the denoiser's linear
layers are stored in 4 bits, a LoRA or DoRA trains on top of them through the real job and
exports the same layers as a full-precision run, and the base is full precision again for
the generations after it. bitsandbytes runs NF4 on the CPU too, so this runs here."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from runner_fixtures import make_runner
from runner_seed import approved_style, enqueue_generate, enqueue_training, generate_payload
from sqlalchemy import select

from storage.families import (
    DENOISER_MB,
    FAMILIES,
    NF4_BYTES_RATIO,
    WEIGHTS_MB,
    memory_needed_mb,
)
from storage.models import Generation, JobStatus, ModelVersion, Style

pytest_plugins = ("runner_fixtures", "bot_fixtures")
pytestmark = pytest.mark.runner


def _linear_bytes(module: Any) -> int:
    import torch

    total = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            total += layer.weight.numel() * layer.weight.element_size()
    return total


def test_nf4_stores_the_linear_layers_in_4_bits_and_keeps_what_they_compute(
    tiny_builders: Any,
) -> None:
    import torch

    from gpu_runner.training.quantize import quantize_frozen_linears

    unet = tiny_builders["sd15"](0).unet
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before_out = unet(x, 10, hidden).sample
    before = _linear_bytes(unet)
    count = quantize_frozen_linears(unet, torch.float32)
    with torch.no_grad():
        after_out = unet(x, 10, hidden).sample
    assert count > 50
    # fp32 weights (4 B) became packed 4-bit ones (0.5 B): an eighth, plus small scales.
    assert _linear_bytes(unet) <= before / 7
    drift = float((after_out - before_out).norm() / before_out.norm())
    assert 0 < drift < 0.2, drift


def test_an_eval_pass_leaves_the_quantized_layers_trainable(
    tiny_builders: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation runs the quantized base with no grad in eval mode; on a CPU with
    AVX512-BF16 bitsandbytes would repack its weights in place there, and the training step
    after it failed. As if every CPU had it: eval, then a step with gradients."""
    import bitsandbytes.nn.modules as bnb_modules
    import torch

    from gpu_runner.training.quantize import quantize_frozen_linears

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    unet = tiny_builders["sd15"](0).unet
    quantize_frozen_linears(unet, torch.float32)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
    unet.eval()
    with torch.no_grad():
        evaluated = unet(x, 10, hidden).sample
    unet.train()
    x.requires_grad_(True)
    trained = unet(x, 10, hidden).sample
    trained.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(trained.detach(), evaluated)


def _generate(services: Any, team_id: int, version_id: int | None, base: str) -> tuple[Any, Any]:
    payload = generate_payload(team_id, version_id, base_model=base, seed=5, prompt="a harbour")
    job_id = enqueue_generate(services, payload)
    assert make_runner(services).run_once()
    job = services.queue.get(job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    with services.db.session() as s:
        generation = s.scalar(select(Generation).where(Generation.job_id == job_id))
    data = services.blobs.read_bytes(generation.image_blobs[0])
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), generation


def _kohya_keys(services: Any, style_id: int) -> set[str]:
    import json

    with services.db.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.style_id == style_id))
    raw = services.blobs.read_bytes(version.kohya_blob)
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return {k for k in header if k != "__metadata__"}


@pytest.mark.parametrize(("base", "method"), [("tiny-sd15", "dora"), ("tiny-flux2-klein", "lora")])
def test_a_quantized_run_trains_exports_and_leaves_the_base_full_precision(
    services: Any, demo_items: list[tuple[Any, str]], base: str, method: str
) -> None:
    plain_style = approved_style(services, demo_items, name="plain", base_model=base)
    with services.db.session() as s:
        team_id = s.get(Style, plain_style).team_id
    style_id = approved_style(
        services, demo_items, name="small", trigger="smallstyle", base_model=base,
        team_id=team_id,
    )  # fmt: skip
    before, _ = _generate(services, team_id, None, base)

    _, plain_job = enqueue_training(services, plain_style, method, steps=6)
    _, job_id = enqueue_training(services, style_id, method, steps=6, quantize="nf4")
    runner = make_runner(services)
    assert runner.run_once() and runner.run_once()
    for job in (plain_job, job_id):
        assert services.queue.get(job).status == JobStatus.SUCCEEDED, services.queue.get(job)
    # The same layers as a full-precision run: every key ComfyUI maps for it is there.
    assert _kohya_keys(services, style_id) == _kohya_keys(services, plain_style)
    # The quantized base was dropped at the end: the next picture is full precision again.
    assert base not in services.models.loaded_names()
    after, generation = _generate(services, team_id, None, base)
    np.testing.assert_array_equal(before, after)
    assert not generation.record.get("notices")


def test_chat_takes_quantize_and_refuses_what_does_not_apply(rig: Any) -> None:
    from bot_fixtures import approved_style as approved_chat_style

    from storage.models import TrainingRun

    approved_chat_style(rig)
    refused = rig.text("style train", {"name": "ink", "quantize": "int3"})
    assert "Quantize must be one of nf4, none" in refused and rig.jobs() == []
    ti = rig.text("style train", {"name": "ink", "method": "ti", "quantize": "nf4"})
    assert "quantize applies to LoRA and DoRA only" in ti and rig.jobs() == []
    assert "Training **ink**" in rig.text("style train", {"name": "ink", "quantize": "nf4"})
    with rig.db.session() as s:
        (run,) = s.scalars(select(TrainingRun))
    assert run.params["quantize"] == "nf4"


def test_the_memory_a_runner_needs_shrinks_by_the_quantized_denoiser() -> None:
    configured = {"klein": {"source": "/m/klein", "family": "flux2-klein"}}
    full = memory_needed_mb("train", "klein", configured, method="lora")
    small = memory_needed_mb("train", "klein", configured, method="lora", quantize="nf4")
    assert full is not None and small is not None
    saved = DENOISER_MB["flux2-klein"] * (1 - NF4_BYTES_RATIO)
    assert full - small == pytest.approx(saved, abs=1)
    # Every family says how much of its weights a quantized base shrinks.
    assert set(DENOISER_MB) == set(FAMILIES)
    assert all(0 < DENOISER_MB[f] < WEIGHTS_MB[f] for f in FAMILIES)
