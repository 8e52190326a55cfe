"""Generation benchmark: the runner's Generator against a bare diffusers call.

Prints one table:
- per-image time of Generator.generate vs a bare pipeline call with the same settings,
  run interleaved in the same process (target: overhead <= 5%),
- a batch of 4 requests in one call vs 4 single requests (target: >= 2x faster),
- switching LoRA adapters with set_adapters vs a full reload with load_lora_weights
  (target: switch <= 10% of reload).

    .venv/bin/python bench/generate.py [--device auto] [--repeats 7] [--base tiny-sd15]
        [--steps 20] [--size 64] [--sampler Euler] [--threads N] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Run as a script, bench/ is first on sys.path and bench/queue.py would shadow the stdlib
# `queue` that torch imports: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from gpu_runner.devices import DeviceChoice, resolve_device  # noqa: E402
from gpu_runner.generation import GenerationRequest, Generator  # noqa: E402
from gpu_runner.pipelines import BaseModelSpec, LoadedPipeline, PipelineCache  # noqa: E402
from gpu_runner.prompts import AdapterInfo, AdapterUse  # noqa: E402

PROMPT = "a photo of a red cat"


def _sync(choice: DeviceChoice) -> None:
    if choice.kind == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], choice: DeviceChoice) -> float:
    _sync(choice)
    start = time.perf_counter()
    fn()
    _sync(choice)
    return time.perf_counter() - start


def _interleaved(fns: list[Callable[[], Any]], repeats: int, choice: DeviceChoice) -> list[float]:
    """Median time of each function, run in turn (starting with a different one each round),
    so drift and position effects (heat, caches, other load) hit all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        for k in range(len(fns)):
            i = (round_ + k) % len(fns)
            times[i].append(_timed(fns[i], choice))
    return [statistics.median(bucket) for bucket in times]


def _make_lora(loaded: LoadedPipeline, folder: Path, name: str, seed: int) -> Path:
    """A LoRA for this pipeline's UNet with seeded weights, saved diffusers-style."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = loaded.pipe.unet
    unet.add_adapter(
        LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        adapter_name="bench_tmp",
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in unet.named_parameters():
            if "bench_tmp" in pname:
                param.copy_(torch.randn(param.shape, generator=gen).to(param) * 0.1)
    state = {
        k: v.to("cpu", torch.float32)
        for k, v in get_peft_model_state_dict(unet, adapter_name="bench_tmp").items()
    }
    unet.delete_adapters("bench_tmp")
    type(loaded.pipe).save_lora_weights(
        save_directory=str(folder), unet_lora_layers=state, weight_name=f"{name}.safetensors"
    )
    return folder / f"{name}.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: per device)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--base", default="tiny-sd15", help="built-in name, folder or hub id")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        # On a busy CPU, extra OpenMP threads spin against other processes: pin the count.
        torch.set_num_threads(args.threads)

    choice = resolve_device(args.device, args.dtype)
    cache = PipelineCache([BaseModelSpec("bench", args.base)], choice, budget_bytes=1 << 40)
    generator = Generator(cache)
    loaded = cache.get("bench")
    pipe = loaded.pipe
    settings: dict[str, Any] = {
        "steps": args.steps, "cfg": 7.0, "width": args.size, "height": args.size,
        "sampler": args.sampler, "base_model": "bench",
    }  # fmt: skip
    rows: list[tuple[str, str, str, str]] = []

    # 1. Runner per-image time vs a bare pipeline call.
    request = GenerationRequest(PROMPT, seed=1, **settings)

    def bare() -> Any:
        pipe.scheduler = generator._scheduler(loaded, args.sampler)
        return pipe(
            prompt=[PROMPT], negative_prompt=[""], num_inference_steps=args.steps,
            guidance_scale=7.0, width=args.size, height=args.size,
            generator=[torch.Generator("cpu").manual_seed(1)], output_type="pil",
        ).images  # fmt: skip

    def bare_inference_mode() -> Any:
        # The Generator runs under inference_mode (pipelines use no_grad): like for like.
        with torch.inference_mode():
            return bare()

    runner_t, bare_t, bare_im_t = _interleaved(
        [lambda: generator.generate(request), bare, bare_inference_mode], args.repeats, choice
    )
    overhead = (runner_t - bare_t) / bare_t * 100
    overhead_im = (runner_t - bare_im_t) / bare_im_t * 100
    rows.append(("bare diffusers call, per image", f"{bare_t * 1000:.1f} ms", "", ""))
    rows.append(("bare call in inference_mode", f"{bare_im_t * 1000:.1f} ms", "", ""))
    rows.append(("Generator.generate, per image", f"{runner_t * 1000:.1f} ms", "", ""))
    rows.append(("runner overhead vs bare", f"{overhead:+.1f} %", "<= 5 %", _ok(overhead <= 5)))
    rows.append(
        ("  vs bare in inference_mode", f"{overhead_im:+.1f} %", "<= 5 %", _ok(overhead_im <= 5))
    )

    # 2. A batch of 4 in one call vs 4 single calls.
    batch = [GenerationRequest(PROMPT, seed=10 + i, **settings) for i in range(4)]
    batch_t, singles_t = _interleaved(
        [lambda: generator.generate_many(batch), lambda: [generator.generate(r) for r in batch]],
        args.repeats,
        choice,
    )
    speedup = singles_t / batch_t
    rows.append(("4 singles", f"{singles_t * 1000:.1f} ms", "", ""))
    rows.append(("batch of 4, one call", f"{batch_t * 1000:.1f} ms", "", ""))
    rows.append(("batch speed-up", f"{speedup:.2f} x", ">= 2 x", _ok(speedup >= 2)))

    # 3. Adapter switch (set_adapters) vs full reload (load_lora_weights from the file).
    with tempfile.TemporaryDirectory() as tmp:
        infos = [
            AdapterInfo(n, str(_make_lora(loaded, Path(tmp), n, s)), trigger=n)
            for n, s in (("benchstyle_a", 1), ("benchstyle_b", 2))
        ]
        uses = [(AdapterUse(i),) for i in infos]
        for use in uses:
            generator._activate_loras(loaded, use)  # both loaded once
        flip = iter(range(10**9))

        def switch() -> None:
            generator._activate_loras(loaded, uses[next(flip) % 2])

        def reload() -> None:
            from safetensors.torch import load_file

            name = generator.adapter_name(infos[0])
            pipe.delete_adapters(name)
            pipe.load_lora_weights(load_file(infos[0].path), adapter_name=name)

        switch_t, reload_t = _interleaved([switch, reload], args.repeats, choice)
    ratio = switch_t / reload_t * 100
    rows.append(("adapter switch (set_adapters)", f"{switch_t * 1000:.1f} ms", "", ""))
    rows.append(("full reload (load_lora_weights)", f"{reload_t * 1000:.1f} ms", "", ""))
    rows.append(("switch / reload", f"{ratio:.1f} %", "<= 10 %", _ok(ratio <= 10)))

    print(
        f"device {choice.device}, dtype {str(choice.dtype).removeprefix('torch.')}, "
        f"base {args.base}, {args.size}x{args.size}, {args.steps} steps, sampler {args.sampler}, "
        f"torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    if choice.kind == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1024**2
        print(f"peak GPU memory allocated: {peak:.0f} MiB ({torch.cuda.get_device_name()})")
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>12}  {'target':>8}  ok")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:>12}  {target:>8}  {ok}")


def _ok(passed: bool) -> str:
    return "yes" if passed else "NO"


if __name__ == "__main__":
    main()
