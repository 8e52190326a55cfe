"""Recipe options against the preset, on `toy-sd15` and the toy world's metrics, in one run:
for each option, steps and seconds until the stripe style shows in 80% of held-out prompts,
and the final style, leak (without the trigger) and colour (content) scores.

Every variant trains the same LoRA as bench/style.py's Atelier run (toy-sd15's defaults,
the demo's 12 references, seed 0) with one setting changed. Buckets are not in the table:
the toy world's references are all square, so every image lands in the square bucket and
the run is the preset's (tests/test_buckets.py shows what buckets change).

    .venv/bin/python bench/train_quality.py [--steps 300] [--every 50] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on sys.path and bench/queue.py would shadow the stdlib
# `queue` that torch imports: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from bench import style  # noqa: E402
from gpu_runner.families import get_family  # noqa: E402

_SD = get_family("sd15").lora_layer_sets
VARIANTS: dict[str, dict[str, Any]] = {
    "preset (toy-sd15's, LoCon)": {},
    "flip=on": {"flip": True},
    "noise_offset=0.05": {"noise_offset": 0.05},
    "accumulate=2 (batch 4 x 2)": {"batch_size": 4, "gradient_accumulation": 2},
    "optimizer=prodigy": {"optimizer": "prodigy"},
    "layers=full": {"target_modules": list(_SD["full"])},
    "layers=attention": {"target_modules": list(_SD["attention"])},
    "shuffle=on": {"caption_shuffle": True},
    "text_encoder=on": {"train_text_encoder": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        style.OVERRIDES.clear()
        style.OVERRIDES.update(overrides)
        curve, seconds = style.atelier(args.steps, args.every)
        reach_step, reach_s = style.first_reaching(curve)
        final = curve[-1][2]
        rows.append((name, reach_step, reach_s, seconds, final))
        print(f"{name}: {seconds:.0f} s; " + "; ".join(
            f"step {n} shows {s['shows']:.0%} leak {s['leak']:.0%}" for n, _, s in curve
        ), flush=True)  # fmt: skip
    base_s = rows[0][3] if rows else 0.0
    print(f"\n| option | style in {style.TARGET:.0%} of {len(style.PROMPTS)} prompts at | "
          "train s (x preset) | final style | leak | colour |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, step, reach_s, seconds, final in rows:
        when = f"step {step} ({reach_s:.0f} s)" if step is not None else f"not in {args.steps}"
        ratio = seconds / base_s if base_s else float("nan")
        print(f"| {name} | {when} | {seconds:.0f} ({ratio:.2f}x) | {final['shows']:.0%} | "
              f"{final['leak']:.0%} | {final['colour']:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
