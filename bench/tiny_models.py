"""How fast each family's built-in tiny model builds and draws (the tests build them dozens
of times), as the median of a few builds, with the ratio to tiny-sd15's in the same run.

    .venv/bin/python bench/tiny_models.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Run as a script, bench/ is first on sys.path and bench/queue.py would shadow the stdlib
# `queue` that torch imports: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from gpu_runner.families import FAMILIES

    torch.set_num_threads(1)  # as the tests run them
    rows = []
    for family in FAMILIES.values():
        for name, build in family.tiny_builders.items():
            build(0)  # warm: first use of each module class
            builds, draws = [], []
            for seed in range(args.repeats):
                start = time.perf_counter()
                pipe = build(seed)
                builds.append(time.perf_counter() - start)
                start = time.perf_counter()
                pipe(
                    prompt="a harbour", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(seed), output_type="np",
                )  # fmt: skip
                draws.append(time.perf_counter() - start)
            rows.append((name, statistics.median(builds), statistics.median(draws)))
    base = next(b for n, b, _ in rows if n == "tiny-sd15")
    print(f"{'model':<18} {'build s':>8} {'x sd15':>7} {'2-step 64 px s':>15}")
    for name, build_s, draw_s in rows:
        print(f"{name:<18} {build_s:8.3f} {build_s / base:7.2f} {draw_s:15.3f}")


if __name__ == "__main__":
    main()
