"""Image intake: refusals (with their reasons), normalisation, warnings, duplicates.

Every malformed file is made here in code; no binary fixtures.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageCms, ImageDraw, ImageStat, PngImagePlugin

from storage.blobs import BlobStore
from storage.ingest import (
    ImageRefused,
    IngestLimits,
    KnownImage,
    find_duplicates,
    ingest_image,
    prepare_image,
    safe_display_name,
)

# -- image makers ---------------------------------------------------------------


def pattern(seed: int, size: tuple[int, int] = (640, 640)) -> Image.Image:
    """A structured picture (shapes on a gradient) whose look depends on the seed."""
    rnd = random.Random(seed)
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = rnd.randrange(size[0]), rnd.randrange(size[1])
        x1, y1 = x0 + rnd.randrange(40, 300), y0 + rnd.randrange(40, 300)
        colour = tuple(rnd.randrange(256) for _ in range(3))
        shape = draw.ellipse if rnd.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    return im


def encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def noise_png() -> bytes:
    return encode(Image.effect_noise((128, 128), 64).convert("RGB"), "PNG")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR is rewritten (valid CRC) to claim another size."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def corrupt_webp() -> bytes:
    good = encode(pattern(1, (64, 64)), "WEBP")
    rnd = random.Random(7)
    # Keep the RIFF/WEBP/VP8 headers, scramble the compressed picture.
    return good[:20] + bytes(rnd.randrange(256) for _ in range(len(good) - 20))


def animated(fmt: str) -> bytes:
    frames = [pattern(s, (64, 64)) for s in (1, 2, 3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def zip_file() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("photo.png", encode(pattern(1, (32, 32)), "PNG"))
    return buf.getvalue()


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", max_bytes=50_000_000)


# -- refusals ---------------------------------------------------------------------

BIG_LIMIT = IngestLimits(max_pixels=200_000_000)

REFUSALS: list[tuple[str, Callable[[], bytes], str, IngestLimits | None, str]] = [
    ("png-truncated", lambda: noise_png()[:4000], "a.png", None, "a.png looks like a PNG but"),
    (
        "jpeg-truncated",
        lambda: encode(pattern(1), "JPEG")[:5000],
        "a.jpg",
        None,
        "a.jpg looks like a JPEG but could not be decoded (truncated or damaged)",
    ),
    ("webp-corrupt", corrupt_webp, "a.webp", None, "a.webp looks like a WebP but"),
    (
        "random-bytes",
        lambda: random.Random(1).randbytes(4096),
        "a.jpg",
        None,
        "a.jpg is not an image Atelier can read; upload a JPEG, PNG or WebP.",
    ),
    ("empty", lambda: b"", "a.png", None, "a.png is empty (0 bytes)"),
    ("zip-as-png", zip_file, "photo.png", None, "photo.png is a ZIP archive, not an image"),
    ("svg", lambda: SVG, "logo.svg", None, "logo.svg is an SVG (vector) file"),
    (
        "gif",
        lambda: encode(pattern(1, (32, 32)), "GIF"),
        "photo.gif",
        None,
        "photo.gif is a GIF; Atelier takes JPEG, PNG or WebP images",
    ),
    ("bmp", lambda: encode(pattern(1, (32, 32)), "BMP"), "a.bmp", None, "a.bmp is a BMP;"),
    ("tiff", lambda: encode(pattern(1, (32, 32)), "TIFF"), "a.tif", None, "a.tif is a TIFF;"),
    (
        "apng",
        lambda: animated("PNG"),
        "a.png",
        None,
        "a.png is an animated PNG (3 frames); Atelier takes still images",
    ),
    ("webp-animated", lambda: animated("WEBP"), "a.webp", None, "a.webp is an animated WebP"),
    # Beyond twice Pillow's own limit: Pillow raises DecompressionBombError.
    ("bomb", lambda: png_claiming(100_000, 100_000), "b.png", None, "decompression bomb"),
    # Between Pillow's limit and twice it, Pillow only warns; we still refuse.
    ("bomb-warning", lambda: png_claiming(10_000, 10_000), "b.png", BIG_LIMIT, "bomb"),
    (
        "over-pixel-limit",
        lambda: png_claiming(9000, 9000),
        "big.png",
        None,
        "big.png is 9000×9000 pixels (81.0 megapixels); Atelier takes images up to 40 megapixels",
    ),
    (
        "strip-wide",
        lambda: encode(Image.new("RGB", (65536, 1)), "PNG"),
        "strip.png",
        None,
        "strip.png is 65536×1 pixels, 65536 times as wide as it is tall; Atelier takes images "
        "up to 8:1, so crop it closer to square",
    ),
    (
        "strip-tall",
        lambda: encode(pattern(1, (600, 5100)), "PNG"),
        "tall.png",
        None,
        "tall.png is 600×5100 pixels, 8.5 times as tall as it is wide; Atelier takes images "
        "up to 8:1",
    ),
    (
        "over-byte-limit",
        lambda: encode(pattern(1, (32, 32)), "PNG") + bytes(31_000_000),
        "huge.png",
        None,
        "huge.png is 31.0 MB; Atelier takes images up to 30 MB",
    ),
]


@pytest.mark.parametrize(
    ("make", "filename", "limits", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSALS],
)
def test_refusals_give_a_reason_and_store_nothing(
    store: BlobStore,
    make: Callable[[], bytes],
    filename: str,
    limits: IngestLimits | None,
    expected: str,
) -> None:
    filters_before = list(warnings.filters)
    with pytest.raises(ImageRefused) as err:
        ingest_image(store, make(), filename, limits)
    reason = err.value.reason
    assert expected in reason
    assert str(err.value) == reason and "\n" not in reason
    assert files_under(store.root) == []
    # Per-call limits: Pillow's global and the warning filters are as they were.
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    assert list(warnings.filters) == filters_before


def test_blob_store_limit_becomes_a_refusal(tmp_path: Path) -> None:
    small = BlobStore(tmp_path / "blobs", max_bytes=1000)
    with pytest.raises(ImageRefused, match="too large to store once converted"):
        ingest_image(small, noise_png(), "noise.png")
    assert files_under(small.root) == []


def test_content_decides_not_the_name(store: BlobStore) -> None:
    data = encode(pattern(1), "PNG")
    result = ingest_image(store, data, "actually-a-png.gif")
    assert result.image.source_format == "PNG"


def test_multi_picture_jpeg_is_a_photo_not_an_animation() -> None:
    # Phones write MPO: a JPEG with extra pictures (depth map, preview). Frame 0 is the photo.
    photo, extra = pattern(1, (96, 64)), pattern(2, (96, 64))
    data = encode(photo, "MPO", save_all=True, append_images=[extra], quality=95)
    prepared = prepare_image(data, "iphone.jpg", IngestLimits(min_side=1))
    assert (prepared.source_format, prepared.width, prepared.height) == ("JPEG", 96, 64)
    with Image.open(io.BytesIO(prepared.png)) as stored:
        to_photo = ImageStat.Stat(ImageChops.difference(stored, photo)).mean
        to_extra = ImageStat.Stat(ImageChops.difference(stored, extra)).mean
        assert sum(to_photo) * 5 < sum(to_extra), (to_photo, to_extra)


# -- what an accepted image becomes ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_image_is_stored_as_metadata_free_rgb_png(store: BlobStore, fmt: str) -> None:
    data = encode(pattern(3, (640, 520)), fmt)
    result = ingest_image(store, data, f"ref.{fmt.lower()}")
    image = result.image
    assert (image.width, image.height, image.source_format) == (640, 520, fmt)
    assert image.source_sha256 == hashlib.sha256(data).hexdigest()
    assert image.source_size == len(data)
    assert result.blob.sha256 == image.png_sha256 == hashlib.sha256(image.png).hexdigest()
    assert result.warnings == () and result.duplicates == ()
    assert len(image.phash) == 16 and int(image.phash, 16) >= 0
    assert files_under(store.root) == [store.path(result.blob.sha256)]
    with Image.open(io.BytesIO(store.read_bytes(result.blob.sha256))) as stored:
        assert (stored.format, stored.mode, stored.size) == ("PNG", "RGB", (640, 520))


def test_exif_orientation_is_applied_and_metadata_dropped(store: BlobStore) -> None:
    # Stored 60 wide x 40 high with a red block in the top-left corner. Orientation 6
    # means "rotate 90° clockwise to view": upright it is 40x60, red at the top right.
    raw = Image.new("RGB", (60, 40), "white")
    raw.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(raw, "JPEG", quality=95, exif=exif.tobytes(), icc_profile=icc)

    result = ingest_image(store, data, "phone.jpg", IngestLimits(min_side=16))
    assert (result.image.width, result.image.height) == (40, 60)
    with Image.open(io.BytesIO(result.image.png)) as upright:
        assert upright.size == (40, 60)
        r, g, b = upright.getpixel((30, 10))
        assert r > 200 and g < 60 and b < 60, "red must end up top right"
        assert min(upright.getpixel((10, 10))) > 200, "top left is white"
        assert min(upright.getpixel((30, 50))) > 200, "bottom right is white"
        assert "exif" not in upright.info and len(upright.getexif()) == 0
        assert "icc_profile" not in upright.info, "no camera metadata is carried over"


def _i16_png() -> bytes:
    im = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        im.putpixel((x, 0), value)
    return encode(im, "PNG")


def _palette_png() -> bytes:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255])  # 0: red (made transparent), 1: blue
    im.putpixel((1, 0), 1)
    return encode(im, "PNG", transparency=0)


def _rgba(fmt: str) -> bytes:
    im = Image.new("RGBA", (3, 1))
    for x, px in enumerate([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)]):
        im.putpixel((x, 0), px)
    return encode(im, fmt, **({"lossless": True} if fmt == "WEBP" else {}))


def _la_png() -> bytes:
    im = Image.new("LA", (2, 1))
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (0, 255))
    return encode(im, "PNG")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(
            lambda: encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"),
            [(255, 0, 0)],
            id="cmyk-jpeg",
        ),
        # 16-bit grey is scaled to 8 bits, not clipped (Pillow's convert makes mid grey white).
        pytest.param(_i16_png, [(0, 0, 0), (127, 127, 127), (255, 255, 255)], id="16-bit"),
        pytest.param(_palette_png, [(255, 255, 255), (0, 0, 255)], id="palette+transparency"),
        pytest.param(
            lambda: _rgba("PNG"), [(255, 255, 255), (0, 0, 255), (127, 127, 127)], id="rgba-png"
        ),
        pytest.param(
            lambda: _rgba("WEBP"), [(255, 255, 255), (0, 0, 255), (127, 127, 127)], id="rgba-webp"
        ),
        pytest.param(_la_png, [(255, 255, 255), (0, 0, 0)], id="la-png"),
    ],
)
def test_modes_become_rgb_with_transparency_on_white(
    make: Callable[[], bytes], expected: list[tuple[int, int, int]]
) -> None:
    prepared = prepare_image(make(), "x.png", IngestLimits(min_side=1))
    with Image.open(io.BytesIO(prepared.png)) as im:
        assert im.mode == "RGB"
        for x, want in enumerate(expected):
            got = im.getpixel((x, 0))
            assert all(abs(g - w) <= 2 for g, w in zip(got, want, strict=True)), (x, got, want)


@pytest.mark.parametrize(
    ("size", "min_side", "warns"),
    [
        ((300, 900), 512, True),
        ((900, 300), 512, True),
        ((512, 512), 512, False),
        ((300, 900), 256, False),
    ],
)
def test_small_images_warn_but_are_kept(
    store: BlobStore, size: tuple[int, int], min_side: int, warns: bool
) -> None:
    result = ingest_image(
        store, encode(pattern(4, size), "PNG"), "s.png", IngestLimits(min_side=min_side)
    )
    assert store.exists(result.blob.sha256)
    if warns:
        (note,) = result.warnings
        assert f"s.png is only {size[0]}×{size[1]} pixels" in note
        assert f"under {min_side} pixels" in note and "detail" in note
    else:
        assert result.warnings == ()


def test_aspect_ratio_up_to_eight_to_one_is_taken(store: BlobStore) -> None:
    for size in ((4096, 512), (512, 4096)):
        result = ingest_image(store, encode(pattern(2, size), "PNG"), "wide.png")
        assert (result.image.width, result.image.height) == size and result.warnings == ()


def _near_black_16_bit_png() -> bytes:
    # Values 0..200 of 65535: a real picture in 16 bits, all 0 once in 8 bits.
    rnd = random.Random(3)
    im = Image.new("I;16", (640, 640))
    im.putdata([rnd.randrange(200) for _ in range(640 * 640)])
    return encode(im, "PNG")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_near_black_16_bit_png, id="16-bit-near-black"),
        pytest.param(
            lambda: encode(Image.new("RGB", (640, 640), (30, 90, 160)), "PNG"), id="solid"
        ),
        pytest.param(
            lambda: encode(Image.effect_noise((640, 640), 1).convert("RGB"), "JPEG"),
            id="faint-noise",
        ),
    ],
)
def test_flat_images_warn_but_are_kept(store: BlobStore, make: Callable[[], bytes]) -> None:
    result = ingest_image(store, make(), "flat.png")
    assert store.exists(result.blob.sha256)
    (note,) = result.warnings
    assert note.startswith("flat.png is almost one flat colour, so it teaches the model nothing")
    assert "16-bit" in note and "\n" not in note


def test_a_dark_picture_is_not_flat(store: BlobStore) -> None:
    dark = pattern(7).point(lambda v: v // 12)  # values 0..21: dark, but a picture
    assert ingest_image(store, encode(dark, "PNG"), "night.png").warnings == ()


# -- duplicates -------------------------------------------------------------------


def test_exact_and_near_duplicates(store: BlobStore) -> None:
    original = pattern(5)
    first = ingest_image(store, encode(original, "PNG"), "one.png")
    known = [
        KnownImage(
            id=1,
            source_sha256=first.image.source_sha256,
            blob_sha256=first.blob.sha256,
            phash=first.image.phash,
        )
    ]

    same_bytes = ingest_image(store, encode(original, "PNG"), "again.png", existing=known)
    assert [(d.kind, d.image_id, d.distance) for d in same_bytes.duplicates] == [("exact", 1, 0)]
    assert same_bytes.blob == first.blob and len(files_under(store.root)) == 1

    # Same pixels with a text chunk added: other upload bytes, same stored pixels.
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved")
    same_pixels = prepare_image(encode(original, "PNG", pnginfo=info), "c.png")
    assert same_pixels.source_sha256 != first.image.source_sha256
    assert [d.kind for d in find_duplicates(same_pixels, known)] == ["exact"]

    smaller_jpeg = encode(original.resize((400, 400), Image.Resampling.LANCZOS), "JPEG", quality=80)
    near = prepare_image(smaller_jpeg, "small.jpg")
    (flag,) = find_duplicates(near, known)
    assert flag.kind == "near" and flag.image_id == 1 and 0 <= flag.distance <= 6

    other = prepare_image(encode(pattern(6), "PNG"), "other.png")
    assert find_duplicates(other, known) == []
    # With a generous threshold the different picture would match; 6 is what keeps it apart.
    (loose,) = find_duplicates(other, known, max_distance=64)
    assert loose.distance > 6


def test_exact_flags_come_before_near_ones() -> None:
    prepared = prepare_image(encode(pattern(8), "PNG"), "p.png")
    near_twin = prepare_image(encode(pattern(8).resize((500, 500)), "JPEG", quality=85), "q.jpg")
    known = [
        KnownImage("near", near_twin.source_sha256, near_twin.png_sha256, near_twin.phash),
        KnownImage("same", prepared.source_sha256, prepared.png_sha256, prepared.phash),
    ]
    assert [d.image_id for d in find_duplicates(prepared, known)] == ["same", "near"]


# -- display names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("photo.jpg", "photo.jpg"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\ana\\Desktop\\ref 01.png", "ref 01.png"),
        ("two\nlines\x00and\tnul.png", "two lines and nul.png"),
        ("invoice\u202egnp.exe", "invoice gnp.exe"),
        ("", "image"),
        ("..", "image"),
        ("dir/", "image"),
        ("  \r\n ", "image"),
    ],
)
def test_safe_display_name(raw: str, expected: str) -> None:
    assert safe_display_name(raw) == expected


def test_long_names_are_cut_but_keep_their_extension() -> None:
    name = safe_display_name("a" * 300 + ".jpeg")
    assert len(name) <= 80 and name.endswith("….jpeg")


def test_refusal_reason_shows_the_safe_name(store: BlobStore) -> None:
    with pytest.raises(ImageRefused) as err:
        ingest_image(store, encode(pattern(1, (32, 32)), "GIF"), "../../tmp/\x1b[31mcat.gif")
    assert err.value.reason.startswith("[31mcat.gif is a GIF;")
