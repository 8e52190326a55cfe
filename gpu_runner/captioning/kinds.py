"""Which captioner kind a model folder holds, read from its config.json, and the module
that loads that kind. One table, so the error for an unknown folder names every kind."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpu_runner.captioning.base import CaptionError, CaptionModel
from gpu_runner.devices import DeviceChoice


@dataclass(frozen=True)
class CaptionerKind:
    name: str  # as people know it, for messages
    model_types: tuple[str, ...]  # config.json `model_type` values of this kind
    example: str  # a hub model people can save locally
    load: Callable[[Path, DeviceChoice], CaptionModel]


def _load_blip(folder: Path, choice: DeviceChoice) -> CaptionModel:
    from gpu_runner.captioning import blip

    return blip.load(folder, choice)


def _load_florence2(folder: Path, choice: DeviceChoice) -> CaptionModel:
    from gpu_runner.captioning import florence2

    return florence2.load(folder, choice)


def _load_qwen_vl(folder: Path, choice: DeviceChoice) -> CaptionModel:
    from gpu_runner.captioning import qwen_vl

    return qwen_vl.load(folder, choice)


KINDS: tuple[CaptionerKind, ...] = (
    CaptionerKind("BLIP", ("blip",), "Salesforce/blip-image-captioning-base", _load_blip),
    CaptionerKind(
        "Florence-2", ("florence2",), "florence-community/Florence-2-base", _load_florence2
    ),
    CaptionerKind(
        "Qwen-VL",
        ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
        "Qwen/Qwen2.5-VL-3B-Instruct",
        _load_qwen_vl,
    ),
)


def supported() -> str:
    return "; ".join(f"{k.name} (e.g. {k.example})" for k in KINDS)


def kind_of(folder: Path) -> CaptionerKind:
    config = folder / "config.json"
    if not config.is_file():
        raise CaptionError(
            f"no captioning model in '{folder}'; set the captioner's folder to a local model "
            f"saved with save_pretrained, of one of these kinds: {supported()}"
        )
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise CaptionError(f"'{config}' is not a model config ({exc})") from None
    for kind in KINDS:
        if model_type in kind.model_types:
            return kind
    raise CaptionError(
        f"the model in '{folder}' is a '{model_type}', which Atelier cannot caption with; "
        f"use one of these kinds: {supported()}"
    )
