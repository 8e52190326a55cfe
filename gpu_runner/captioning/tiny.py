"""Tiny randomly initialised captioners of every supported kind, saved like real ones, for
tests: the real loading and generation code runs offline. Their captions are random."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

TinyKind = Literal["blip", "florence2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TINY_KINDS: tuple[TinyKind, ...] = get_args(TinyKind)


def save_tiny_captioner(folder: str | Path, kind: TinyKind, seed: int = 0) -> Path:
    """Save a tiny captioner of `kind` (its config.json `model_type`) to `folder`."""
    from gpu_runner.captioning import blip, florence2, qwen_vl

    if kind == "blip":
        return blip.save_tiny(folder, seed)
    if kind == "florence2":
        return florence2.save_tiny(folder, seed)
    return qwen_vl.save_tiny(folder, kind, seed)
