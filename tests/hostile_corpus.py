"""Hostile files made in code: broken, lying, oversized and odd images, archives, pickles.

Nothing here is a binary fixture; every file is built from Pillow output or by hand from
the format's own layout (PNG chunks, JPEG markers, RIFF/WebP, safetensors headers), so a
reader can see exactly what each file claims and what it really holds.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# -- plain pictures ----------------------------------------------------------------------------


def picture(seed: int = 1, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """Shapes on a gradient (distinct per seed, so no two are near-duplicates)."""
    rnd = random.Random(seed)
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = rnd.randrange(size[0]), rnd.randrange(size[1])
        x1, y1 = x0 + rnd.randrange(10, 60), y0 + rnd.randrange(10, 60)
        colour = tuple(rnd.randrange(256) for _ in range(3))
        (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return im


def encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def png(seed: int = 1, size: tuple[int, int] = (96, 96)) -> bytes:
    return encode(picture(seed, size), "PNG")


def jpeg(seed: int = 1, size: tuple[int, int] = (96, 96)) -> bytes:
    return encode(picture(seed, size), "JPEG", quality=90)


def webp(seed: int = 1, size: tuple[int, int] = (96, 96)) -> bytes:
    return encode(picture(seed, size), "WEBP", quality=90)


# -- PNG built chunk by chunk --------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC (so only what we mean to break is broken)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a PNG file."""
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    return png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    )


def png_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose header (with a valid CRC) claims `width` x `height`."""
    real = encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG")
    rest = b"".join(png_chunk(k, d) for k, d in png_chunks(real) if k != b"IHDR")
    return PNG_SIGNATURE + ihdr(width, height) + rest


def png_deflate_bomb(side: int = 20_000) -> bytes:
    """A *valid* 1-bit PNG of side x side black pixels: ~50 KB that would decode to
    side² pixels (400 megapixels at the default), the classic decompression bomb."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed bits
    squash = zlib.compressobj(9)
    parts = [squash.compress(row * 500) for _ in range(side // 500)]
    parts.append(squash.flush())
    return (
        PNG_SIGNATURE
        + ihdr(side, side, bit_depth=1, colour_type=0)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def png_corrupt_idat() -> bytes:
    """Headers and CRCs all valid; the compressed pixel stream is garbage."""
    good = png(3, (64, 64))
    rnd = random.Random(5)
    out = [PNG_SIGNATURE]
    for kind, data in png_chunks(good):
        if kind == b"IDAT":
            data = data[:2] + rnd.randbytes(len(data) - 2)  # keep the zlib header only
        out.append(png_chunk(kind, data))
    return b"".join(out)


def png_bad_crc() -> bytes:
    """The IHDR's checksum is wrong: the classic sign of a file damaged in transit."""
    data = bytearray(png(4))
    data[29] ^= 0xFF  # first CRC byte of IHDR (8 signature + 4 len + 4 type + 13 data)
    return bytes(data)


def png_text_bomb() -> bytes:
    """A small PNG whose zTXt metadata chunk inflates to 64 MB of text."""
    good = png(5)
    squash = zlib.compressobj(9)
    payload = b"".join(squash.compress(bytes(1 << 20)) for _ in range(64)) + squash.flush()
    bomb = png_chunk(b"zTXt", b"Comment\x00\x00" + payload)
    chunks = png_chunks(good)
    body = b"".join(png_chunk(k, d) for k, d in chunks[:1]) + bomb
    body += b"".join(png_chunk(k, d) for k, d in chunks[1:])
    return PNG_SIGNATURE + body


def png_zip_polyglot() -> bytes:
    """A real PNG with a ZIP archive appended (a polyglot that smuggles files)."""
    return png(6) + zip_archive()


# -- JPEG and WebP -------------------------------------------------------------------------------


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF header claims another size (its scan data stays small)."""
    data = bytearray(jpeg(7, (64, 64)))
    pos = 2
    while pos < len(data):
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xC3:
            data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        pos += 2 + length
    raise AssertionError("no SOF marker in Pillow's JPEG")


def jpeg_garbage_after_magic() -> bytes:
    """JPEG's magic bytes, then noise: what a renamed or half-overwritten file looks like."""
    return b"\xff\xd8\xff\xe0" + random.Random(9).randbytes(3000)


def jpeg_with_exif(tiff: bytes) -> bytes:
    """A fine 80x64 JPEG carrying `tiff` (a TIFF structure) as its EXIF block."""
    good = jpeg(8, (80, 64))
    exif = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    return good[:2] + segment + good[2:]


def jpeg_exif_loop() -> bytes:
    """EXIF whose IFD chain points back at itself (a reader that follows it never ends)."""
    orientation = struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0)  # "rotate 90°", valid
    return jpeg_with_exif(b"MM\x00*\x00\x00\x00\x08\x00\x01" + orientation + b"\x00\x00\x00\x08")


def jpeg_exif_garbage() -> bytes:
    """EXIF that claims 65535 entries and holds 40 zero bytes."""
    return jpeg_with_exif(b"MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(40))


def webp_truncated() -> bytes:
    data = webp(10, (128, 128))
    return data[: len(data) // 2]


def webp_corrupt() -> bytes:
    """RIFF/WEBP/VP8 headers intact, the compressed picture scrambled."""
    good = webp(11, (64, 64))
    return good[:30] + random.Random(7).randbytes(len(good) - 30)


def webp_claiming(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header claims another size (14-bit fields)."""
    data = bytearray(encode(picture(12, (16, 16)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L", "Pillow wrote a simple lossless WebP"
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


# -- modes that are accepted and converted ------------------------------------------------------


def cmyk_jpeg() -> bytes:
    return encode(picture(20, (96, 96)).convert("CMYK"), "JPEG", quality=95)


def png_16bit() -> bytes:
    """16-bit grey: a ramp from 0 to 65535 (Pillow's plain convert would clip it to white)."""
    ramp = np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype("<u2")
    im = Image.frombytes("I;16", (96, 96), ramp.tobytes())
    return encode(im, "PNG")


def palette_png() -> bytes:
    """A palette image whose colour 0 is transparent."""
    im = picture(21).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(im, "PNG", transparency=0)


def greyscale_alpha_png() -> bytes:
    im = picture(22).convert("LA")
    im.putalpha(Image.linear_gradient("L").resize(im.size))
    return encode(im, "PNG")


# -- animations ----------------------------------------------------------------------------------


def animated(fmt: str, frames: int = 3) -> bytes:
    pictures = [picture(30 + i, (64, 64)) for i in range(frames)]
    return encode(pictures[0], fmt, save_all=True, append_images=pictures[1:], duration=100)


# -- things that are not images ------------------------------------------------------------------


def zip_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../evil.png", png(40, (32, 32)))  # zip-slip name, should it be unpacked
    return buf.getvalue()


SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="512" height="512">'
    b'<script>alert(1)</script><rect width="512" height="512" fill="red"/></svg>'
)
HTML = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(120)


def pickle_bomb() -> bytes:
    """A pickle whose loading would run a shell command (never loaded here, of course)."""

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, ("echo pwned > /tmp/atelier-pwned",))

    return pickle.dumps(Evil(), protocol=4)


def torch_style_zip() -> bytes:
    """What torch.save writes: a zip whose data.pkl is a pickle."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bomb())
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


# -- safetensors written by hand (no torch needed) ------------------------------------------------


def safetensors_bytes(
    tensors: Mapping[str, Sequence[int]],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: str = "F32",
) -> bytes:
    """A valid safetensors file: each named tensor of the given shape, filled with 0.01."""
    header: dict[str, object] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, shape in tensors.items():
        count = int(np.prod(shape)) if shape else 1
        raw = np.full(count, 0.01, dtype=np.float32).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def lora_pair(prefix: str, rank: int, in_dim: int, out_dim: int) -> dict[str, tuple[int, ...]]:
    """A diffusers/peft-style lora_A/lora_B pair for one linear layer."""
    return {
        f"{prefix}.lora_A.weight": (rank, in_dim),
        f"{prefix}.lora_B.weight": (out_dim, rank),
    }


def sdxl_lora() -> bytes:
    """A LoRA made for SDXL (its up_blocks.0 has attentions; text width 2048)."""
    base = "unet.up_blocks.0.attentions.0.transformer_blocks.1.attn2"
    tensors = {
        **lora_pair(f"{base}.to_k", 4, 2048, 640),
        **lora_pair(f"{base}.to_q", 4, 640, 640),
    }
    return safetensors_bytes(tensors, {"modelspec.architecture": "stable-diffusion-xl-v1-base"})


def lycoris_loha() -> bytes:
    return safetensors_bytes(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": (4, 4), "x.alpha": ()}
    )


def full_checkpoint() -> bytes:
    return safetensors_bytes({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)})


def safetensors_header_lies(length: int) -> bytes:
    """The 8-byte header length says `length`; the file is a few bytes long."""
    return struct.pack("<Q", length) + b'{"a":1}'


def safetensors_offsets_outside() -> bytes:
    """A tensor whose data offsets point far past the end of the file."""
    header = json.dumps(
        {"w.lora_A.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)
