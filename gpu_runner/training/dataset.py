"""Training data: captions with the trigger, image preprocessing into aspect-ratio
buckets, the validation split, batches drawn one bucket at a time, and the per-run cache
of VAE latent distributions and text embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gpu_runner.training.buckets import Bucket, crop_box, make_buckets, nearest_bucket
from storage.ingest import MAX_ASPECT

# Captions get the trigger by the rule chat selects styles with (re-exported for the loop).
from storage.prompt_rules import insert_trigger as insert_trigger

ImageLike = Image.Image | str | Path


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message is one line for people."""


@dataclass(frozen=True)
class TrainItem:
    """A reference and its caption. Give a path where you can: it is decoded only while it
    is prepared, so a run never holds every full-size image at once."""

    image: ImageLike
    caption: str = ""


def as_items(items: Sequence[TrainItem | tuple[ImageLike, str]]) -> list[TrainItem]:
    return [it if isinstance(it, TrainItem) else TrainItem(it[0], it[1]) for it in items]


def caption_dropout_mask(batch: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """True where a caption is dropped (trained unconditionally, as for CFG's empty prompt).

    Always draws from the generator, even at rate 0, so the RNG stream is the same either way.
    """
    return torch.rand(batch, generator=generator) < rate


def _label(image: ImageLike, index: int) -> str:
    """How a person finds the image: its place in the dataset, and its file if it has one."""
    return f"image {index + 1}" + (
        "" if isinstance(image, Image.Image) else f" ({Path(image).name})"
    )


def load_image(image: ImageLike, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            img = Image.open(image)
            img.load()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DatasetError(
                f"{_label(image, index)} cannot be read ({type(exc).__name__}): "
                "remove it from the dataset or upload it again"
            ) from None
    img = ImageOps.exif_transpose(img)  # phone photos: honour the rotation flag
    return img.convert("RGB")


def check_shape(size: tuple[int, int], name: str) -> None:
    """Refuse shapes beyond intake's aspect limit: scaling their short side to the training
    resolution alone could take tens of GB."""
    w, h = size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise DatasetError(
            f"{name} is {w}×{h} pixels, beyond the {MAX_ASPECT:g}:1 limit on the long side "
            "over the short one: crop it closer to square or drop it, and train again"
        )


def preprocess(
    img: Image.Image, size: int | Bucket, name: str = "an image"
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Scaled (bicubic) to cover `size` (a square side or a bucket), the overhang cropped
    evenly, to a CHW tensor in [-1, 1].

    Also returns SDXL's size/crop conditioning: (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w). Shapes `check_shape` refuses raise DatasetError naming `name`."""
    bucket = Bucket(size, size) if isinstance(size, int) else size
    w, h = img.size
    check_shape(img.size, name)
    resized, top, left = crop_box(w, h, bucket)
    img = img.resize(resized, Image.Resampling.BICUBIC)
    img = img.crop((left, top, left + bucket.width, top + bucket.height))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    time_ids = (h, w, top, left, bucket.height, bucket.width)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), time_ids


# Below this many images none is held out: with 12 references, holding 2 out left a sixth
# of a studio's set untrained. Validation then runs on the training images themselves, at
# fixed noise and timesteps (the loss still falls as the set is learned; it no longer
# says how well the style carries to new images).
HOLD_OUT_FROM = 20


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices. From HOLD_OUT_FROM images: a deterministic held-out
    split of ~val_fraction, at least 1, never all. Below it: every image trains, and the
    same images validate."""
    if n < 1:
        raise DatasetError("the dataset has no images: add some and approve it again")
    if n < HOLD_OUT_FROM:
        return list(range(n)), list(range(n))
    n_val = min(n - 1, max(1, math.floor(n * val_fraction + 0.5)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class BatchSampler:
    """Batches of one bucket each: the bucket drawn in proportion to its images, then the
    next images of that bucket's own shuffled epochs (a bucket smaller than a batch repeats
    its images, each with its own noise). One generator; its state goes into checkpoints.

    `groups`: the positions in each bucket (an int n: one bucket of positions 0..n-1)."""

    def __init__(self, groups: int | Sequence[Sequence[int]], batch_size: int, seed: int) -> None:
        as_groups = [range(groups)] if isinstance(groups, int) else groups
        self.groups = [list(g) for g in as_groups]
        if not all(self.groups):
            raise ValueError("every bucket needs an image")
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed + 104729)
        self.orders: list[list[int]] = [[] for _ in self.groups]
        self.positions = [0] * len(self.groups)
        self._sizes = torch.tensor([len(g) for g in self.groups], dtype=torch.float64)

    def next_batch(self) -> list[int]:
        g = 0
        if len(self.groups) > 1:
            g = int(torch.multinomial(self._sizes, 1, generator=self.generator))
        group, out = self.groups[g], []
        while len(out) < self.batch_size:
            if self.positions[g] >= len(self.orders[g]):
                perm = torch.randperm(len(group), generator=self.generator).tolist()
                self.orders[g] = [group[i] for i in perm]
                self.positions[g] = 0
            out.append(self.orders[g][self.positions[g]])
            self.positions[g] += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "orders": self.orders,
            "positions": self.positions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if "order" in state:  # a checkpoint from before buckets: one bucket
            state = {"orders": [state["order"]], "positions": [state["pos"]]}
        self.orders = [list(o) for o in state["orders"]]
        self.positions = [int(p) for p in state["positions"]]


@dataclass
class TextCond:
    """What the denoiser is conditioned on: per-token hidden states, for families that read
    one (SDXL) a pooled vector, and for families whose encoder pads prompts to the longest
    in the batch (Qwen-Image) or keeps each at its own length (Z-Image) which tokens are
    real."""

    hidden: torch.Tensor  # (N, tokens, dim)
    pooled: torch.Tensor | None = None  # (N, dim)
    token_mask: torch.Tensor | None = None  # (N, tokens), 1 = real token; None: all real

    def select(self, idx: torch.Tensor) -> TextCond:
        pooled = None if self.pooled is None else self.pooled[idx]
        token_mask = None if self.token_mask is None else self.token_mask[idx]
        return TextCond(self.hidden[idx], pooled, token_mask)

    def padded(self, tokens: int) -> TextCond:
        """The same text with zero tokens appended up to `tokens`, masked out."""
        n, have, dim = self.hidden.shape
        mask = self.token_mask
        if mask is None:
            mask = torch.ones((n, have), dtype=torch.long, device=self.hidden.device)
        hidden = torch.cat([self.hidden, self.hidden.new_zeros((n, tokens - have, dim))], dim=1)
        mask = torch.cat([mask, mask.new_zeros((n, tokens - have))], dim=1)
        return TextCond(hidden, self.pooled, mask)

    def _aligned(self, other: TextCond) -> tuple[TextCond, TextCond]:
        """Both padded to the longer text where their lengths or masks differ."""
        masked = self.token_mask is not None or other.token_mask is not None
        if masked or self.hidden.shape[1] != other.hidden.shape[1]:
            tokens = max(self.hidden.shape[1], other.hidden.shape[1])
            return self.padded(tokens), other.padded(tokens)
        return self, other

    def cat(self, other: TextCond) -> TextCond:
        """Both batches as one (self's samples first), padded to the longer text."""
        this, other = self._aligned(other)
        pooled = token_mask = None
        if this.pooled is not None and other.pooled is not None:
            pooled = torch.cat([this.pooled, other.pooled])
        if this.token_mask is not None and other.token_mask is not None:
            token_mask = torch.cat([this.token_mask, other.token_mask])
        return TextCond(torch.cat([this.hidden, other.hidden]), pooled, token_mask)

    def where(self, mask: torch.Tensor, other: TextCond) -> TextCond:
        """Per sample: `other` (e.g. the empty caption) where mask is True, else self."""
        m = mask.to(self.hidden.device)
        this, other = self._aligned(other)
        hidden = torch.where(m[:, None, None], other.hidden.expand_as(this.hidden), this.hidden)
        pooled = token_mask = None
        if this.pooled is not None and other.pooled is not None:
            pooled = torch.where(m[:, None], other.pooled.expand_as(this.pooled), this.pooled)
        if this.token_mask is not None and other.token_mask is not None:
            other_mask = other.token_mask.expand_as(this.token_mask)
            token_mask = torch.where(m[:, None], other_mask, this.token_mask)
        return TextCond(hidden, pooled, token_mask)


def encode_text(
    pipeline: Any, prompts: list[str], device: torch.device, *, grad: bool = False
) -> TextCond:
    """The pipeline's own prompt encoding (its family's), so training sees what generation
    will feed. `grad=True` keeps autograd on (textual inversion trains the embedding row)."""
    # Imported here: the family modules import TextCond from this module.
    from gpu_runner.families import family_of_pipeline

    return family_of_pipeline(pipeline).encode_text(pipeline, prompts, device, grad=grad)


# Pixels the VAE encodes at once: its full-resolution activations are ~2 GB per 1024 px
# image in fp32 (SDXL's VAE upcasts), so 8 at a time put a 16 GB spike before step 1.
_ENCODE_PIXELS = 4 * 512 * 512


def encode_latent_dist(
    vae: Any, pixels: torch.Tensor, batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std for each image (fp32, on the pixels' device), `batch`
    images at a time (default: 4 at 512 px, 1 at 1024 px)."""
    if batch is None:
        batch = max(1, _ENCODE_PIXELS // (pixels.shape[-2] * pixels.shape[-1]))
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch):
            chunk = pixels[start : start + batch].to(vae.device, vae.dtype)
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def shift_and_scale(z: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """The VAE's own latent normalisation (its config's shift_factor and scaling_factor)."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (z - shift) * vae_config.scaling_factor


def sample_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator,
    vae_config: Any,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw z ~ N(mean, std) with a CPU generator (same draw on any device), then scale:
    by `scale` (the family's, ModelFamily.latent_scaler) or the VAE config's shift and scale."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    z = mean + std * eps
    return scale(z) if scale is not None else shift_and_scale(z, vae_config)


@dataclass
class PreparedData:
    """Everything the loop needs about the images, built once per run."""

    pixels: list[torch.Tensor]  # per image (3, H, W) at its bucket, in [-1, 1], CPU
    buckets: list[Bucket]  # per image
    time_ids: torch.Tensor  # (N, 6) SDXL size/crop ids (unused for SD1.5)
    captions: list[str]  # with the trigger inserted
    train_idx: list[int]
    val_idx: list[int]
    latent_mean: list[torch.Tensor] | None = None  # per image (C, h, w), on the device
    latent_std: list[torch.Tensor] | None = None
    # The same for each image mirrored left to right (runs with flip only).
    mirrored_mean: list[torch.Tensor] | None = None
    mirrored_std: list[torch.Tensor] | None = None
    text: TextCond | None = None  # per image caption
    empty_text: TextCond | None = None  # caption dropout target

    @property
    def held_out(self) -> bool:
        """Whether validation images are kept out of training (see HOLD_OUT_FROM)."""
        return set(self.val_idx).isdisjoint(self.train_idx)

    def by_bucket(self, idx: Sequence[int]) -> list[list[int]]:
        """`idx` split by bucket (buckets in order, each keeping idx's order)."""
        groups: dict[Bucket, list[int]] = {}
        for i in idx:
            groups.setdefault(self.buckets[i], []).append(i)
        return [groups[b] for b in sorted(groups)]

    def stack(self, idx: Sequence[int], flips: torch.Tensor | None = None) -> torch.Tensor:
        """(len(idx), 3, H, W) pixels of images that share a bucket, mirrored left to right
        where `flips` is True."""
        if len({self.buckets[i] for i in idx}) > 1:
            raise ValueError("a batch is drawn from one bucket")
        flipped = [False] * len(idx) if flips is None else flips.tolist()
        return torch.stack(
            [
                self.pixels[i].flip(-1) if f else self.pixels[i]
                for i, f in zip(idx, flipped, strict=True)
            ]
        )

    def latents(
        self, idx: Sequence[int], flips: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached posterior mean and std of images that share a bucket, stacked: of the
        mirrored image where `flips` is True."""
        assert self.latent_mean is not None and self.latent_std is not None
        means, stds = [], []
        for row, i in enumerate(idx):
            mirrored = flips is not None and bool(flips[row])
            if mirrored:
                assert self.mirrored_mean is not None and self.mirrored_std is not None
            means.append(self.mirrored_mean[i] if mirrored else self.latent_mean[i])  # type: ignore[index]
            stds.append(self.mirrored_std[i] if mirrored else self.latent_std[i])  # type: ignore[index]
        return torch.stack(means), torch.stack(stds)


def prepare_data(
    items: Sequence[TrainItem | tuple[ImageLike, str]],
    trigger: str,
    resolution: int,
    val_fraction: float,
    seed: int,
    *,
    grid: int = 8,
    buckets: bool = True,
) -> PreparedData:
    """Every image at its aspect-ratio bucket of about `resolution`² pixels (sides on the
    family's `grid`), or centre-cropped to the square with `buckets=False`."""
    items = as_items(items)
    choices = make_buckets(resolution, grid)
    square = Bucket(resolution, resolution)
    # One image at a time: each full-size decode is released before the next.
    pixels: list[torch.Tensor] = []
    chosen: list[Bucket] = []
    time_ids = torch.empty((len(items), 6))
    for i, it in enumerate(items):
        img = load_image(it.image, i)
        check_shape(img.size, _label(it.image, i))
        bucket = nearest_bucket(*img.size, choices, grid) if buckets else square
        tensor, ids = preprocess(img, bucket, _label(it.image, i))
        pixels.append(tensor)
        chosen.append(bucket)
        time_ids[i] = torch.tensor(ids, dtype=torch.float32)
    captions = [insert_trigger(it.caption, trigger) for it in items]
    train_idx, val_idx = split_indices(len(items), val_fraction, seed)
    return PreparedData(pixels, chosen, time_ids, captions, train_idx, val_idx)


def dataset_hash(items: Sequence[TrainItem | tuple[ImageLike, str]]) -> str:
    """Content hash of images (decoded pixels) and captions, for the export's metadata."""
    import hashlib

    h = hashlib.sha256()
    for i, it in enumerate(as_items(items)):
        img = load_image(it.image, i)
        h.update(f"{img.size}".encode())
        h.update(img.tobytes())
        h.update(it.caption.encode())
    return h.hexdigest()
