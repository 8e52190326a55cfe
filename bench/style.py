"""How fast a style is learned on `toy-sd15`: steps and seconds until the stripe style shows
in 80% of held-out prompts, for Atelier's trainer and for a plain loop written without
caching (it encodes every batch through the VAE and the text encoder), in the same run.

Both train the same LoRA (same targets, rank, lr, batch, timesteps, seed; the plain loop
without output preservation) on the demo's 12 references; every `--every` steps the
adapter is scored on held-out prompts with the trigger (style shows) and without it, LoRA
on (leak), with the toy world's metrics. Training time excludes the scoring.

    .venv/bin/python bench/style.py [--steps 300] [--every 25] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bot.demo.references import held_out_prompts, reference_scenes  # noqa: E402
from bot.demo.scoring import Tally  # noqa: E402
from gpu_runner.samplers import make_scheduler  # noqa: E402
from gpu_runner.toyworld.model import build_toy_sd15_pipeline  # noqa: E402
from gpu_runner.training.config import make_config  # noqa: E402
from gpu_runner.training.loop import ADAPTER_NAME, train  # noqa: E402
from storage.families import GenerationDefaults, generation_defaults, trigger_weight  # noqa: E402
from storage.prompt_rules import TRIGGER_PLACEHOLDER  # noqa: E402
from toyworld.styles import draw  # noqa: E402

TRIGGER = "zxstripes"
STYLE = "stripes"
TARGET = 0.8
PROMPTS = held_out_prompts(10)


def items() -> list[tuple[Any, str]]:
    # The trigger goes last: toy-sd15's text encoder never saw a made-up word, and with
    # CLIP's causal attention words after it would read differently.
    return [
        (draw(s, (STYLE,)), f"{s.caption}, {TRIGGER_PLACEHOLDER}") for s in reference_scenes(12)
    ]


OVERRIDES: dict[str, Any] = {}  # from the command line (--lr, --prior)


def settings(steps: int) -> dict[str, Any]:
    # toy-sd15's training defaults (gpu_runner/jobs/train.py) with only the run length set.
    from gpu_runner.jobs.train import builtin_training

    base = builtin_training("toy-sd15", "lora")
    base.update(steps=steps, sample_seeds=[1], **OVERRIDES)
    return base


@torch.no_grad()
def score(pipe: Any) -> dict[str, float]:
    """Style shows with the trigger, leaks without it, colour kept (LoRA as it is now, at
    the weight a trigger word applies in chat)."""
    d = generation_defaults("toy-sd15", {})
    pipe.scheduler = make_scheduler(pipe.scheduler.config, d.sampler)
    pipe.unet.set_adapters([ADAPTER_NAME], weights=[trigger_weight("toy-sd15")])
    try:
        return _tally(pipe, d)
    finally:
        pipe.unet.set_adapters([ADAPTER_NAME], weights=[1.0])


def _tally(pipe: Any, d: GenerationDefaults) -> dict[str, float]:
    on, off = Tally.empty(), Tally.empty()
    for tally, suffix in ((on, f", {TRIGGER}"), (off, "")):
        prompts = [p.caption + suffix for p in PROMPTS]
        gens = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(len(prompts))]
        images = pipe(
            prompts, num_inference_steps=d.steps, guidance_scale=d.cfg, width=64, height=64,
            generator=gens,
        ).images  # fmt: skip
        for image, scene in zip(images, PROMPTS, strict=True):
            tally.add(image, scene, STYLE)
    s_on, s_off = on.summary(), off.summary()
    return {"shows": s_on["style_shows"], "leak": s_off["style_shows"], "colour": s_on["colour"]}


def atelier(steps: int, every: int) -> tuple[list[tuple[int, float, dict]], float]:
    """Atelier's trainer; scored between steps with its own adapter on (timer paused)."""
    pipe = build_toy_sd15_pipeline()
    chosen = {**settings(steps), "checkpoint_every": steps, "validate_every": steps}
    config = make_config("lora", "sd15", "style", trigger=TRIGGER, **chosen)
    curve: list[tuple[int, float, dict]] = []
    clock = {"train": 0.0, "since": time.perf_counter()}
    step = {"n": 0}

    def progress(n: int, total: int, loss: float, extras: dict[str, Any]) -> None:
        step["n"] = n
        if n % every == 0 or n == total:
            clock["train"] += time.perf_counter() - clock["since"]
            was = pipe.unet.training
            pipe.unet.eval()
            curve.append((n, clock["train"], score(pipe)))
            pipe.unet.train(was)
            clock["since"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        train(config, items(), pipe, Path(tmp) / "o", checkpoint_dir=Path(tmp) / "c",
              progress=progress)  # fmt: skip
    return curve, clock["train"]


def plain_loop(steps: int, every: int) -> tuple[list[tuple[int, float, dict]], float]:
    """A straightforward LoRA loop without caching: VAE and text encoder run every step."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    cfg = make_config("lora", "sd15", "style", trigger=TRIGGER, **settings(steps)).model_dump()
    pipe = build_toy_sd15_pipeline()
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], init_lora_weights="gaussian",
                   target_modules=cfg["target_modules"]),
        adapter_name=ADAPTER_NAME,
    )  # fmt: skip
    params = [p for n, p in pipe.unet.named_parameters() if ADAPTER_NAME in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg["learning_rate"], weight_decay=1e-2)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    data = items()
    arrays = [np.asarray(im, dtype=np.float32) / 127.5 - 1 for im, _ in data]
    pixels = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
    captions = [c.replace(TRIGGER_PLACEHOLDER, TRIGGER) for _, c in data]
    gen = torch.Generator().manual_seed(0)
    curve: list[tuple[int, float, dict]] = []
    trained = 0.0
    since = time.perf_counter()
    batch = cfg["batch_size"]
    for n in range(1, steps + 1):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels[idx]).latent_dist.sample(gen)
            latents = latents * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(
                [captions[i] for i in idx], padding="max_length", max_length=77,
                truncation=True, return_tensors="pt",
            ).input_ids  # fmt: skip
            hidden = pipe.text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(cfg["min_timestep"], cfg["max_timestep"], (batch,), generator=gen)
        pred = pipe.unet(noise_sched.add_noise(latents, noise, t), t, hidden).sample
        # toy-sd15 predicts v (zero terminal SNR), as diffusers' training examples handle it.
        if noise_sched.config.prediction_type == "v_prediction":
            target = noise_sched.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = F.mse_loss(pred, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if n % every == 0 or n == steps:
            trained += time.perf_counter() - since
            pipe.unet.eval()
            curve.append((n, trained, score(pipe)))
            pipe.unet.train()
            since = time.perf_counter()
    return curve, trained


def first_reaching(curve: list[tuple[int, float, dict]]) -> tuple[int | None, float | None]:
    for n, seconds, s in curve:
        if s["shows"] >= TARGET:
            return n, seconds
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="override the learning rate")
    parser.add_argument("--prior", type=float, default=None, help="prior-preservation weight")
    parser.add_argument("--atelier-only", action="store_true", help="skip the plain loop")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=JSON",
        help="other training settings, e.g. train_text_encoder=true prior_preservation=0.3",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for pair in args.set:
        key, _, value = pair.partition("=")
        OVERRIDES[key] = json.loads(value)
    if args.lr is not None:
        OVERRIDES["learning_rate"] = args.lr
    if args.prior is not None:
        OVERRIDES["prior_preservation"] = args.prior
    runs: dict[str, Callable[[int, int], tuple[list, float]]] = {
        "atelier": atelier, "plain loop (no cache)": plain_loop,
    }  # fmt: skip
    if args.atelier_only:
        del runs["plain loop (no cache)"]
    results = {}
    for name, fn in runs.items():
        curve, seconds = fn(args.steps, args.every)
        results[name] = (curve, seconds)
        print(f"\n{name}: {args.steps} steps in {seconds:.1f} s "
              f"({args.steps / seconds:.2f} steps/s)")  # fmt: skip
        for n, t, s in curve:
            print(f"  step {n:4d}  {t:6.1f} s  style shows {s['shows']:.0%}  "
                  f"leak {s['leak']:.0%}  colour {s['colour']:.0%}")  # fmt: skip
    print(f"\nUntil the style shows in {TARGET:.0%} of {len(PROMPTS)} held-out prompts:")
    reach = {name: first_reaching(curve) for name, (curve, _) in results.items()}
    for name, (n, t) in reach.items():
        final = results[name][0][-1][2]
        when = f"step {n}, {t:.1f} s" if n is not None else f"not within {args.steps} steps"
        print(f"  {name:24s} {when}; final: shows {final['shows']:.0%}, leak "
              f"{final['leak']:.0%}, colour {final['colour']:.0%}")  # fmt: skip
    if args.atelier_only:
        return
    (na, ta), (nb, tb) = reach["atelier"], reach["plain loop (no cache)"]
    if ta and tb:
        print(f"  seconds ratio plain/atelier: {tb / ta:.2f}x (steps {nb}/{na})")
    sa, sb = results["atelier"][1], results["plain loop (no cache)"][1]
    print(f"  throughput ratio atelier/plain: {(args.steps / sa) / (args.steps / sb):.2f}x")


if __name__ == "__main__":
    main()
