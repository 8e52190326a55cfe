"""A text progress bar for a training job, drawn on stderr from the job's progress events.

The runner appends a progress event (step, total, loss, validation loss) to the database as it
trains; the demo reads them, as any front end may. At a terminal the bar redraws in place;
in a log (CI) it prints a line at every tenth of the way so logs stay short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

WIDTH = 30


@dataclass(frozen=True)
class Snapshot:
    step: int
    total: int
    loss: float | None = None
    val_loss: float | None = None
    base_val_loss: float | None = None
    steps_per_s: float | None = None
    # False: a small set's validation ran on the training images (none held out).
    held_out: bool = True

    @classmethod
    def of(cls, step: int, total: int, data: dict[str, Any]) -> Snapshot:
        def number(key: str) -> float | None:
            value = data.get(key)
            return float(value) if isinstance(value, int | float) else None

        return cls(
            step,
            total,
            number("loss"),
            number("val_loss"),
            number("base_val_loss"),
            number("steps_per_s"),
            data.get("held_out") is not False,
        )


@dataclass(frozen=True)
class Validation:
    loss: float
    base: float
    held_out: bool = True

    def text(self) -> str:
        where = "held-out" if self.held_out else "on the training images"
        return f"val {where} {self.loss:.3f} (base {self.base:.3f})"


def render_bar(label: str, snap: Snapshot, validation: Validation | None = None) -> str:
    """`label [#####.....] 60/120 · loss 0.712 · val held-out 0.82 (base 1.13) · ETA 20 s`."""
    total = max(snap.total, 1)
    filled = min(WIDTH, round(WIDTH * snap.step / total))
    parts = [f"{label} [{'#' * filled}{'.' * (WIDTH - filled)}] {snap.step}/{snap.total}"]
    if snap.loss is not None:
        parts.append(f"loss {snap.loss:.3f}")
    if validation is not None:
        parts.append(validation.text())
    if snap.steps_per_s and snap.step < snap.total:
        parts.append(f"ETA {round((snap.total - snap.step) / snap.steps_per_s)} s")
    return " · ".join(parts)


class ProgressBar:
    def __init__(self, label: str, out: TextIO) -> None:
        self.label = label
        self.out = out
        self.interactive = bool(getattr(out, "isatty", lambda: False)())
        self.last: Snapshot | None = None
        self.validation: Validation | None = None
        self._printed_tenth = -1
        self._width = 0

    def update(self, snap: Snapshot) -> None:
        self.last = snap
        if snap.val_loss is not None and snap.base_val_loss is not None:
            self.validation = Validation(snap.val_loss, snap.base_val_loss, snap.held_out)
        line = render_bar(self.label, snap, self.validation)
        if self.interactive:
            pad = max(0, self._width - len(line))
            self.out.write("\r" + line + " " * pad)
            self._width = len(line)
            self.out.flush()
            return
        tenth = 10 * snap.step // max(snap.total, 1)
        if tenth > self._printed_tenth:
            self._printed_tenth = tenth
            print(line, file=self.out, flush=True)

    def finish(self) -> None:
        if self.interactive and self.last is not None:
            self.out.write("\n")
            self.out.flush()
