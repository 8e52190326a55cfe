"""Small copies of reference images for contact sheets and image cards.

Made once per blob (at upload, while the image is already at hand) and kept in a cache
folder, so `/style review` of a big dataset renders in milliseconds instead of decoding
every full-size image again. The cache is derived data: deleting it is harmless.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from storage.blobs import BlobStore

THUMB_SIDE = 176  # contact sheet cell
CARD_SIDE = 512  # single image card


class PreviewCache:
    def __init__(self, root: Path, blobs: BlobStore) -> None:
        self.root = Path(root)
        self.blobs = blobs

    def _path(self, sha256: str, side: int) -> Path:
        self.blobs.path(sha256)  # validates the hash: no input can leave the cache root
        return self.root / str(side) / sha256[:2] / f"{sha256}.png"

    def warm(self, sha256: str, png: bytes) -> None:
        """Make the previews of a freshly stored image from its bytes."""
        if all(self._path(sha256, side).exists() for side in (THUMB_SIDE, CARD_SIDE)):
            return
        with Image.open(io.BytesIO(png)) as im:
            self._make(sha256, _rgb(im))

    def thumbnail(self, sha256: str) -> Image.Image:
        return Image.open(io.BytesIO(self.png(sha256, THUMB_SIDE))).convert("RGB")

    def png(self, sha256: str, side: int) -> bytes:
        """The preview PNG with longest side `side` (THUMB_SIDE or CARD_SIDE)."""
        path = self._path(sha256, side)
        if not path.exists():
            with Image.open(self.blobs.path(sha256)) as im:
                self._make(sha256, _rgb(im))
        return path.read_bytes()

    def _make(self, sha256: str, image: Image.Image) -> None:
        """Resizes `image` in place (callers pass an image they no longer need)."""
        card = image
        # reducing_gap: a cheap box reduce first, then Lanczos from 1.5x the target size.
        card.thumbnail((CARD_SIDE, CARD_SIDE), Image.Resampling.LANCZOS, reducing_gap=1.5)
        thumb = card.copy()
        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS, reducing_gap=1.5)
        for side, im in ((CARD_SIDE, card), (THUMB_SIDE, thumb)):
            buf = io.BytesIO()
            im.save(buf, "PNG", compress_level=3)
            _write_atomic(self._path(sha256, side), buf.getvalue())


def _rgb(im: Image.Image) -> Image.Image:
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
