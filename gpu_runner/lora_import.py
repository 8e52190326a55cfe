"""Reading adapter files (LoRAs, textual-inversion embeddings) and base-model checkpoints
safely, before anything loads them.

Only `.safetensors` is accepted: pickle-based files (`.ckpt`, `.pt`, `.bin`) can run
arbitrary code when loaded. The header is parsed by hand with size limits before anything
else touches the file, and an adapter's kind and base-model family are read from its keys,
shapes and metadata, so the generator can refuse a style made for another family before
loading it. Needs no torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

from storage.families import FAMILY_LABELS as FAMILY_LABELS  # re-exported: callers' labels

Family = Literal["sd15", "sd2", "sdxl", "flux2-klein", "flux1", "qwenimage", "zimage"]
_FLUX_FAMILIES: tuple[Family, ...] = ("flux2-klein", "flux1")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 32 * 1024 * 1024  # kohya headers with tag frequencies reach a few MB
MAX_FILE_BYTES = 4 * 1024**3
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_PICKLE_REASON = "pickle-based model files can run arbitrary code on the machine that loads them"


class LoraImportError(ValueError):
    """A file refused at import; str() says why and what to do instead."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: int


@dataclass(frozen=True)
class LoraFileInfo:
    """What an adapter file holds, as far as the generator checks it."""

    path: str
    kind: Literal["lora", "embedding"]
    family: Family | None  # best guess from keys, shapes and metadata; None if unknown
    sha256: str = ""  # whole file, as the blob store hashes it (with_hashes only)


def _refuse_pickle(name: str, detail: str) -> LoraImportError:
    return LoraImportError(
        f"refused '{name}': {detail}; {_PICKLE_REASON}, so only .safetensors is accepted. "
        "Convert it to .safetensors on a machine you trust and import that"
    )


def _sniff_pickle(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive, the format torch.save writes (a pickle inside)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "it is a Python pickle"
    return None


def read_safetensors_header(
    path: str | Path,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> SafetensorsHeader:
    """Validate a safetensors file's structure without loading tensors (and without torch)."""
    p = Path(path)
    name = p.name
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse_pickle(name, f"'{p.suffix}' files are pickles")
    if p.suffix.lower() != ".safetensors":
        raise LoraImportError(f"refused '{name}': only .safetensors files can be imported")
    size = p.stat().st_size
    if size > max_file_bytes:
        raise LoraImportError(
            f"refused '{name}': {size / 1024**3:.1f} GiB is over the "
            f"{max_file_bytes / 1024**3:.0f} GiB limit for an adapter file; is it a full model "
            "checkpoint?"
        )
    with p.open("rb") as fh:
        head = fh.read(8)
        pickle_kind = _sniff_pickle(head)
        if pickle_kind:
            raise _refuse_pickle(name, f"it is named .safetensors but {pickle_kind}")
        if len(head) < 8:
            raise LoraImportError(f"refused '{name}': the file is too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > max_header_bytes or 8 + n > size:
            raise LoraImportError(
                f"refused '{name}': its safetensors header length ({n} bytes) is invalid; "
                "the file is corrupt or not safetensors"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise LoraImportError(
            f"refused '{name}': its safetensors header is not valid JSON; the file is corrupt"
        ) from None
    if not isinstance(header, dict):
        raise LoraImportError(f"refused '{name}': its safetensors header is not a JSON object")
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise LoraImportError(f"refused '{name}': its metadata must map names to text")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int]] = []
    for key, entry in header.items():
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LoraImportError(
                f"refused '{name}': tensor '{key}' has a malformed header entry"
            ) from None
        numel = 1
        for d in shape:
            numel *= d
        if dtype not in _DTYPE_BYTES or any(d < 0 for d in shape):
            raise LoraImportError(
                f"refused '{name}': tensor '{key}' has dtype/shape {dtype}{shape}"
            )
        if not 0 <= begin <= end <= data_len or end - begin != numel * _DTYPE_BYTES[dtype]:
            raise LoraImportError(
                f"refused '{name}': tensor '{key}' points outside the file; the file is truncated "
                "or corrupt"
            )
        tensors[key] = TensorInfo(dtype, shape)
        spans.append((begin, end))
    spans.sort()
    for (_, end_a), (begin_b, _) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise LoraImportError(f"refused '{name}': tensors overlap; the file is corrupt")
    return SafetensorsHeader(tensors=tensors, metadata=dict(meta_raw), header_bytes=n)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- kind and family -----------------------------------------------------------------------

_LYCORIS_MARKERS = ("hada_w1_a", "lokr_w1", "lokr_w2", ".oft_", "boft_")
_CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


# FLUX LoRAs. FLUX.1 and FLUX.2 [klein] files share Black Forest Labs' kohya names
# (`lora_unet_double_blocks_N_...`, `lora_unet_single_blocks_N_...`) and, at 3072 wide,
# klein 4B's widths; what tells them apart, first to last:
# - layers only one of them has: FLUX.1 modulates each block (`img_mod_lin`, `txt_mod_lin`,
#   `modulation_lin`) and keeps a single block's q/k/v and `proj_mlp` apart in diffusers
#   names; FLUX.2 shares one modulation (`*_stream_modulation*`), fuses a single block's
#   projections (`to_qkv_mlp_proj`) and gates its feed-forwards (`ff.linear_in`);
# - a layer's output/input widths, whatever the width D: a single block's linear1 is 7D
#   wide for FLUX.1 (q, k, v and a 4D MLP) and 9D for FLUX.2 (q, k, v and a gated 3D MLP,
#   doubled); linear2 reads 5D or 4D; a double block's MLP is 4D or gated 3D (6D in);
# - depth: FLUX.1 has 19 double blocks, every FLUX.2 at most 8.
# A BFL file with only names both share (attention) is told by its header, else unknown.
# Checked before SD's patterns: diffusers' `transformer_blocks.1` would read as SDXL depth.
_P = r"^(transformer\.)?"
_FLUX_ONLY: tuple[tuple[Family, str], ...] = (
    ("flux2-klein", _P + r"single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj\."),
    ("flux2-klein", _P + r"transformer_blocks\.\d+\.ff(_context)?\.linear_(in|out)\."),
    ("flux2-klein", r"^(lora_unet_|transformer\.)?(double|single)_stream_modulation"),
    ("flux1", r"^lora_unet_double_blocks_\d+_(img|txt)_mod_lin\."),
    ("flux1", r"^lora_unet_single_blocks_\d+_modulation_lin\."),
    ("flux1", _P + r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)\."),
    ("flux1", _P + r"single_transformer_blocks\.\d+\.norm\.linear\."),
)
# A FLUX LoRA at all, in BFL's kohya names (diffusers' names are told by _FLUX_ONLY: their
# joint attention alone is also Qwen-Image's and SD3's).
_FLUX_BFL = r"^lora_unet_(double|single)_blocks_\d+_"
# Output/input width of a BFL-named layer in each family.
_FLUX_RATIOS: dict[str, dict[Fraction, Family]] = {
    "linear1": {Fraction(7): "flux1", Fraction(9): "flux2-klein"},
    "linear2": {Fraction(1, 5): "flux1", Fraction(1, 4): "flux2-klein"},
    "mlp_0": {Fraction(4): "flux1", Fraction(6): "flux2-klein"},
    "mlp_2": {Fraction(1, 4): "flux1", Fraction(1, 3): "flux2-klein"},
}
_FLUX_LAYER = re.compile(r"_(linear1|linear2|mlp_0|mlp_2)\.lora_down\.weight$")
_FLUX1_MIN_DOUBLE_DEPTH = 8  # a double block past FLUX.2's last: FLUX.1 (19 of them)


def _flux_family(tensors: Mapping[str, TensorInfo]) -> tuple[bool, Family | None]:
    """(is a FLUX LoRA, which FLUX when its layers tell)."""
    keys = list(tensors)
    for family, pattern in _FLUX_ONLY:
        if any(re.search(pattern, k) for k in keys):
            return True, family
    if not any(re.search(_FLUX_BFL, k) for k in keys):
        return False, None
    for key, down in tensors.items():
        match = _FLUX_LAYER.search(key) if re.match(_FLUX_BFL, key) else None
        up = tensors.get(key.replace(".lora_down.", ".lora_up.")) if match else None
        if match and up and len(down.shape) == len(up.shape) == 2 and down.shape[1]:
            found = _FLUX_RATIOS[match.group(1)].get(Fraction(up.shape[0], down.shape[1]))
            if found is not None:
                return True, found
    depths = (re.match(r"^lora_unet_double_blocks_(\d+)_", k) for k in keys)
    if any(m and int(m.group(1)) >= _FLUX1_MIN_DOUBLE_DEPTH for m in depths):
        return True, "flux1"
    return True, None


# Qwen-Image LoRAs: kohya keys on its double-stream blocks (`lora_unet_transformer_blocks_N_
# ...`, musubi-tuner's names), or diffusers/ComfyUI keys (`transformer.`, `diffusion_model.`
# or no prefix) on `transformer_blocks.N`'s attention, MLPs and modulations, with no
# single-stream block anywhere: the rule InvokeAI's Qwen-Image LoRA probe applies (FLUX's
# diffusers files name their double-stream blocks alike; single-stream ones tell them apart).
# Checked before SD's patterns: `transformer_blocks.1` would read as SDXL depth.
_QWENIMAGE_KEYS = (
    r"^lora_unet_transformer_blocks_\d+_",
    r"^(transformer\.|diffusion_model\.)?transformer_blocks\.\d+\."
    r"(attn|img_mlp|txt_mlp|img_mod|txt_mod)\.",
)
_SINGLE_STREAM = r"single_(transformer_)?blocks"


# Z-Image LoRAs: its blocks (`layers`, `noise_refiner`, `context_refiner`) with their
# `attention` (diffusers' to_q/to_k/to_v/to_out.0, or the original qkv/out),
# `feed_forward.w1-3` and `adaLN_modulation`, under ComfyUI's `diffusion_model.`, diffusers'
# `transformer.` or no prefix, or kohya-style with `lora_unet_` (some trainers write `__`).
# Lumina 2 in diffusers names them `attn` and `feed_forward.linear_N`; its original NextDiT
# names are Z-Image's own (Z-Image grew from it), so such a file reads as Z-Image.
_ZIMAGE_KEYS = (
    r"^(diffusion_model\.|transformer\.|base_model\.model\.)?"
    r"(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward|adaLN_modulation)\.",
    r"^lora_unet__?(layers|noise_refiner|context_refiner)_\d+_(attention|feed_forward|adaLN)_",
)


def _family_from_structure(keys: list[str]) -> Family | None:
    if any(re.search(p, k) for p in _QWENIMAGE_KEYS for k in keys) and not any(
        re.search(_SINGLE_STREAM, k) for k in keys
    ):
        return "qwenimage"
    if any(re.search(pattern, k) for pattern in _ZIMAGE_KEYS for k in keys):
        return "zimage"
    # SDXL: no attention in the first down block, attention in up block 0, and
    # transformer depth above 1. SD1.x/2.x: attention in down block 0 and up block 3.
    sep = r"[._]"
    xl = (
        rf"up_blocks{sep}0{sep}attentions",
        rf"transformer_blocks{sep}[1-9]",
        r"lora_te2_",
        r"^text_encoder_2\.",
    )
    if any(re.search(pattern, k) for pattern in xl for k in keys):
        return "sdxl"
    sd1 = (rf"down_blocks{sep}0{sep}attentions", rf"up_blocks{sep}3{sep}attentions")
    if any(re.search(pattern, k) for pattern in sd1 for k in keys):
        return "sd15"
    return None


def _context_dim(tensors: Mapping[str, TensorInfo]) -> int | None:
    # The cross-attention key/value projections read the text encoder's width.
    for key, info in tensors.items():
        if (
            re.search(r"attn2[._]to_[kv].*(lora_down|lora_A|lora\.down)", key)
            and len(info.shape) >= 2
        ):
            return info.shape[1]
    return None


def _family_from_metadata(meta: Mapping[str, str]) -> Family | None:
    arch = meta.get("modelspec.architecture", "").lower()
    version = meta.get("ss_base_model_version", "").lower()
    if arch.startswith("flux.2-klein") or version.startswith("flux2_klein"):
        return "flux2-klein"
    # kohya's sai_model_spec: flux-1-dev, flux-1-schnell, flux-1; flux_utils: "flux1".
    if arch.startswith("flux-1") or version == "flux1":
        return "flux1"
    # musubi-tuner's "Qwen-Image/lora", ai-toolkit's "qwen_image" (not Qwen-Image-2.x).
    if arch.split("/")[0] == "qwen-image" or version == "qwen_image":
        return "qwenimage"
    if arch.startswith("z-image") or version.startswith("zimage"):
        return "zimage"
    if arch.startswith("stable-diffusion-xl") or version.startswith("sdxl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2") or version.startswith("sd_v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1") or version.startswith("sd_v1"):
        return "sd15"
    return None


def detect_family(tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> Family | None:
    """Best guess of the base-model family a LoRA was made for: its layers, then the text
    width its cross-attention reads, then its metadata."""
    is_flux, flux = _flux_family(tensors)
    if is_flux:
        told = _family_from_metadata(metadata)
        return flux or (told if told in _FLUX_FAMILIES else None)
    structural = _family_from_structure(list(tensors))
    by_dim: dict[int, Family] = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
    dim = _context_dim(tensors)
    if structural in ("sdxl", "qwenimage", "zimage"):
        return structural
    if dim in by_dim:
        return by_dim[dim]
    return structural or _family_from_metadata(metadata)


def _embedding_vectors(tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Textual-inversion layouts: A1111/kohya `emb_params`, SDXL `clip_l`/`clip_g`, or
    diffusers' single `{token: vectors}`."""
    if "emb_params" in tensors or "clip_l" in tensors or "clip_g" in tensors:
        return {k: v for k, v in tensors.items() if k in ("emb_params", "clip_l", "clip_g")}
    if len(tensors) == 1 and not any(k.endswith(".weight") for k in tensors):
        return dict(tensors)
    return {}


def inspect_adapter_file(path: str | Path, *, with_hashes: bool = True) -> LoraFileInfo:
    """Header-level checks: safetensors only, a LoRA or an embedding, and its family.

    Raises LoraImportError with the reason when the file is refused.
    """
    p = Path(path)
    header = read_safetensors_header(p)
    tensors, meta = header.tensors, header.metadata
    keys = list(tensors)
    if not keys:
        raise LoraImportError(f"refused '{p.name}': it holds no tensors")
    sha256 = file_sha256(p) if with_hashes else ""
    if any(m in k for k in keys for m in _LYCORIS_MARKERS):
        raise LoraImportError(
            f"refused '{p.name}': it is a LyCORIS LoHa/LoKr/OFT file, which diffusers cannot "
            "apply; import a LoRA (or LoCon) export instead"
        )
    if any(k.startswith(_CHECKPOINT_MARKERS) for k in keys):
        raise LoraImportError(
            f"refused '{p.name}': it is a full model checkpoint, not a LoRA; add it as a base "
            "model in the runner's config instead"
        )
    vectors = _embedding_vectors(tensors)
    if vectors:
        # SDXL embeddings carry one set of vectors per text encoder.
        family: Family | None = "sdxl" if "clip_g" in vectors else None
        return LoraFileInfo(path=str(p), kind="embedding", family=family, sha256=sha256)
    if not any(re.search(r"(lora_down|lora_A|lora\.down)(\.[\w-]+)?\.weight$", k) for k in keys):
        raise LoraImportError(
            f"refused '{p.name}': it has no LoRA layers (no lora_down/lora_A weights); "
            "is it a LoRA at all?"
        )
    return LoraFileInfo(
        path=str(p), kind="lora", family=detect_family(tensors, meta), sha256=sha256
    )
