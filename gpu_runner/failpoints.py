"""Named crash points for the crash-and-restart suite.

`ATELIER_FAILPOINTS=mid_training:3,after_checkpoint` makes this process SIGKILL itself the
3rd time (default: the 1st) it reaches a named point. Unset, `hit` costs a dict lookup.
Points: after_claim, mid_training, before_checkpoint, after_checkpoint, mid_generation,
before_outputs, after_outputs.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "ATELIER_FAILPOINTS"


def _parse(spec: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, nth = item.partition(":")
        points[name] = int(nth) if nth else 1
    return points


_armed = _parse(os.environ.get(ENV, ""))
_seen: Counter[str] = Counter()


def hit(name: str) -> None:
    """Die here, like a power cut, if this point is armed and its count is reached."""
    if name not in _armed:
        return
    _seen[name] += 1
    if _seen[name] >= _armed[name]:
        os.kill(os.getpid(), signal.SIGKILL)
