"""Training checkpoints: trainable weights + optimizer, LR scheduler, step and every RNG.

Layout: `<checkpoint_dir>/step-00000100/{trainable.safetensors,state.pt}`. Each checkpoint is
written into a temporary folder and renamed into place, so a runner killed mid-write leaves
either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume; the message is one line for people."""


def capture_rng() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, numpy, python), in a form `torch.load` reads safely."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_gauss": [int(np_state["has_gauss"]), float(np_state["gauss"])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": state["numpy_key"].numpy().astype(np.uint32),
                "pos": state["numpy_pos"],
            },
            "has_gauss": state["numpy_gauss"][0],
            "gauss": state["numpy_gauss"][1],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [
        p
        for p in checkpoint_dir.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name.removeprefix(PREFIX).isdigit()
        and (p / WEIGHTS).is_file()
        and (p / STATE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write atomically, then prune to the newest `keep` checkpoints."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"{PREFIX}{step:08d}"
    if final.exists():
        return final
    tmp = checkpoint_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / WEIGHTS)
    torch.save({**state, "step": step}, tmp / STATE)
    tmp.rename(final)
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        weights = load_file(path / WEIGHTS)
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file means the same thing to a person
        raise CheckpointError(
            f"checkpoint {path.name} is unreadable ({type(exc).__name__}): delete it to resume "
            "from the one before, or start the run again"
        ) from None
    return weights, state
