"""Reference-image intake: check an uploaded file, normalise it, store it by hash.

Only JPEG, PNG and WebP are taken, judged by their bytes, never by the name. Every
image is fully decoded before it is accepted, turned upright (EXIF orientation),
flattened to 8-bit RGB and stored as a metadata-free PNG, so training sees exactly
the pixels a person saw and no camera GPS tags are kept.
"""

from __future__ import annotations

import hashlib
import io
import struct
import unicodedata
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import imagehash
import numpy as np
from PIL import Image, ImageOps, ImageStat

from storage.blobs import BlobRef, BlobStore, BlobTooLarge

_ACCEPTED = "Atelier takes JPEG, PNG or WebP images"
_FORMAT_LABEL = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}
# What Pillow raises on malformed input; anything here means "damaged file".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, zlib.error)
# Long side over short side. Training crops a square from the middle, so a thin strip
# keeps a sliver of the picture, and its short side scaled to the training resolution makes
# an enormous image (65536x1 at 512 px: 33554432x512, ~51 GB). Training holds the same limit.
MAX_ASPECT = 8.0
# Standard deviation (of 255) under which every channel counts as flat: a solid colour, or a
# 16-bit file whose values all sit near black and so become 0 in 8 bits.
_FLAT_STDDEV = 2.0


@dataclass(frozen=True, slots=True)
class IngestLimits:
    max_bytes: int = 30_000_000
    max_pixels: int = 40_000_000
    min_side: int = 512  # below this we warn, we do not refuse
    max_aspect: float = MAX_ASPECT


class ImageRefused(ValueError):
    """The file is not taken; ``reason`` is one line to show the person who sent it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PreparedImage:
    png: bytes  # normalised RGB image, lossless
    width: int  # after EXIF orientation
    height: int
    source_format: str  # "JPEG", "PNG" or "WEBP" (Pillow's names)
    png_sha256: str  # of ``png``: the blob hash it will be stored under
    source_sha256: str  # of the bytes as uploaded
    source_size: int
    phash: str  # 16 hex digits, imagehash.phash of the normalised image
    display_name: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KnownImage:
    """An image already in the dataset, as far as duplicate checks need it."""

    id: int | str
    source_sha256: str
    blob_sha256: str
    phash: str


@dataclass(frozen=True, slots=True)
class DuplicateFlag:
    kind: Literal["exact", "near"]
    image_id: int | str
    distance: int  # phash Hamming distance (0..64); exact copies report their real distance


@dataclass(frozen=True, slots=True)
class IngestedImage:
    blob: BlobRef
    image: PreparedImage
    duplicates: tuple[DuplicateFlag, ...] = field(default=())

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.image.warnings


# -- public API -------------------------------------------------------------


def ingest_image(
    blobs: BlobStore,
    data: bytes,
    filename: str,
    limits: IngestLimits | None = None,
    existing: Sequence[KnownImage] = (),
) -> IngestedImage:
    """Check, normalise and store one upload. Raises ImageRefused; a refusal stores nothing."""
    prepared = prepare_image(data, filename, limits)
    try:
        ref = blobs.put_bytes(prepared.png)
    except BlobTooLarge:
        raise ImageRefused(
            f"{prepared.display_name} is too large to store once converted; "
            "resize it and upload again."
        ) from None
    return IngestedImage(ref, prepared, tuple(find_duplicates(prepared, existing)))


def prepare_image(data: bytes, filename: str, limits: IngestLimits | None = None) -> PreparedImage:
    """Validate and normalise an upload in memory; stores nothing. Raises ImageRefused."""
    limits = limits or IngestLimits()
    name = safe_display_name(filename)
    if not data:
        raise ImageRefused(f"{name} is empty (0 bytes); upload the image file again.")
    if len(data) > limits.max_bytes:
        raise ImageRefused(
            f"{name} is {len(data) / 1e6:.1f} MB; Atelier takes images up to "
            f"{limits.max_bytes / 1e6:g} MB, so export a smaller copy and try again."
        )
    fmt = _sniff_format(data, name)
    rgb, notes = _decode(data, fmt, name, limits)
    width, height = rgb.size
    if min(width, height) < limits.min_side:
        notes.append(
            f"{name} is only {width}×{height} pixels; images under {limits.min_side} pixels "
            "on the short side teach the model blur instead of detail, so use a larger "
            "copy if you have one."
        )
    if max(ImageStat.Stat(rgb).stddev) < _FLAT_STDDEV:
        notes.append(
            f"{name} is almost one flat colour, so it teaches the model nothing; if it "
            "should show a picture, export it again as an 8-bit sRGB image (16-bit and HDR "
            "files can come out all black)."
        )
    buf = io.BytesIO()
    rgb.save(buf, "PNG", compress_level=3)  # level 6 is ~3x slower for ~no gain on photos
    png = buf.getvalue()
    return PreparedImage(
        png=png,
        width=width,
        height=height,
        source_format=fmt,
        png_sha256=hashlib.sha256(png).hexdigest(),
        source_sha256=hashlib.sha256(data).hexdigest(),
        source_size=len(data),
        phash=str(imagehash.phash(rgb)),
        display_name=name,
        warnings=tuple(notes),
    )


def find_duplicates(
    prepared: PreparedImage, existing: Sequence[KnownImage], max_distance: int = 6
) -> list[DuplicateFlag]:
    """Exact copies (same upload bytes or same pixels) first, then near copies by phash."""
    mine = imagehash.hex_to_hash(prepared.phash)
    flags: list[DuplicateFlag] = []
    for known in existing:
        distance = int(mine - imagehash.hex_to_hash(known.phash))
        same_bytes = known.source_sha256 == prepared.source_sha256
        if same_bytes or known.blob_sha256 == prepared.png_sha256:
            flags.append(DuplicateFlag("exact", known.id, distance))
        elif distance <= max_distance:
            flags.append(DuplicateFlag("near", known.id, distance))
    flags.sort(key=lambda f: (f.kind != "exact", f.distance))
    return flags


def safe_display_name(filename: str, max_len: int = 80) -> str:
    """A file name fit to show in chat: no directories, no control or bidi characters."""
    name = unicodedata.normalize("NFC", filename or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    # Cc: control chars (newlines etc.); Cf: invisible format chars such as RTL override.
    name = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in name)
    # Cs: lone surrogates (a name that was not UTF-8); no database or chat can hold them.
    name = "".join("\ufffd" if unicodedata.category(c) == "Cs" else c for c in name)
    name = " ".join(name.split())
    if name.strip(".") == "":
        return "image"
    if len(name) > max_len:
        stem, dot, ext = name.rpartition(".")
        ext = dot + ext if dot and stem and len(ext) <= 8 else ""
        name = name[: max_len - len(ext) - 1].rstrip() + "…" + ext
    return name


# -- internals ----------------------------------------------------------------


def _sniff_format(data: bytes, name: str) -> str:
    """Pillow format name for accepted files; refuse everything else with what it is."""
    head = data[:512]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    kind = _other_kind(head)
    if kind is None:
        raise ImageRefused(f"{name} is not an image Atelier can read; upload a JPEG, PNG or WebP.")
    raise ImageRefused(f"{name} is {kind}; {_ACCEPTED}, so convert it and upload again.")


def _other_kind(head: bytes) -> str | None:
    magic = {
        b"GIF87a": "a GIF",
        b"GIF89a": "a GIF",
        b"BM": "a BMP",
        b"II*\x00": "a TIFF",
        b"MM\x00*": "a TIFF",
        b"PK\x03\x04": "a ZIP archive, not an image",
        b"%PDF": "a PDF, not an image",
        b"8BPS": "a Photoshop (PSD) file",
    }
    for prefix, kind in magic.items():
        if head.startswith(prefix):
            return kind
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand.startswith(b"avi"):
            return "an AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "a HEIC photo (an iPhone setting: Camera > Formats > Most Compatible)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and b"<svg" in text:
        return "an SVG (vector) file"
    if text.startswith((b"<!doctype html", b"<html")):
        return "a web page, not an image"
    return None


def _decode(
    data: bytes, fmt: str, name: str, limits: IngestLimits
) -> tuple[Image.Image, list[str]]:
    """Fully decode, refuse bombs, oversize and animation, return upright 8-bit RGB."""
    label = _FORMAT_LABEL[fmt]
    damaged = ImageRefused(
        f"{name} looks like a {label} but could not be decoded (truncated or damaged); "
        "export it again and upload the new file."
    )
    bomb = ImageRefused(
        f"{name} claims far more pixels than its size allows (a possible decompression "
        f"bomb); upload an image under {limits.max_pixels / 1e6:g} megapixels."
    )
    # Pillow's bomb check warns before it errors; make the warning a refusal too.
    # catch_warnings restores the filters on exit (Pillow's MAX_IMAGE_PIXELS is left alone;
    # our own per-call limit is the header check below).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                _check_shape(im, name, label, limits)
                im.load()
                notes = _make_upright(im, name)
                return _to_rgb(im), notes
        except ImageRefused:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise bomb from None
        except _DECODE_ERRORS:
            raise damaged from None


def _check_shape(im: Image.Image, name: str, label: str, limits: IngestLimits) -> None:
    """Checks that need only the header, run before any pixel is decoded."""
    width, height = im.size
    if width * height > limits.max_pixels:
        raise ImageRefused(
            f"{name} is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels); "
            f"Atelier takes images up to {limits.max_pixels / 1e6:g} megapixels, "
            "so resize it and try again."
        )
    long_side, short_side = max(width, height), min(width, height)
    if long_side > limits.max_aspect * short_side:
        shape = "wide" if width > height else "tall"
        ratio = f"{long_side / short_side:.1f}".removesuffix(".0")
        raise ImageRefused(
            f"{name} is {width}×{height} pixels, {ratio} times as {shape} as it is "
            f"{'tall' if shape == 'wide' else 'wide'}; Atelier takes images up to "
            f"{limits.max_aspect:g}:1, so crop it closer to square and upload again."
        )
    frames = getattr(im, "n_frames", 1)
    # Phone JPEGs (MPO) carry extra pictures such as depth maps; frame 0 is the photo.
    if frames > 1 and im.format in ("PNG", "WEBP"):
        raise ImageRefused(
            f"{name} is an animated {label} ({frames} frames); Atelier takes still images, "
            "so export a single frame and upload it."
        )


def _make_upright(im: Image.Image, name: str) -> list[str]:
    """Apply EXIF orientation in place (no 120 MB copy of a 40 MP photo when upright).

    A broken EXIF block costs a warning, not the image.
    """
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return [f"{name} has unreadable EXIF data, so its rotation was left as stored; check it."]
    return []


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB; transparency is composited on white, 16-bit grey scaled, not clipped."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own convert clips 16-bit values at 255; scale the range instead.
        grey = np.asarray(im).astype(np.int64).clip(0, 65535)
        im = Image.fromarray((grey * 255 // 65535).astype(np.uint8))
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = im if im.mode == "RGB" else im.convert("RGB")
    rgb.info = {}  # no EXIF/ICC/text carried into the stored PNG
    return rgb
