"""Content-addressed blob store: files named by the sha256 of their bytes.

Layout: ``root/ab/cd/<64 hex>``. A write goes to a temp file under ``root/tmp``
(same file system, so the final ``os.replace`` is atomic), is fsynced, then moved
into place; readers therefore see a whole blob or none. A blob is never rewritten:
if its hash is already stored the new bytes are dropped.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".atelier-blob-tmp-"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BlobError(Exception):
    """Base class for every error the blob store raises."""


class InvalidBlobHash(BlobError, ValueError):
    """The string given is not a lowercase 64-character sha256 hex digest."""


class BlobNotFound(BlobError, FileNotFoundError):
    """No blob is stored under this hash."""


class BlobTooLarge(BlobError):
    """The content is over the store's size limit; nothing was kept."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        super().__init__(
            f"file is over the {_mb(max_bytes)} limit (got at least {_mb(size)}); "
            "send a smaller file"
        )


@dataclass(frozen=True, slots=True)
class BlobRef:
    sha256: str
    size: int


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


class BlobStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.temp_dir = self.root / "tmp"

    # -- addressing -------------------------------------------------------

    def path(self, sha256: str) -> Path:
        """Where the blob lives; the strict hash check means no input can leave root."""
        if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
            raise InvalidBlobHash(
                f"not a blob hash: {sha256!r:.80}; expected 64 lowercase hex characters"
            )
        return self.root / sha256[:2] / sha256[2:4] / sha256

    # -- writing ----------------------------------------------------------

    def put_bytes(self, data: bytes) -> BlobRef:
        if len(data) > self.max_bytes:
            raise BlobTooLarge(len(data), self.max_bytes)
        ref = BlobRef(hashlib.sha256(data).hexdigest(), len(data))
        if self.path(ref.sha256).exists():
            return ref  # dedup: same hash, same bytes, nothing to write
        return self.put_stream([data])

    def put_stream(self, chunks: Iterable[bytes]) -> BlobRef:
        """Store a stream (e.g. a download), refusing it as soon as it passes the limit."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.temp_dir)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise BlobTooLarge(size, self.max_bytes)
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            ref = BlobRef(digest.hexdigest(), size)
            self._commit(tmp, ref.sha256)
            return ref
        except BaseException:
            # Failed writes, over-limit streams and interrupts leave no temp behind.
            tmp.unlink(missing_ok=True)
            raise

    def _commit(self, tmp: Path, sha256: str) -> None:
        dest = self.path(sha256)
        if dest.exists():
            tmp.unlink()
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)  # blobs are immutable; make accidental edits fail
        # A writer racing us on the same hash has identical bytes, so replace is harmless.
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)

    # -- reading ----------------------------------------------------------

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {sha256} in {self.root}") from None

    def read_bytes(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {sha256} in {self.root}") from None

    # -- maintenance ------------------------------------------------------

    def remove_stale_temp(self, older_than_s: float) -> int:
        """Delete temp files a crashed writer left behind; returns how many went."""
        if not self.temp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in self.temp_dir.iterdir():
            if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file():
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # a live writer committed or cleaned it meanwhile
        return removed


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
