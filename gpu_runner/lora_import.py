"""Importing a LoRA (or textual-inversion embedding) someone already has.

Only `.safetensors` is accepted: pickle-based files (`.ckpt`, `.pt`, `.bin`) can run
arbitrary code when loaded. The header is parsed by hand with size limits before anything
else touches the file, the format and base-model family are detected, and the file is
checked layer by layer against the loaded pipeline before it is accepted.

The header checks need no torch (the bot can refuse a pickle at upload time); the
architecture checks import torch and diffusers lazily.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

Family = Literal["sd15", "sd2", "sdxl"]
LoraFormat = Literal["kohya", "diffusers", "peft"]

FAMILY_LABELS: dict[str, str] = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL"}
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
    """What an imported adapter file holds."""

    path: str
    kind: Literal["lora", "embedding"]
    format: LoraFormat | None  # None for embeddings
    family: Family | None  # best guess from keys, shapes and metadata; None if unknown
    family_evidence: str
    rank: int | None
    targets_text_encoder: bool
    tensor_count: int
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # whole file, as the blob store hashes it
    addnet_hash: str = ""  # A1111's hash (tensor data only); its first 12 digits go in infotext


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


def addnet_hash(path: str | Path) -> str:
    """A1111's LoRA hash: sha256 of the tensor data after the header (Civitai's "AutoV3")."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- format and family --------------------------------------------------------------------

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_LYCORIS_MARKERS = ("hada_w1_a", "lokr_w1", "lokr_w2", ".oft_", "boft_")
_CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def detect_format(keys: list[str]) -> LoraFormat:
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    return "peft"


def _family_from_structure(keys: list[str]) -> tuple[Family | None, str]:
    # SDXL: no attention in the first down block, attention in up block 0, and
    # transformer depth above 1. SD1.x/2.x: attention in down block 0 and up block 3.
    sep = r"[._]"
    xl = (
        rf"up_blocks{sep}0{sep}attentions",
        rf"transformer_blocks{sep}[1-9]",
        r"lora_te2_",
        r"^text_encoder_2\.",
    )
    for pattern in xl:
        if any(re.search(pattern, k) for k in keys):
            return "sdxl", f"it has layers only SDXL has ({pattern.replace(sep, '.')})"
    sd1 = (rf"down_blocks{sep}0{sep}attentions", rf"up_blocks{sep}3{sep}attentions")
    for pattern in sd1:
        if any(re.search(pattern, k) for k in keys):
            return "sd15", f"it has layers only SD1.x/2.x have ({pattern.replace(sep, '.')})"
    return None, ""


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
    if arch.startswith("stable-diffusion-xl") or version.startswith("sdxl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2") or version.startswith("sd_v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1") or version.startswith("sd_v1"):
        return "sd15"
    return None


def detect_family(
    tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]
) -> tuple[Family | None, str]:
    """Best guess of the base-model family a LoRA was made for, with the reason."""
    keys = list(tensors)
    structural, why = _family_from_structure(keys)
    dim = _context_dim(tensors)
    by_dim: dict[int, Family] = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
    if structural == "sdxl":
        return "sdxl", why
    if dim in by_dim:
        return by_dim[dim], f"its cross-attention reads {dim}-wide text embeddings"
    if structural:
        return structural, why
    meta_family = _family_from_metadata(metadata)
    if meta_family:
        return meta_family, "its metadata says so"
    return None, ""


def _embedding_vectors(tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Textual-inversion layouts: A1111/kohya `emb_params`, SDXL `clip_l`/`clip_g`, or
    diffusers' single `{token: vectors}`."""
    if "emb_params" in tensors or "clip_l" in tensors or "clip_g" in tensors:
        return {k: v for k, v in tensors.items() if k in ("emb_params", "clip_l", "clip_g")}
    if len(tensors) == 1 and not any(k.endswith(".weight") for k in tensors):
        return dict(tensors)
    return {}


def inspect_adapter_file(path: str | Path, *, with_hashes: bool = True) -> LoraFileInfo:
    """Header-level checks: safetensors only, a LoRA or embedding, format and family.

    Raises LoraImportError with the reason when the file is refused.
    """
    p = Path(path)
    header = read_safetensors_header(p)
    tensors, meta = header.tensors, header.metadata
    keys = list(tensors)
    if not keys:
        raise LoraImportError(f"refused '{p.name}': it holds no tensors")
    hashes = {"sha256": file_sha256(p), "addnet_hash": addnet_hash(p)} if with_hashes else {}
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
        return LoraFileInfo(
            path=str(p),
            kind="embedding",
            format=None,
            family=family,
            family_evidence="it has vectors for both SDXL text encoders" if family else "",
            rank=None,
            targets_text_encoder=True,
            tensor_count=len(keys),
            metadata=meta,
            **hashes,
        )
    down = [k for k in keys if re.search(r"(lora_down|lora_A|lora\.down)(\.[\w-]+)?\.weight$", k)]
    if not down:
        raise LoraImportError(
            f"refused '{p.name}': it has no LoRA layers (no lora_down/lora_A weights); "
            "is it a LoRA at all?"
        )
    family, evidence = detect_family(tensors, meta)
    return LoraFileInfo(
        path=str(p),
        kind="lora",
        format=detect_format(keys),
        family=family,
        family_evidence=evidence,
        rank=max(tensors[k].shape[0] for k in down),
        targets_text_encoder=any(
            k.startswith(("lora_te", "text_encoder")) or ".text_model." in k for k in keys
        ),
        tensor_count=len(keys),
        metadata=meta,
        **hashes,
    )


# --- checks against the loaded pipeline ---------------------------------------------------

_A_SUFFIX = re.compile(r"(?:\.lora_A(?:\.[\w-]+)?|\.lora\.down|_lora\.down|\.lora_down)\.weight$")
_B_SUFFIX = re.compile(r"(?:\.lora_B(?:\.[\w-]+)?|\.lora\.up|_lora\.up|\.lora_up)\.weight$")
_COMPONENTS = ("text_encoder_2", "text_encoder", "unet")


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(component, module path, 'A'|'B') for a diffusers-format LoRA key, else None."""
    role = "A" if _A_SUFFIX.search(key) else "B" if _B_SUFFIX.search(key) else None
    if role is None:
        return None
    module = (_A_SUFFIX if role == "A" else _B_SUFFIX).sub("", key)
    module = module.removeprefix("base_model.model.")
    component = "unet"
    for name in _COMPONENTS:
        if module.startswith(name + "."):
            component, module = name, module[len(name) + 1 :]
            break
    # Old attention-processor format: attn1.processor.to_out_lora -> attn1.to_out.0
    module = module.replace(".processor.", ".")
    if module.endswith(".to_out") and "_lora." in key:
        module += ".0"
    return component, module, role


def _find_module(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    # transformers 5 flattened CLIPTextModel (no `text_model.`); older LoRAs still name it.
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            module = root.get_submodule(candidate)
        except AttributeError:
            continue
        return getattr(module, "base_layer", module)  # unwrap an already-loaded peft layer
    return None


def _io_features(module: torch.nn.Module) -> tuple[int, int] | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def pipeline_family(pipe: DiffusionPipeline) -> Family:
    """SDXL by pipeline class; SD2 vs SD1.5 by the text width the UNet reads."""
    if "XL" in type(pipe).__name__:
        return "sdxl"
    return "sd2" if int(pipe.unet.config.cross_attention_dim) == 1024 else "sd15"


def check_lora_against_pipeline(
    info: LoraFileInfo, pipe: DiffusionPipeline, base_name: str = "the base model"
) -> None:
    """Refuse a LoRA whose layers do not exist in, or do not fit, the loaded pipeline."""
    import safetensors.torch

    name = Path(info.path).name
    base_family = pipeline_family(pipe)
    if info.family and info.family != base_family:
        raise LoraImportError(
            f"'{name}' was made for {FAMILY_LABELS[info.family]} ({info.family_evidence}); the "
            f"style's base model '{base_name}' is {FAMILY_LABELS[base_family]}. Use a LoRA made "
            f"for {FAMILY_LABELS[base_family]}, or a style on an {FAMILY_LABELS[info.family]} base"
        )
    raw = safetensors.torch.load_file(info.path)
    # diffusers' own conversion (kohya and SDXL block names included), so what passes here
    # is exactly what load_lora_weights will apply.
    # Only the SDXL loader passes unet_config (to map SGM block names); mirror that.
    kwargs: dict[str, Any] = {"unet_config": pipe.unet.config} if base_family == "sdxl" else {}
    try:
        state, _alphas = type(pipe).lora_state_dict(raw, **kwargs)
    except Exception as exc:  # diffusers raises assorted errors for unknown layouts
        raise LoraImportError(
            f"refused '{name}': diffusers cannot read its layer names ({exc}); "
            "it may be a LoRA type Atelier does not support"
        ) from None
    shapes: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for key, tensor in state.items():
        split = _split_key(key)
        if split:
            component, module, role = split
            shapes.setdefault((component, module), {})[role] = tuple(tensor.shape)
    if not shapes:
        raise LoraImportError(
            f"refused '{name}': none of its layers is a LoRA layer diffusers uses"
        )
    problems: list[str] = []
    for (component, module_path), pair in sorted(shapes.items()):
        root = getattr(pipe, component, None)
        if root is None:
            problems.append(f"{component} (this base model has none)")
            continue
        module = _find_module(root, module_path)
        dims = _io_features(module) if module is not None else None
        if dims is None:
            problems.append(f"{component}.{module_path} (no such layer)")
            continue
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            problems.append(f"{component}.{module_path} (half a LoRA pair)")
        elif a[1] != dims[0] or b[0] != dims[1] or a[0] != b[1]:
            problems.append(
                f"{component}.{module_path} (the layer is {dims[0]}->{dims[1]}, the LoRA "
                f"expects {a[1]}->{b[0]})"
            )
    if problems:
        raise LoraImportError(
            f"refused '{name}': {len(problems)} of its {len(shapes)} layers do not fit base model "
            f"'{base_name}' ({FAMILY_LABELS[base_family]}), e.g. {problems[0]}; it was made for "
            "a different model"
        )


def check_embedding_against_pipeline(
    info: LoraFileInfo, pipe: DiffusionPipeline, base_name: str = "the base model"
) -> None:
    """Refuse an embedding whose vector width does not match the text encoder(s)."""
    header = read_safetensors_header(info.path)
    name = Path(info.path).name
    base_family = pipeline_family(pipe)
    if info.family and info.family != base_family:
        raise LoraImportError(
            f"'{name}' was made for {FAMILY_LABELS[info.family]}; the style's base model "
            f"'{base_name}' is {FAMILY_LABELS[base_family]}"
        )
    if base_family == "sdxl" and "clip_g" not in header.tensors:
        raise LoraImportError(
            f"refused '{name}': an SDXL embedding needs vectors for both text encoders "
            "(clip_l and clip_g)"
        )
    widths = {"clip_l": pipe.text_encoder, "clip_g": getattr(pipe, "text_encoder_2", None)}
    for key, tensor in _embedding_vectors(header.tensors).items():
        encoder = widths.get(key, pipe.text_encoder)
        width = int(encoder.get_input_embeddings().weight.shape[-1]) if encoder is not None else 0
        if tensor.shape[-1] != width:
            raise LoraImportError(
                f"refused '{name}': its vectors are {tensor.shape[-1]} wide but base model "
                f"'{base_name}' uses {width}-wide text embeddings; it was made for another model"
            )


def import_adapter(
    path: str | Path, pipe: DiffusionPipeline, base_name: str = "the base model"
) -> LoraFileInfo:
    """All checks for an uploaded adapter file; returns its info when it is accepted."""
    info = inspect_adapter_file(path)
    if info.kind == "embedding":
        check_embedding_against_pipeline(info, pipe, base_name)
    else:
        check_lora_against_pipeline(info, pipe, base_name)
    return info
