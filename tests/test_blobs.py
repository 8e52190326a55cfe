"""Blob store: addressing, atomic writes, dedup, size limit, path safety, crash leftovers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import blobs as blobs_module
from storage.blobs import (
    TEMP_PREFIX,
    BlobError,
    BlobNotFound,
    BlobRef,
    BlobStore,
    BlobTooLarge,
    InvalidBlobHash,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", max_bytes=1000)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _put_bytes(store: BlobStore, data: bytes) -> BlobRef:
    return store.put_bytes(data)


def _put_stream(store: BlobStore, data: bytes) -> BlobRef:
    return store.put_stream(data[i : i + 7] for i in range(0, len(data), 7))


PUTS = [pytest.param(_put_bytes, id="bytes"), pytest.param(_put_stream, id="stream")]


@pytest.mark.parametrize("put", PUTS)
def test_put_stores_by_sha256_in_fanout_dirs(store: BlobStore, put) -> None:
    data = b"reference image bytes" * 10
    ref = put(store, data)
    digest = hashlib.sha256(data).hexdigest()
    assert ref == BlobRef(digest, len(data))
    assert files_under(store.root) == [store.root / digest[:2] / digest[2:4] / digest]
    assert store.path(digest) == store.root / digest[:2] / digest[2:4] / digest
    assert store.exists(digest)
    assert store.read_bytes(digest) == data
    assert store.size(digest) == len(data)
    with store.open(digest) as f:
        assert f.read() == data
    assert store.path(digest).stat().st_mode & 0o222 == 0, "blobs are stored read-only"


@pytest.mark.parametrize("put", PUTS)
def test_second_write_of_same_content_changes_nothing(
    store: BlobStore, put, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = put(store, b"same content")
    before = store.path(first.sha256).stat()

    def no_replace(*_args: object) -> None:
        raise AssertionError("an existing blob must not be replaced")

    monkeypatch.setattr(blobs_module.os, "replace", no_replace)
    assert put(store, b"same content") == first
    after = store.path(first.sha256).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert files_under(store.root) == [store.path(first.sha256)], "no temp file left either"


def test_limit_is_inclusive_and_enforced_for_bytes(store: BlobStore) -> None:
    assert store.put_bytes(b"x" * 1000).size == 1000
    with pytest.raises(BlobTooLarge) as err:
        store.put_bytes(b"y" * 1001)
    assert isinstance(err.value, BlobError)
    assert "limit" in str(err.value)
    assert files_under(store.root) == [store.path(hashlib.sha256(b"x" * 1000).hexdigest())]


def test_stream_stops_reading_at_the_limit_and_leaves_nothing(store: BlobStore) -> None:
    consumed: list[int] = []

    def endless() -> Iterator[bytes]:
        for i in range(1_000_000):
            consumed.append(i)
            yield b"z" * 300

    with pytest.raises(BlobTooLarge):
        store.put_stream(endless())
    assert len(consumed) == 4, "the 4th chunk crosses 1000 bytes; reading must stop there"
    assert files_under(store.root) == []


def test_failed_download_leaves_nothing(store: BlobStore) -> None:
    def broken() -> Iterator[bytes]:
        yield b"partial "
        raise ConnectionError("peer went away")

    with pytest.raises(ConnectionError):
        store.put_stream(broken())
    assert files_under(store.root) == []


def test_failed_rename_leaves_no_temp_and_no_blob(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_error(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blobs_module.os, "replace", disk_error)
    with pytest.raises(OSError, match="No space"):
        store.put_bytes(b"will not land")
    assert files_under(store.root) == []


@pytest.mark.parametrize(
    "bad",
    [
        "../etc/passwd",
        "../" + "a" * 61,
        "/" + "a" * 63,
        "",
        "a" * 63,
        "a" * 65,
        "A" * 64,
        "g" * 64,
        "a" * 64 + "\n",
        "a" * 62 + "/.",
    ],
)
def test_malformed_hashes_are_rejected_everywhere(store: BlobStore, bad: str) -> None:
    for call in (store.path, store.exists, store.read_bytes, store.size, store.open):
        with pytest.raises(InvalidBlobHash) as err:
            call(bad)
        assert isinstance(err.value, ValueError) and isinstance(err.value, BlobError)


def test_missing_blob_raises_typed_error(store: BlobStore) -> None:
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(digest)
    for call in (store.read_bytes, store.size, store.open):
        with pytest.raises(BlobNotFound) as err:
            call(digest)
        assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, BlobError)


def test_rejects_non_positive_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BlobStore(tmp_path, max_bytes=0)


def test_crashed_writer_leaves_a_temp_that_cleanup_removes(store: BlobStore) -> None:
    # A real crash: the process dies (os._exit) halfway through a streamed write.
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from storage.blobs import BlobStore\n"
        "def chunks():\n"
        "    yield b'half a download'\n"
        "    os._exit(3)\n"
        "BlobStore(Path(sys.argv[1]), 1000).put_stream(chunks())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(store.root)], cwd=REPO, capture_output=True
    )
    assert proc.returncode == 3, proc.stderr.decode()
    leftovers = files_under(store.root)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(TEMP_PREFIX)
    assert leftovers[0].parent == store.temp_dir

    # A fresh temp (a writer still at work) and a foreign file must survive.
    fresh = store.temp_dir / f"{TEMP_PREFIX}live"
    fresh.write_bytes(b"in progress")
    foreign = store.temp_dir / "not-ours.txt"
    foreign.write_bytes(b"keep")
    hour_ago = time.time() - 3600
    os.utime(leftovers[0], (hour_ago, hour_ago))
    os.utime(foreign, (hour_ago, hour_ago))

    assert store.remove_stale_temp(older_than_s=600) == 1
    assert not leftovers[0].exists()
    assert fresh.exists() and foreign.exists()
    assert store.remove_stale_temp(older_than_s=600) == 0


def test_cleanup_on_a_store_never_written_is_a_no_op(store: BlobStore) -> None:
    assert store.remove_stale_temp(older_than_s=0) == 0
