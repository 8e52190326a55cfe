"""Training data: captions with the trigger, image preprocessing, the validation split,
and the per-run cache of VAE latent distributions and text embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

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
    img: Image.Image, resolution: int, name: str = "an image"
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Shortest side to `resolution` (bicubic), center crop, to a CHW tensor in [-1, 1].

    Also returns SDXL's size/crop conditioning: (orig_h, orig_w, crop_top, crop_left, R, R).
    Shapes `check_shape` refuses raise DatasetError naming `name`."""
    w, h = img.size
    check_shape(img.size, name)
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left = (size[0] - resolution) // 2
    top = (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    time_ids = (h, w, top, left, resolution, resolution)
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
    """Shuffled epochs from its own generator; its state goes into checkpoints."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed + 104729)
        self.order: list[int] = []
        self.pos = 0

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.pos >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
        self.pos = int(state["pos"])


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

    def where(self, mask: torch.Tensor, other: TextCond) -> TextCond:
        """Per sample: `other` (e.g. the empty caption) where mask is True, else self."""
        m = mask.to(self.hidden.device)
        this = self
        masked = self.token_mask is not None or other.token_mask is not None
        if masked or self.hidden.shape[1] != other.hidden.shape[1]:
            tokens = max(self.hidden.shape[1], other.hidden.shape[1])
            this, other = self.padded(tokens), other.padded(tokens)
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

    pixels: torch.Tensor  # (N, 3, R, R) in [-1, 1], CPU
    time_ids: torch.Tensor  # (N, 6) SDXL size/crop ids (unused for SD1.5)
    captions: list[str]  # with the trigger inserted
    train_idx: list[int]
    val_idx: list[int]
    latent_mean: torch.Tensor | None = None  # (N, 4, R/8, R/8), on the training device
    latent_std: torch.Tensor | None = None
    text: TextCond | None = None  # per image caption
    empty_text: TextCond | None = None  # caption dropout target

    @property
    def held_out(self) -> bool:
        """Whether validation images are kept out of training (see HOLD_OUT_FROM)."""
        return set(self.val_idx).isdisjoint(self.train_idx)


def prepare_data(
    items: Sequence[TrainItem | tuple[ImageLike, str]],
    trigger: str,
    resolution: int,
    val_fraction: float,
    seed: int,
) -> PreparedData:
    items = as_items(items)
    # Filled one image at a time: each full-size decode is released before the next.
    pixels = torch.empty((len(items), 3, resolution, resolution))
    time_ids = torch.empty((len(items), 6))
    for i, it in enumerate(items):
        pixels[i], ids = preprocess(load_image(it.image, i), resolution, _label(it.image, i))
        time_ids[i] = torch.tensor(ids, dtype=torch.float32)
    captions = [insert_trigger(it.caption, trigger) for it in items]
    train_idx, val_idx = split_indices(len(items), val_fraction, seed)
    return PreparedData(pixels, time_ids, captions, train_idx, val_idx)


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
