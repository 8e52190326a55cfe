"""Aspect-ratio buckets: references train in their own shape at about the training area,
cropped as little as possible, batches one bucket at a time, on every family."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpu_runner.training.buckets import Bucket, make_buckets, nearest_bucket
from gpu_runner.training.dataset import BatchSampler, prepare_data

pytest_plugins = ("runner_fixtures",)

RED, BLUE, WHITE = (220, 30, 30), (30, 30, 220), (255, 255, 255)


def _banded(width: int, height: int, band: float = 0.1) -> Image.Image:
    """White, with a red band down the left edge and a blue one down the right."""
    img = np.full((height, width, 3), WHITE, dtype=np.uint8)
    edge = round(width * band)
    img[:, :edge] = RED
    img[:, width - edge :] = BLUE
    return Image.fromarray(img)


def _rgb(pixels: Any) -> np.ndarray:
    """A CHW tensor in [-1, 1] -> HWC 0-255."""
    return ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255)


@pytest.mark.parametrize(("resolution", "grid"), [(512, 8), (1024, 8), (1024, 16), (1328, 16)])
def test_buckets_hold_the_training_area_on_the_familys_grid(resolution: int, grid: int) -> None:
    buckets = make_buckets(resolution, grid)
    assert Bucket(resolution, resolution) in buckets
    for b in buckets:
        assert b.width % grid == 0 and b.height % grid == 0, b
        assert b.width * b.height <= resolution**2, b
        assert (
            resolution // 2 - 64 <= min(b.width, b.height)
            and max(b.width, b.height) <= 2 * resolution
        )
        assert Bucket(b.height, b.width) in buckets  # wide and tall alike
    # A bucket for every common frame, within 12% of its aspect ratio (64 px steps at 512
    # px: 3:2 goes to 640x384, 11% wider, as in kohya's buckets).
    for w, h in [(16, 9), (3, 2), (4, 3), (2, 1), (9, 16)]:
        b = nearest_bucket(w * 400, h * 400, buckets, grid)
        assert abs(math.log((b.width / b.height) / (w / h))) < 0.12, (w, h, b)


def test_a_wide_reference_trains_wide_with_its_edges() -> None:
    wide = _banded(1920, 1080)
    data = prepare_data([(wide, "a banner")], "zxq", 512, 0.15, 0)
    (bucket,) = data.buckets
    assert bucket == Bucket(640, 384)
    rgb = _rgb(data.pixels[0])
    assert rgb.shape == (384, 640, 3)
    assert np.abs(rgb[:, :8].mean((0, 1)) - RED).max() < 10  # both edges are in the frame
    assert np.abs(rgb[:, -8:].mean((0, 1)) - BLUE).max() < 10
    # SDXL's micro-conditioning: the original size, the crop, the bucket as target size.
    orig_h, orig_w, top, left, target_h, target_w = data.time_ids[0].tolist()
    assert (orig_h, orig_w, target_h, target_w) == (1080, 1920, 384, 640)
    assert (top, left) == (0, 21)  # 1080 -> 384 high makes it 683 wide: 21 px off each side
    # Centre-cropped to the square (buckets off), both bands are lost.
    square = _rgb(prepare_data([(wide, "a banner")], "zxq", 512, 0.15, 0, buckets=False).pixels[0])
    assert square.shape == (512, 512, 3)
    assert square[:, :8].mean() > 250 and square[:, -8:].mean() > 250


def test_a_small_image_is_enlarged_at_most_twice() -> None:
    buckets = make_buckets(1024, 16)
    assert nearest_bucket(300, 200, buckets, 16) == Bucket(592, 400)
    assert nearest_bucket(1000, 1000, buckets, 16) == Bucket(1024, 1024)


def test_batches_come_from_one_bucket_each_in_proportion_and_resume_exactly() -> None:
    groups = [[0, 1, 2, 3, 4, 5], [6, 7]]
    sampler = BatchSampler(groups, 2, seed=3)
    batches = [sampler.next_batch() for _ in range(400)]
    assert all(set(b) <= set(groups[0]) or set(b) <= set(groups[1]) for b in batches)
    share = sum(set(b) <= set(groups[1]) for b in batches) / len(batches)
    assert 0.18 < share < 0.32  # 2 of 8 images
    again = BatchSampler(groups, 2, seed=3)
    again.load_state_dict(sampler.state_dict())
    assert [sampler.next_batch() for _ in range(20)] == [again.next_batch() for _ in range(20)]


@pytest.mark.runner
def test_a_wide_references_edges_reach_its_cached_latent(tiny_builders: Any) -> None:
    """The latent the loop caches for a wide reference depends on its edge bands: with them
    painted white it differs. Centre-cropped to the square, the bands never reach it."""
    from gpu_runner.families import get_family

    pipe = tiny_builders["sd15"](0)
    family = get_family("sd15")
    banded, blank = _banded(1280, 640, band=0.2), _banded(1280, 640, band=0.0)

    def latent(image: Image.Image, buckets: bool) -> Any:
        data = prepare_data([(image, "a banner")], "zxq", 64, 0.15, 0, buckets=buckets)
        mean, _ = family.latent_dist(pipe.vae, data.stack([0]))
        return mean

    bucketed = latent(banded, True)
    assert bucketed.shape[-1] > bucketed.shape[-2]  # a wide latent
    assert (bucketed - latent(blank, True)).abs().max() > 1e-2
    assert latent(banded, False).equal(latent(blank, False))


FAMILIES = ("sd15", "sdxl", "flux2-klein", "flux1", "qwenimage", "zimage")


@pytest.mark.runner
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_wide_and_tall_references_at_their_buckets(
    name: str,
    tiny_builders: Any,
    demo_items: Any,
    fast: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from gpu_runner.families import get_family
    from gpu_runner.training import loop
    from gpu_runner.training.config import make_config

    family = get_family(name)
    (base,) = family.tiny_builders
    wide = [(img.resize((128, 64)), cap) for img, cap in demo_items[:3]]
    tall = [(img.resize((64, 128)), cap) for img, cap in demo_items[3:6]]
    cfg = make_config(
        "lora", name, "style", trigger="zxq", rank=4, alpha=4,
        target_modules=list(family.lora_targets), base_model_name=base,
        **{**fast, "batch_size": 2, "steps": 4, "checkpoint_every": 4, "validate_every": 4,
           "sample_seeds": [1]},
    )  # fmt: skip
    seen: list[tuple[int, ...]] = []
    sample = loop.sample_latents

    def record(*args: Any, **kwargs: Any) -> torch.Tensor:
        latents = sample(*args, **kwargs)
        seen.append(tuple(latents.shape[2:]))
        return latents

    monkeypatch.setattr(loop, "sample_latents", record)
    result = loop.train(
        cfg, wide + tall, tiny_builders[name](0), tmp_path / "o", checkpoint_dir=tmp_path / "c"
    )
    assert result.buckets == {"48x80": 3, "80x48": 3}
    # Latents of both shapes reached the denoiser, never a square.
    shapes = set(seen)
    assert len(shapes) == 2 and all(h != w for h, w in shapes), shapes
    assert all(map(math.isfinite, result.loss_history)) and result.kohya_path is not None
