"""Hostile input through the real command core: each gets a clear reply, none crashes the
core, and a refusal leaves nothing behind (no rows, no blobs, no preview files).

The files are made in code by `hostile_corpus`. Uploads go in as `/style add` attachments,
text as command arguments (some through the same text parser Slack and the console use),
and a few through the bolt App with signed Slack requests, to show the adapter survives
them too. LoRA files go through `gpu_runner.lora_import`, which reads every adapter file's
header before a pipeline loads it.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import hostile_corpus as hc
import numpy as np
import pytest
from fake_slack_api import (
    FakeSlackApi,
    InlineExecutor,
    event_callback,
    file_share_event,
    signed_headers,
    slash_command_form,
)
from PIL import Image
from slack_bolt import BoltRequest
from slack_sdk import WebClient

from bot.commands import FileTooLarge, IncomingFile, Reply, TeamRef
from bot.core import CorePolicy
from bot.slack.app import build_slack_app
from storage.db import Database
from storage.models import (
    Caption,
    DatasetVersion,
    Generation,
    Job,
    ModelVersion,
    ReferenceImage,
    Style,
    TrainingRun,
)

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import (  # noqa: E402
    Rig,
    add_model_version,
    build_rig,
    command,
    mem_file,
)

pytest_plugins = ("bot_fixtures",)

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
SORRY = "Something went wrong"
TABLES = (
    Style,
    DatasetVersion,
    ReferenceImage,
    Caption,
    Job,
    TrainingRun,
    ModelVersion,
    Generation,
)


# -- what "left nothing behind" means ---------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    rows: dict[str, int]
    files: frozenset[str]


def footprint(rig: Rig) -> Footprint:
    data = rig.settings.data_dir
    files = frozenset(
        str(p.relative_to(data)) for p in data.rglob("*") if p.is_file() and p.parent.name != "tmp"
    )
    return Footprint({t.__name__: rig.count(t) for t in TABLES}, files)


def assert_clear(replies: Sequence[Reply], fragment: str, caplog: pytest.LogCaptureFixture) -> str:
    """One reply, saying `fragment`, and no sign of a crash (apology or logged error)."""
    assert len(replies) == 1, replies
    text = replies[0].text
    assert fragment in text, text
    assert SORRY not in text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    text.encode("utf-8")  # sendable: no lone surrogates reach a platform
    return text


@pytest.fixture
def rig(db: Database, tmp_path: Path) -> Iterator[Rig]:
    """A style `ink` with a trained model, so every command below has something real to act
    on (its trigger selects a model); no rate limit (many commands per test)."""
    rig = build_rig(db, tmp_path, policy=CorePolicy(rate_limit_commands=10_000))
    assert "Created" in rig.text("style create", {"name": "ink", "trigger": "inkstyle"})
    add_model_version(rig, "ink", kohya=b"kohya-bytes", diffusers=b"diffusers-bytes")
    rig.deliverer.deliver_due()
    yield rig


# -- uploads that are refused ------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    id: str
    make: Callable[[], bytes]
    filename: str
    expect: str


def _mode_1_huge() -> bytes:
    # A real 10000x6000 image (60 MP, over the 40 MP limit) that compresses to a few KB.
    return hc.encode(Image.new("1", (10_000, 6_000)), "PNG")


DAMAGED = "could not be decoded (truncated or damaged); export it again"
BOMB = "claims far more pixels than its size allows (a possible decompression bomb)"
CONVERT = "Atelier takes JPEG, PNG or WebP images, so convert it and upload again"

REFUSED_UPLOADS = [
    Upload(
        "png-truncated",
        lambda: hc.png(1, (128, 128))[:400],
        "a.png",
        "a.png looks like a PNG but could",
    ),
    Upload("png-corrupt-pixels", hc.png_corrupt_idat, "b.png", f"looks like a PNG but {DAMAGED}"),
    Upload("png-bad-checksum", hc.png_bad_crc, "c.png", "looks like a PNG but could not be"),
    Upload("png-text-chunk-bomb", hc.png_text_bomb, "d.png", "looks like a PNG but could not"),
    Upload("png-header-bomb", lambda: hc.png_claiming(100_000, 100_000), "e.png", BOMB),
    Upload("png-deflate-bomb-400MP", hc.png_deflate_bomb, "f.png", BOMB),
    Upload("jpeg-truncated", lambda: hc.jpeg()[:500], "g.jpg", "looks like a JPEG but could not"),
    Upload(
        "jpeg-garbage", hc.jpeg_garbage_after_magic, "h.jpg", f"looks like a JPEG but {DAMAGED}"
    ),
    Upload("jpeg-header-bomb", lambda: hc.jpeg_claiming(60_000, 60_000), "i.jpg", BOMB),
    Upload("webp-truncated", hc.webp_truncated, "j.webp", f"looks like a WebP but {DAMAGED}"),
    Upload("webp-corrupt", hc.webp_corrupt, "k.webp", "looks like a WebP but could not be decoded"),
    Upload("webp-header-bomb", lambda: hc.webp_claiming(16_000, 16_000), "l.webp", BOMB),
    Upload(
        "huge-dimensions",
        _mode_1_huge,
        "m.png",
        "m.png is 10000×6000 pixels (60.0 megapixels); Atelier takes images up to 40",
    ),
    Upload("empty-file", lambda: b"", "n.png", "n.png is empty (0 bytes); upload the image"),
    Upload(
        "zip-named-png", hc.zip_archive, "o.png", f"o.png is a ZIP archive, not an image; {CONVERT}"
    ),
    Upload("svg-named-png", lambda: hc.SVG, "p.png", f"p.png is an SVG (vector) file; {CONVERT}"),
    Upload("svg", lambda: hc.SVG, "logo.svg", "logo.svg is an SVG (vector) file"),
    Upload("html", lambda: hc.HTML, "q.png", "q.png is a web page, not an image"),
    Upload("pdf", lambda: hc.PDF, "r.jpg", "r.jpg is a PDF, not an image"),
    Upload("heic", lambda: hc.HEIC, "IMG_0001.HEIC", "Camera > Formats > Most Compatible"),
    Upload("executable", lambda: hc.ELF, "s.png", "s.png is not an image Atelier can read"),
    Upload("gif-animated", lambda: hc.animated("GIF"), "t.gif", f"t.gif is a GIF; {CONVERT}"),
    Upload(
        "webp-animated", lambda: hc.animated("WEBP"), "u.webp", "is an animated WebP (3 frames)"
    ),
    Upload(
        "png-animated", lambda: hc.animated("PNG"), "v.png", "v.png is an animated PNG (3 frames)"
    ),
    Upload("pickle-as-png", hc.pickle_bomb, "w.png", "w.png is not an image Atelier can read"),
    Upload("torch-ckpt", hc.torch_style_zip, "style.ckpt", "style.ckpt is a ZIP archive"),
    Upload("lora-safetensors", hc.sdxl_lora, "x.safetensors", "is not an image Atelier can read"),
    Upload(
        "bad-name-and-bad-bytes",
        lambda: b"",
        "../../\x1b[2J\u202eevil\nname.png",
        "evil name.png is empty (0 bytes)",
    ),
]


@SQLITE_ONLY
@pytest.mark.parametrize("upload", REFUSED_UPLOADS, ids=lambda u: u.id)
def test_a_hostile_upload_is_refused_clearly_and_stores_nothing(
    rig: Rig, upload: Upload, caplog: pytest.LogCaptureFixture
) -> None:
    before = footprint(rig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own chatter about the broken files
        replies = rig.run(
            "style add", {"name": "ink"}, files=[mem_file(upload.filename, upload.make())]
        )
    text = assert_clear(replies, upload.expect, caplog)
    assert text.startswith("Nothing was added to **ink**")
    assert footprint(rig) == before
    assert not Path("/tmp/atelier-pwned").exists()  # no pickle was ever loaded


@pytest.mark.parametrize(
    ("upload", "expect"),
    [
        pytest.param(
            (
                b"\xff\xfe caf\xe9.png".decode("utf-8", "surrogateescape"),
                lambda: hc.png(9)[:300],
            ),
            "\ufffd\ufffd caf\ufffd.png looks like a PNG but could not be decoded",
            id="name-not-utf8-and-truncated",
        ),
        pytest.param(("z.png", lambda: hc.png_claiming(90_000, 90_000)), BOMB, id="bomb"),
    ],
)
def test_refusals_store_nothing_on_both_databases(
    rig: Rig,
    upload: tuple[str, Callable[[], bytes]],
    expect: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = footprint(rig)
    name, make = upload
    replies = rig.run("style add", {"name": "ink"}, files=[mem_file(name, make())])
    assert_clear(replies, expect, caplog)
    assert footprint(rig) == before


@SQLITE_ONLY
def test_an_oversized_file_is_refused_before_a_byte_is_downloaded(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    before = footprint(rig)
    reads: list[int] = []
    declared = mem_file("giant.png", hc.png(1), size=5_000_000_000, reads=reads)
    replies = rig.run("style add", {"name": "ink"}, files=[declared])
    assert_clear(replies, "giant.png is 5000.0 MB; Atelier takes images up to 0.2 MB", caplog)
    assert reads == []
    # The size is undeclared (or a lie): the read itself stops at the limit.
    liar = mem_file("liar.png", hc.png(2) + bytes(300_000), size=10)
    replies = rig.run("style add", {"name": "ink"}, files=[liar])
    assert_clear(replies, "liar.png is over the 0.2 MB limit", caplog)
    assert footprint(rig) == before


@SQLITE_ONLY
def test_a_download_that_fails_midway_is_a_reply_not_a_crash(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(limit: int) -> bytes:
        raise ConnectionResetError("peer reset the connection")

    before = footprint(rig)
    replies = rig.run("style add", {"name": "ink"}, files=[IncomingFile("ref.png", broken)])
    assert_clear(replies, "ref.png could not be downloaded; post it again.", caplog)
    assert footprint(rig) == before


@SQLITE_ONLY
def test_too_many_files_at_once_are_refused_without_reading_any(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    reads: list[int] = []
    files = [mem_file(f"r{i}.png", b"x", reads=reads) for i in range(51)]
    before = footprint(rig)
    replies = rig.run("style add", {"name": "ink"}, files=files)
    assert_clear(replies, "That is 51 files; add at most 50 at a time.", caplog)
    assert reads == [] and footprint(rig) == before


def test_a_file_too_large_midway_from_the_platform_is_refused(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    def capped(limit: int) -> bytes:
        raise FileTooLarge("stopped at the limit")

    before = footprint(rig)
    replies = rig.run("style add", {"name": "ink"}, files=[IncomingFile("big.webp", capped)])
    assert_clear(replies, "big.webp is over the 0.2 MB limit", caplog)
    assert footprint(rig) == before


# -- uploads that are accepted, converted and sanitised -----------------------------------------


def _stored(rig: Rig, number: int) -> tuple[ReferenceImage, Image.Image]:
    [image] = [i for i in rig.images(rig.datasets("ink")[-1].id) if i.position == number]
    with Image.open(rig.blobs.path(image.blob_sha256)) as im:
        im.load()
        return image, im


def _added(
    rig: Rig, data: bytes, name: str, caplog: pytest.LogCaptureFixture
) -> tuple[ReferenceImage, Image.Image, str]:
    before = rig.count(ReferenceImage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        replies = rig.run("style add", {"name": "ink"}, files=[mem_file(name, data)])
    text = assert_clear(replies, "added 1 of 1 file", caplog)
    assert rig.count(ReferenceImage) == before + 1
    number = int(text.split("→ #")[1].split()[0])
    image, im = _stored(rig, number)
    assert im.format == "PNG" and im.mode == "RGB"
    assert not im.info.get("exif") and "icc_profile" not in im.info
    return image, im, text


@SQLITE_ONLY
def test_cmyk_jpeg_is_accepted_as_rgb_with_its_colours(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    _, im, _ = _added(rig, hc.cmyk_jpeg(), "print.jpg", caplog)
    original = np.asarray(hc.picture(20)).astype(int)
    assert im.size == (96, 96)
    assert np.abs(np.asarray(im).astype(int) - original).mean() < 4  # not inverted, not grey


@SQLITE_ONLY
def test_16_bit_png_is_scaled_to_8_bits_not_clipped(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    _, im, _ = _added(rig, hc.png_16bit(), "scan16.png", caplog)
    pixels = np.asarray(im)
    assert tuple(pixels[0, 0]) == (0, 0, 0) and tuple(pixels[-1, -1]) == (255, 255, 255)
    assert 120 <= pixels[48, 0, 0] <= 135  # the middle of the ramp stays mid grey


@SQLITE_ONLY
def test_palette_png_is_accepted_with_transparency_on_white(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    _, im, _ = _added(rig, hc.palette_png(), "indexed.png", caplog)
    with Image.open(io.BytesIO(hc.palette_png())) as source:
        transparent = np.asarray(source) == 0
    assert transparent.any()
    assert (np.asarray(im)[transparent] == 255).all()


@SQLITE_ONLY
def test_greyscale_with_alpha_is_accepted_as_rgb(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    _, im, _ = _added(rig, hc.greyscale_alpha_png(), "la.png", caplog)
    pixels = np.asarray(im)
    assert (pixels[..., 0] == pixels[..., 1]).all()  # still grey
    assert pixels[0, 0, 0] >= 250  # the (nearly) transparent corner composited on white


@SQLITE_ONLY
def test_a_png_zip_polyglot_is_stored_without_its_payload(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    image, _, _ = _added(rig, hc.png_zip_polyglot(), "innocent.png", caplog)
    stored = rig.blobs.read_bytes(image.blob_sha256)
    assert b"PK\x03\x04" not in stored and b"evil.png" not in stored


@SQLITE_ONLY
def test_exif_that_loops_or_lies_neither_hangs_nor_survives(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    _, looped, _ = _added(rig, hc.jpeg_exif_loop(), "loop.jpg", caplog)
    assert looped.size == (64, 80)  # its (valid) orientation was applied once
    _, garbage, _ = _added(rig, hc.jpeg_exif_garbage(), "garbage.jpg", caplog)
    assert garbage.size == (80, 64)


HOSTILE_NAMES = {
    "../../etc/passwd.png": "passwd.png",
    "/abs/path.png": "path.png",
    "..\\..\\windows\\evil.png": "evil.png",
    "nul\x00byte.png": "nul byte.png",
    "line\nbreak\r\x1b[2J.png": "line break [2J.png",
    "\u202egnp.exe": "gnp.exe",
    "..": "image",
    "": "image",
    b"\xff\xfe.png".decode("utf-8", "surrogateescape"): "\ufffd\ufffd.png",
}


@pytest.mark.parametrize(("raw", "shown"), list(HOSTILE_NAMES.items()), ids=repr)
def test_hostile_file_names_are_stored_by_hash_and_shown_tamed(
    rig: Rig, raw: str, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    seed = 100 + list(HOSTILE_NAMES).index(raw)
    image, _, text = _added(rig, hc.png(seed), raw, caplog)
    assert f"✓ {shown} → #" in text
    assert image.original_name == shown
    assert rig.blobs.path(image.blob_sha256).is_file()
    data = rig.settings.data_dir
    assert all(data in p.parents for p in rig.tmp.rglob("*") if p.is_file() and ".db" not in p.name)


@SQLITE_ONLY
def test_a_ten_thousand_character_file_name_is_cut(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    image, _, text = _added(rig, hc.png(150), "x" * 10_000 + ".png", caplog)
    assert len(image.original_name) <= 80 and image.original_name.endswith("….png")
    assert len(text) < 400


# -- hostile command arguments -------------------------------------------------------------------


@dataclass(frozen=True)
class Say:
    id: str
    command: str
    args: dict[str, str]
    expect: str


IMAGINE_USAGE = "Usage: `/imagine prompt"
NOT_TEXT = "has characters that cannot be stored (a NUL byte or broken UTF-8); retype it"

REFUSED_ARGUMENTS = [
    Say(
        "prompt-10000-chars", "imagine", {"prompt": "a" * 10_000}, "The prompt is 10000 characters"
    ),
    Say("prompt-blank", "imagine", {"prompt": " \t\n "}, "The prompt is empty"),
    Say("prompt-surrogates", "imagine", {"prompt": "a cat \udcff\udcfe"}, f"The prompt {NOT_TEXT}"),
    Say("prompt-nul", "imagine", {"prompt": "a cat\x00inkstyle"}, f"The prompt {NOT_TEXT}"),
    Say(
        "negative-surrogates",
        "imagine",
        {"prompt": "a cat", "negative": "\ud800"},
        f"The negative prompt {NOT_TEXT}",
    ),
    Say("negative-5000", "imagine", {"prompt": "a", "negative": "n" * 5000}, "keep it under 2000"),
    Say("seed-negative", "imagine", {"prompt": "a", "seed": "-5"}, "Seed must be between 0 and"),
    Say("seed-giant", "imagine", {"prompt": "a", "seed": "9" * 30}, "Seed must be between 0 and"),
    Say("seed-5000-digits", "imagine", {"prompt": "a", "seed": "9" * 5000}, "Seed must be a whole"),
    Say("seed-float", "imagine", {"prompt": "a", "seed": "1e9"}, "Seed must be a whole number"),
    Say("steps-negative", "imagine", {"prompt": "a", "steps": "-3"}, "Steps must be between 1 and"),
    Say("steps-zero", "imagine", {"prompt": "a", "steps": "0"}, "Steps must be between 1 and 150"),
    Say("steps-giant", "imagine", {"prompt": "a", "steps": "10" * 9}, "Steps must be between 1"),
    Say("size-giant", "imagine", {"prompt": "a", "size": "100000x100000"}, "64-2048 pixels"),
    Say("size-negative", "imagine", {"prompt": "a", "size": "-512x512"}, "64-2048 pixels"),
    Say("size-zero", "imagine", {"prompt": "a", "size": "0x0"}, "each side must be 64-2048"),
    Say("size-odd", "imagine", {"prompt": "a", "size": "513x512"}, "a multiple of 8"),
    Say("size-3d", "imagine", {"prompt": "a", "size": "512x512x512"}, "Size must look like"),
    Say("count-zero", "imagine", {"prompt": "a", "count": "0"}, "Count must be between 1 and 8"),
    Say(
        "count-giant", "imagine", {"prompt": "a", "count": "1000"}, "Count must be between 1 and 8"
    ),
    Say("count-negative", "imagine", {"prompt": "a", "count": "-1"}, "Count must be between 1"),
    Say("cfg-nan", "imagine", {"prompt": "a", "cfg": "nan"}, "must be between 0 and 30 (got nan)"),
    Say("cfg-inf", "imagine", {"prompt": "a", "cfg": "inf"}, "must be between 0 and 30 (got inf)"),
    Say("lora-weight-nan", "imagine", {"prompt": "a <lora:ink:nan>"}, "has weight nan; use a"),
    Say("lora-weight-inf", "imagine", {"prompt": "a <lora:ink:1e309>"}, "has weight inf"),
    Say("lora-path", "imagine", {"prompt": "a <lora:../../etc/passwd>"}, "names no style in this"),
    Say("trigger-emoji-only", "style create", {"name": "emo", "trigger": "🎨🖌️"}, "only emoji"),
    Say("trigger-skin-tone", "style create", {"name": "emo", "trigger": "👍🏽"}, "only emoji"),
    Say(
        "trigger-emoji-mixed", "style create", {"name": "emo", "trigger": "ink🎨"}, "may only hold"
    ),
    Say("trigger-digits", "style create", {"name": "n", "trigger": "12345"}, "at least one letter"),
    Say("trigger-spaces", "style create", {"name": "s", "trigger": "a b"}, "one word without"),
    Say("trigger-long", "style create", {"name": "l", "trigger": "x" * 500}, "2-32 characters"),
    Say("trigger-nul", "style create", {"name": "z", "trigger": "zz\x00q"}, NOT_TEXT),
    Say("trigger-surrogate", "style create", {"name": "z", "trigger": "zz\udcff"}, NOT_TEXT),
    Say("name-surrogate", "style create", {"name": "a\udcff", "trigger": "zzq"}, NOT_TEXT),
    Say("name-traversal", "style create", {"name": "../../etc", "trigger": "zzq"}, "1-40 letters"),
    Say("name-1000", "style create", {"name": "n" * 1000, "trigger": "zzq"}, "1-40 letters"),
    Say(
        "base-traversal",
        "style create",
        {"name": "b", "trigger": "zzq", "base": "../../m"},
        "no base",
    ),
    Say(
        "kind-huge", "style create", {"name": "k", "trigger": "zzq", "kind": "k" * 3000}, "style or"
    ),
    Say("train-steps-negative", "style train", {"name": "ink", "steps": "-1"}, "between 1 and"),
    Say("train-steps-giant", "style train", {"name": "ink", "steps": "999999999"}, "1 and 20000"),
    Say("train-rank-zero", "style train", {"name": "ink", "rank": "0"}, "Rank must be between 1"),
    Say("train-rank-giant", "style train", {"name": "ink", "rank": "100000"}, "between 1 and 128"),
    Say("train-lr-giant", "style train", {"name": "ink", "lr": "1e5"}, "Lr must be between"),
    Say("train-lr-nan", "style train", {"name": "ink", "lr": "nan"}, "(got nan)"),
    Say("caption-number", "style caption", {"name": "ink", "number": "-1", "text": "t"}, "Number"),
    Say(
        "caption-10000",
        "style caption",
        {"name": "ink", "number": "1", "text": "t" * 10_000},
        "1000",
    ),
    Say("caption-nul", "style caption", {"name": "ink", "number": "1", "text": "a\x00b"}, NOT_TEXT),
    Say("cancel-negative", "cancel", {"job": "-1"}, "Job must be between 1 and"),
    Say("cancel-giant", "cancel", {"job": "9" * 40}, "Job must be between 1 and"),
    Say("cancel-words", "cancel", {"job": "all; DROP TABLE jobs"}, "Job must be a whole number"),
]


@SQLITE_ONLY
@pytest.mark.parametrize("say", REFUSED_ARGUMENTS, ids=lambda s: s.id)
def test_a_hostile_argument_is_refused_clearly_and_stores_nothing(
    rig: Rig, say: Say, caplog: pytest.LogCaptureFixture
) -> None:
    before = footprint(rig)
    assert_clear(rig.run(say.command, say.args), say.expect, caplog)
    assert footprint(rig) == before


@pytest.mark.parametrize(
    ("command", "args", "expect"),
    [
        pytest.param("imagine", {"prompt": "a cat \udcff"}, NOT_TEXT, id="prompt-surrogate"),
        pytest.param(
            "style caption",
            {"name": "ink", "number": "1", "text": "nul\x00here"},
            f"The caption {NOT_TEXT}",
            id="caption-nul",  # PostgreSQL text cannot hold NUL: it used to crash there
        ),
        pytest.param("style create", {"name": "q", "trigger": "q\udcffq"}, NOT_TEXT, id="trigger"),
    ],
)
def test_text_no_database_can_hold_is_refused_on_both_databases(
    rig: Rig, command: str, args: dict[str, str], expect: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = footprint(rig)
    assert_clear(rig.run(command, args), expect, caplog)
    assert footprint(rig) == before


TYPED = [
    ("/imagine", '"' + "b" * 10_000 + '"', "The prompt is 10000 characters"),
    ("/imagine", "a cat seed=-5 steps=-3", "Seed must be between 0 and"),
    ("/imagine", "a cat size=100000x100000", "each side must be 64-2048 pixels"),
    ("/imagine", "a cat count=99999999999999999999", "Count must be between 1 and 8"),
    ("/imagine", 'a cat seed="never closed', "is not closed"),
    ("/imagine", "a cat bogus=1", "/imagine has no option 'bogus'"),
    ("/style", "create emo 🎨", "only emoji"),
    ("/style", "train ink steps=-100", "Steps must be between 1 and 20000"),
    ("/style", "caption ink 99999999999999999999999 hello", "Number must be between 1 and"),
    ("/cancel", "-1", "Job must be between 1 and"),
    ("/style", "\x00", "/style has no '\ufffd' command; use one of create"),
]


@SQLITE_ONLY
@pytest.mark.parametrize(("slash", "text", "expect"), TYPED, ids=[t[1][:24] for t in TYPED])
def test_hostile_typed_commands_through_the_text_parser(
    rig: Rig, slash: str, text: str, expect: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = footprint(rig)
    parsed = rig.core.text_parser(slash, text)
    assert_clear(rig.core.handle(command(parsed.name, parsed.args)), expect, caplog)
    assert footprint(rig) == before


@SQLITE_ONLY
@pytest.mark.parametrize("word", ["the", "Cat", "INK", "watercolor"])
def test_a_common_english_trigger_word_is_accepted_with_a_warning(
    rig: Rig, word: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"common-{word.lower()}"
    text = assert_clear(
        rig.run("style create", {"name": name, "trigger": word}),
        f"⚠ `{word}` is a common word, so the style will switch on whenever someone writes it",
        caplog,
    )
    assert f"Created style **{name}** with trigger `{word}`" in text
    assert rig.style(name).trigger == word


@SQLITE_ONLY
def test_a_trigger_clashing_in_another_case_is_refused(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    before = footprint(rig)
    text = assert_clear(
        rig.run("style create", {"name": "copy", "trigger": "INKSTYLE"}),
        "The trigger INKSTYLE already switches on style ink",
        caplog,
    )
    assert "pick another made-up word" in text
    assert footprint(rig) == before


@SQLITE_ONLY
def test_valid_edge_values_still_work(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    # The refusals above are not a blanket "no": the extremes of each range are taken.
    text = assert_clear(
        rig.run(
            "imagine",
            {
                "prompt": "p" * 2000,
                "seed": str(2**32 - 1),
                "steps": "150",
                "size": "2048x64",
                "count": "8",
                "cfg": "30",
            },
        ),
        "🎨 Queued 8 images",
        caplog,
    )
    assert "seed 4294967295" in text
    [job] = rig.jobs("generate")
    assert job.payload["width"] == 2048 and job.payload["steps"] == 150


# -- the same inputs arriving through Slack (signed requests into the bolt App) -----------------

SIGNING = "8f742231b10e8888abcd99yyyzzz85a5"


@SQLITE_ONLY
def test_hostile_slack_requests_get_answers_and_the_app_keeps_serving(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeSlackApi().running() as fake:
        client = WebClient(token=fake.bot_token, base_url=fake.api_url)
        app = build_slack_app(
            rig.core,
            rig.core.text_parser,
            client=client,
            signing_secret=SIGNING,
            executor=InlineExecutor(),
        )

        def send(body: str, content_type: str) -> int:
            headers = signed_headers(SIGNING, body, content_type=content_type)
            return app.dispatch(BoltRequest(body=body, headers=headers)).status

        workspace = TeamRef("slack", fake.team_id, "studio")
        rig.run("style create", {"name": "ink", "trigger": "inkstyle"}, team=workspace)
        rig.deliverer.deliver_due()
        thread = rig.sender.id_of(f"style:{rig.style('ink', workspace).id}:thread")
        before = footprint(rig)
        form = "application/x-www-form-urlencoded"
        # A 10,000-character prompt; then bytes that are not UTF-8 in a form body.
        long = slash_command_form(
            "/imagine", "x" * 10_000, response_url=fake.response_url("a"), trigger_id="t.1"
        )
        assert send(long, form) == 200
        broken = slash_command_form(
            "/style", "create ink zz", response_url=fake.response_url("b"), trigger_id="t.2"
        )
        assert send(broken.replace("create+ink", "create+caf%E9%FF"), form) == 200
        # A file event: a 0-byte file whose name is a lone surrogate in JSON.
        empty = fake.add_file(b"", name="empty.png")
        empty["name"] = "\udcffempty.png"
        event = event_callback(file_share_event([empty], thread_ts=thread), event_id="Ev0HOSTILE")
        assert send(json.dumps(event), "application/json") == 200

        answers = [c.params.get("text", "") for c in fake.calls if c.method != "download"]
        joined = "\n".join(answers)
        assert "The prompt is 10000 characters" in joined
        assert "Style name 'caf\ufffd\ufffd' must be 1-40 letters" in joined
        assert "\ufffdempty.png is empty (0 bytes)" in joined
        assert SORRY not in joined
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert footprint(rig) == before
        # Still serving: an ordinary command after all that works.
        assert (
            send(
                slash_command_form(
                    "/jobs", "", response_url=fake.response_url("c"), trigger_id="t.3"
                ),
                form,
            )
            == 200
        )
        assert "Your jobs" in fake.calls_to("respond")[-1].params["text"]


# -- LoRA files: the import gate ---------------------------------------------------------------

LORA_REFUSALS = [
    ("pickle.safetensors", hc.pickle_bomb, "it is named .safetensors but it is a Python pickle"),
    ("torch.safetensors", hc.torch_style_zip, "but it is a zip archive, the format torch.save"),
    ("style.ckpt", hc.pickle_bomb, "'.ckpt' files are pickles"),
    ("style.pt", hc.torch_style_zip, "'.pt' files are pickles"),
    ("style.bin", lambda: b"\x80\x04K\x01.", "'.bin' files are pickles"),
    ("lies.safetensors", lambda: hc.safetensors_header_lies(10**12), "header length"),
    ("short.safetensors", lambda: hc.safetensors_header_lies(100), "header length (100 bytes)"),
    ("empty.safetensors", lambda: b"", "too short to be safetensors"),
    ("outside.safetensors", hc.safetensors_offsets_outside, "points outside the file"),
    ("notjson.safetensors", lambda: b"\x10" + bytes(7) + b"\xff" * 16, "not valid JSON"),
    ("loha.safetensors", hc.lycoris_loha, "LyCORIS LoHa/LoKr/OFT file"),
    ("full.safetensors", hc.full_checkpoint, "full model checkpoint, not a LoRA"),
    ("style.txt", lambda: b"hello", "only .safetensors files can be imported"),
]


@pytest.mark.parametrize(
    ("name", "make", "expect"), LORA_REFUSALS, ids=[c[0] for c in LORA_REFUSALS]
)
def test_hostile_lora_files_are_refused_before_anything_loads_them(
    tmp_path: Path, name: str, make: Callable[[], bytes], expect: str
) -> None:
    from gpu_runner.lora_import import LoraImportError, inspect_adapter_file

    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(LoraImportError) as err:
        inspect_adapter_file(path)
    message = str(err.value)
    assert expect in message and "\n" not in message
    assert message.startswith(f"refused '{name}'")
    assert not Path("/tmp/atelier-pwned").exists()
