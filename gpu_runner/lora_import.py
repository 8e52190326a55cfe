"""Reading adapter files (LoRAs, textual-inversion embeddings) and base-model checkpoints
safely, before anything loads them.

Only `.safetensors` is accepted: pickle-based files (`.ckpt`, `.pt`, `.bin`) can run
arbitrary code when loaded. The header is parsed by hand with size limits before anything
else touches the file, and an adapter's kind and base-model family are read from its keys,
shapes and metadata, so the generator can refuse a style made for another family before
loading it. The signs each family is told by live in its module (families/lora_signs.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpu_runner.families import DETECTION_ORDER, ModelFamily
from storage.families import FAMILY_LABELS as FAMILY_LABELS  # re-exported: callers' labels

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
    family: str | None  # best guess from keys, shapes and metadata; None if unknown
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


def detect_family(tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> str | None:
    """Best guess of the base-model family (or variant: "sd2") a LoRA was made for, from
    the signs each family declares (families/lora_signs.py), strongest first."""
    keys = list(tensors)
    for family in DETECTION_ORDER:
        if family.lora_signs.owns_keys(keys):
            return family.name
    # A naming several families share: one of them, or unknown, never another family.
    sharing = [f for f in DETECTION_ORDER if f.lora_signs.shares_naming(keys)]
    if sharing:
        for family in sharing:
            if family.lora_signs.width_matches(tensors):
                return family.name
        for family in sharing:
            if family.lora_signs.depth_matches(keys):
                return family.name
        return _variant_of_header(sharing, metadata)
    for family in DETECTION_ORDER:
        variant = family.lora_signs.variant_of_context_dim(tensors)
        if variant is not None:
            return variant
    for family in DETECTION_ORDER:
        if family.lora_signs.has_layout(keys):
            return family.name
    return _variant_of_header(DETECTION_ORDER, metadata)


def _variant_of_header(families: Sequence[ModelFamily], meta: Mapping[str, str]) -> str | None:
    return next((v for f in families if (v := f.lora_signs.variant_of_header(meta))), None)


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
        told = [f.name for f in DETECTION_ORDER if set(f.lora_signs.embedding_keys) & set(vectors)]
        family = told[0] if told else None
        return LoraFileInfo(path=str(p), kind="embedding", family=family, sha256=sha256)
    if not any(re.search(r"(lora_down|lora_A|lora\.down)(\.[\w-]+)?\.weight$", k) for k in keys):
        raise LoraImportError(
            f"refused '{p.name}': it has no LoRA layers (no lora_down/lora_A weights); "
            "is it a LoRA at all?"
        )
    return LoraFileInfo(
        path=str(p), kind="lora", family=detect_family(tensors, meta), sha256=sha256
    )
