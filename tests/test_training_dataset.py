"""Captions with the trigger, caption dropout, preprocessing, the split and the caches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ("runner_fixtures",)
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from gpu_runner.training.dataset import (  # noqa: E402
    BatchSampler,
    DatasetError,
    caption_dropout_mask,
    encode_latent_dist,
    encode_text,
    insert_trigger,
    prepare_data,
    preprocess,
    sample_latents,
    split_indices,
)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a cat in [trigger] style", "a cat in zxq style"),
        ("[trigger], [trigger] again", "zxq, zxq again"),
        ("a cat on a mat", "zxq, a cat on a mat"),
        ("  ", "zxq"),
        ("zxq, already named", "zxq, already named"),
        ("zxqz is not the trigger", "zxq, zxqz is not the trigger"),
        ("ZXQ, named in capitals", "ZXQ, named in capitals"),  # as chat matches it
        ("zxq-like is another word", "zxq, zxq-like is another word"),
    ],
)
def test_trigger_insertion(caption: str, expected: str) -> None:
    assert insert_trigger(caption, "zxq") == expected


def test_a_caption_naming_the_trigger_in_another_case_is_not_prefixed_twice() -> None:
    assert insert_trigger("zxstyle, a cat", "ZXStyle") == "zxstyle, a cat"


def test_the_text_encoder_reads_a_trigger_the_same_in_any_case() -> None:
    """Why captions and chat match triggers in any case: CLIP's tokenizer lowercases, even
    the token textual inversion adds for the trigger."""
    from gpu_runner.tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["ZXStyle"])
    ids = {tuple(tokenizer(text)["input_ids"]) for text in ("ZXStyle cat", "zxstyle cat")}
    assert len(ids) == 1


def test_caption_dropout_is_seeded_and_near_its_rate() -> None:
    a = caption_dropout_mask(2000, 0.1, torch.Generator().manual_seed(5))
    b = caption_dropout_mask(2000, 0.1, torch.Generator().manual_seed(5))
    c = caption_dropout_mask(2000, 0.1, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.07 < a.float().mean().item() < 0.13
    assert not caption_dropout_mask(50, 0.0, torch.Generator().manual_seed(5)).any()


def test_preprocess_resizes_short_side_and_center_crops() -> None:
    img = Image.new("RGB", (200, 100), "black")
    img.paste((255, 255, 255), (90, 0, 110, 100))  # a white bar in the middle
    pixels, time_ids = preprocess(img, 64)
    assert pixels.shape == (3, 64, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, 32].mean() > 0.9  # the centre survived the crop
    assert pixels[:, :, 0].mean() < -0.9
    assert time_ids == (100, 200, 0, 32, 64, 64)  # orig h, w, crop top, left, target


def test_a_large_set_holds_some_out_and_a_small_one_trains_on_every_image() -> None:
    train, val = split_indices(24, 0.15, seed=0)
    assert (train, val) == split_indices(24, 0.15, seed=0)  # deterministic
    assert len(val) == 4 and sorted(train + val) == list(range(24)) and not set(train) & set(val)
    # 12 references: none is starved; the same images validate at fixed noise.
    assert split_indices(12, 0.15, seed=0) == (list(range(12)), list(range(12)))
    assert split_indices(1, 0.15, seed=0) == ([0], [0])
    with pytest.raises(DatasetError, match="no images"):
        split_indices(0, 0.15, seed=0)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = Image.new("RGB", (64, 64), "red")
    with pytest.raises(DatasetError, match=r"image 2 \(broken.png\) cannot be read"):
        prepare_data([(good, "a"), (bad, "b")], "zxq", 64, 0.15, 0)


def test_shapes_beyond_eight_to_one_are_refused_before_any_resize(tmp_path: Path) -> None:
    # 65536x1 at 512 px would be a 33554432x512 resize (~51 GB); these show the same refusal.
    strip = tmp_path / "strip.png"
    Image.new("RGB", (4096, 64), "white").save(strip)
    good = Image.new("RGB", (64, 64), "red")
    with pytest.raises(DatasetError, match=r"image 2 \(strip.png\) is 4096×64 pixels, beyond"):
        prepare_data([(good, "a"), (strip, "b")], "zxq", 64, 0.15, 0)
    with pytest.raises(DatasetError, match=r"image 1 is 64×1024 pixels, beyond the 8:1 limit"):
        prepare_data([(Image.new("RGB", (64, 1024)), "a"), (good, "b")], "zxq", 64, 0.15, 0)
    pixels, _ = preprocess(Image.new("RGB", (512, 64)), 64)  # exactly 8:1 is taken
    assert pixels.shape == (3, 64, 64)


def test_files_prepare_like_decoded_images(
    tmp_path: Path, demo_items: list[tuple[Any, str]]
) -> None:
    files = []
    for n, (image, caption) in enumerate(demo_items[:4]):
        image.save(tmp_path / f"{n}.png")
        files.append((tmp_path / f"{n}.png", caption))
    from_files = prepare_data(files, "zxq", 64, 0.15, 0)
    decoded = prepare_data(demo_items[:4], "zxq", 64, 0.15, 0)
    assert from_files.buckets == decoded.buckets
    assert all(a.equal(b) for a, b in zip(from_files.pixels, decoded.pixels, strict=True))
    assert from_files.time_ids.equal(decoded.time_ids)


def test_batch_sampler_resumes_exactly() -> None:
    a = BatchSampler(10, 4, seed=1)
    for _ in range(3):
        a.next_batch()
    b = BatchSampler(10, 4, seed=1)
    b.load_state_dict(a.state_dict())
    assert [a.next_batch() for _ in range(5)] == [b.next_batch() for _ in range(5)]
    epoch = BatchSampler(8, 4, seed=2)
    assert sorted(epoch.next_batch() + epoch.next_batch()) == list(range(8))


def test_cached_latents_and_text_are_exact(
    tiny_builders: dict[str, Callable[..., Any]], demo_items: list[tuple[Any, str]]
) -> None:
    """Sampling from the cached posterior with the step's generator reproduces what encoding
    on the fly gives, and cached text embeddings equal fresh ones."""
    pipe = tiny_builders["sd15"](0)
    data = prepare_data(demo_items, "zxq", 64, 0.15, 0)
    (everything,) = data.by_bucket(range(len(demo_items)))  # square references: one bucket
    mean, std = encode_latent_dist(pipe.vae, data.stack(everything))
    batch = [3, 7, 1]
    cached = sample_latents(
        mean[batch], std[batch], torch.Generator().manual_seed(9), pipe.vae.config
    )
    with torch.no_grad():
        dist = pipe.vae.encode(data.stack(batch)).latent_dist
    fresh = dist.sample(torch.Generator().manual_seed(9)) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)
    all_text = encode_text(pipe, data.captions, torch.device("cpu"))
    some = encode_text(pipe, [data.captions[i] for i in batch], torch.device("cpu"))
    torch.testing.assert_close(all_text.hidden[batch], some.hidden, rtol=1e-5, atol=1e-6)


def test_dataset_hash_tracks_pixels_and_captions(demo_items: list[tuple[Any, str]]) -> None:
    from gpu_runner.training.dataset import dataset_hash

    items = demo_items[:3]
    assert dataset_hash(items) == dataset_hash(list(items))
    recaptioned = [*items[:2], (items[2][0], items[2][1] + " again")]
    assert dataset_hash(recaptioned) != dataset_hash(items)
    repainted = [(items[0][0].rotate(90), items[0][1]), *items[1:]]
    assert dataset_hash(repainted) != dataset_hash(items)
