"""The training report: loss curve PNG, base-vs-trained grid PNG, and a JSON of everything."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


@dataclass(frozen=True)
class ReportFiles:
    loss_curve: Path
    grid: Path
    json: Path
    checkpoints: Path | None = None  # every checkpoint's samples, a row each


def plot_loss_curve(
    path: Path,
    loss_history: list[float],
    val_history: list[tuple[int, float]],
    base_val_loss: float | None,
    validation_label: str = "validation (held out)",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on a runner
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        steps = list(range(1, len(loss_history) + 1))
        ax.plot(steps, loss_history, color="#9db4d6", linewidth=0.8, label="training loss")
        if len(loss_history) >= 10:  # a moving average reads better than raw noisy steps
            window = max(5, len(loss_history) // 20)
            smooth = [
                sum(loss_history[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                for i in range(len(loss_history))
            ]
            ax.plot(steps, smooth, color="#1f4e96", linewidth=1.6, label=f"training ({window}-avg)")
        if val_history:
            vs, vl = zip(*val_history, strict=True)
            ax.plot(vs, vl, "o-", color="#d1495b", label=validation_label)
        if base_val_loss is not None:
            ax.axhline(base_val_loss, color="#666666", linestyle="--", label="validation, base")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def image_grid(path: Path, rows: list[tuple[str, list[Image.Image]]], labels: list[str]) -> Path:
    """One row per (name, images), one column per label (a prompt and seed)."""
    if not rows or any(len(images) != len(labels) for _, images in rows) or not labels:
        raise ValueError("an image grid needs one image per label in every row")
    w, h = rows[0][1][0].size
    pad, head, side = 4, 16, 76
    grid = Image.new("RGB", (side + len(labels) * (w + pad), head + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(labels):
        # Small images keep the label's head: "s1 trigger" / "s1 no trig." (seed, kind).
        draw.text((side + col * (w + pad), 2), label[: max(11, w // 6)], fill="black")
    for row, (name, images) in enumerate(rows):
        y = head + row * (h + pad)
        draw.text((2, y + h // 2), name, fill="black")
        for col, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((w, h)), (side + col * (w + pad), y))
    grid.save(path)
    return path


def comparison_grid(
    path: Path,
    base: list[Image.Image],
    trained: list[Image.Image],
    labels: list[str],
    row_names: tuple[str, str] = ("base", "trained"),
) -> Path:
    """Two rows (base on top, trained below), one column per (prompt, seed)."""
    if not base or len(base) != len(trained) or len(labels) != len(base):
        raise ValueError("comparison grid needs as many base and trained images as labels")
    return image_grid(path, [(row_names[0], base), (row_names[1], trained)], labels)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    return path


def write_report(
    directory: Path,
    *,
    payload: dict[str, Any],
    loss_history: list[float],
    val_history: list[tuple[int, float]],
    base_val_loss: float | None,
    validation_label: str,
    base_images: list[Image.Image],
    trained_images: list[Image.Image],
    labels: list[str],
    checkpoint_rows: list[tuple[str, list[Image.Image]]] | None = None,
) -> ReportFiles:
    directory.mkdir(parents=True, exist_ok=True)
    checkpoints = (
        image_grid(directory / "checkpoints.png", checkpoint_rows, labels)
        if checkpoint_rows
        else None
    )
    return ReportFiles(
        loss_curve=plot_loss_curve(
            directory / "loss_curve.png",
            loss_history,
            val_history,
            base_val_loss,
            validation_label,
        ),
        grid=comparison_grid(directory / "comparison.png", base_images, trained_images, labels),
        json=write_json(directory / "report.json", payload),
        checkpoints=checkpoints,
    )
