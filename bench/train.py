"""Training throughput and peak memory, with and without the latent/text cache.

Each configuration runs in its own subprocess so peak RSS / CUDA memory are its own.
Tiny SD1.5 pipeline, 12 images, 64 px, batch 4, rank 8 (DESIGN.md's reference setting).

    .venv/bin/python bench/train.py [--device cpu|cuda] [--steps 100] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = {"cached": True, "uncached": False}


def worker(mode: str, device: str, steps: int, method: str) -> dict[str, Any]:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from gpu_runner.tiny_models import build_tiny_sd15_pipeline, demo_dataset
    from gpu_runner.training.config import make_config
    from gpu_runner.training.loop import train

    settings: dict[str, Any] = {
        "steps": steps,
        "resolution": 64,
        "batch_size": 4,
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        "validate_every": steps,  # validation/samples only at the end: time the steps
        "checkpoint_every": steps,
        "sample_steps": 2,
        "sample_seeds": [1],
        "cache_latents": MODES[mode],
    }
    if method != "textual_inversion":
        settings.update(rank=8, alpha=8)
    config = make_config(method, "sd15", "style", trigger="zxq", **settings)
    items = demo_dataset(12, 64, seed=0)
    pipe = build_tiny_sd15_pipeline(0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(
            config,
            items,
            pipe,
            Path(tmp) / "out",
            checkpoint_dir=Path(tmp) / "ckpt",
            progress=lambda step, total, loss, extras: stamps.append(time.perf_counter()),
            device=device,
        )
        wall = time.perf_counter() - t0
    # Steps 2 .. N-1: skips the first step's warm-up and the last step's validation.
    timed = len(stamps) - 2
    steps_per_s = timed / (stamps[-2] - stamps[0]) if timed > 0 else float("nan")
    out: dict[str, Any] = {
        "mode": mode,
        "method": method,
        "device": device,
        "steps": steps,
        "steps_per_s": steps_per_s,
        "wall_s": wall,
        "rss_before_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "val_improvement": result.val_improvement,
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--method", default="lora", choices=["lora", "dora", "textual_inversion"])
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4")

    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.device, args.steps, args.method)))
        return

    root = Path(__file__).resolve().parent.parent
    rows = []
    for mode in MODES:
        cmd = [
            sys.executable,
            "-P",  # keep bench/ off sys.path: bench/queue.py would shadow the stdlib queue
            __file__,
            "--worker",
            mode,
            "--device",
            args.device,
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--method",
            args.method,
        ]
        env = {**os.environ, "PYTHONPATH": str(root), "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    cuda = args.device == "cuda"
    head = f"{'mode':<9} {'steps/s':>8} {'wall s':>7} {'RSS base':>9} {'peak RSS':>9}"
    head += f" {'CUDA peak':>10}" if cuda else ""
    head += f" {'val drop':>9}"
    first = rows[0]
    print(
        f"training bench: tiny SD1.5, 12 images, 64 px, batch 4, {args.method}, "
        f"{args.steps} steps, device {args.device}, {first['threads']} CPU threads"
        + (f", {first['gpu']}" if cuda else "")
    )
    print(head)
    for r in rows:
        line = (
            f"{r['mode']:<9} {r['steps_per_s']:>8.2f} {r['wall_s']:>7.1f} "
            f"{r['rss_before_mib']:>6.0f}MiB {r['peak_rss_mib']:>6.0f}MiB"
        )
        line += f" {r['cuda_peak_mib']:>7.0f}MiB" if cuda else ""
        drop = r["val_improvement"]
        line += f" {drop * 100:>8.1f}%" if drop is not None else f" {'-':>9}"
        print(line)
    speedup = rows[0]["steps_per_s"] / rows[1]["steps_per_s"]
    print(f"caching: {speedup:.2f}x steps/s")


if __name__ == "__main__":
    main()
