"""How far textual inversion takes the outline style on `toy-sd15`: first the base model's
own word for it ("outlined"), the ceiling of a method that trains one embedding and so can
only find a look the base already draws; then a TI trained by Atelier's trainer on the
demo's 12 outlined references, loaded by diffusers' own loader, with its trigger and
without. Scored with the toy world's metrics on held-out prompts.

    .venv/bin/python bench/textual_inversion.py [--weights DIR] [--steps 300]
        [--init-word style] [--lr 5e-3] [--prompts 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# As in bench/style.py: bench/queue.py must not shadow the stdlib `queue` torch imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bot.demo.references import held_out_prompts, reference_scenes  # noqa: E402
from bot.demo.scoring import Tally  # noqa: E402
from gpu_runner.jobs.train import builtin_training  # noqa: E402
from gpu_runner.samplers import make_scheduler  # noqa: E402
from gpu_runner.toyworld.model import OUTLINED_WORD, WEIGHTS_DIR, build_toy_sd15_pipeline  # noqa: E402
from gpu_runner.training.config import make_config  # noqa: E402
from gpu_runner.training.loop import train  # noqa: E402
from storage.families import generation_defaults  # noqa: E402
from storage.prompt_rules import TRIGGER_PLACEHOLDER  # noqa: E402
from toyworld.styles import draw  # noqa: E402

STYLE = "outline"
TRIGGER = "zxoutline"


@torch.no_grad()
def score(pipe: Any, prompts: list[Any], suffix: str) -> dict[str, float]:
    """Each prompt's caption + `suffix`, one seed each, at toy-sd15's generation defaults."""
    d = generation_defaults("toy-sd15", {})
    pipe.scheduler = make_scheduler(pipe.scheduler.config, d.sampler)
    texts = [p.caption + suffix for p in prompts]
    gens = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(len(texts))]
    images = pipe(
        texts, num_inference_steps=d.steps, guidance_scale=d.cfg, width=d.width,
        height=d.height, generator=gens,
    ).images  # fmt: skip
    tally = Tally.empty()
    for image, scene in zip(images, prompts, strict=True):
        tally.add(image, scene, STYLE)
    return tally.summary()


def line(label: str, s: dict[str, float]) -> str:
    return (f"  {label:<32} outlines {s['style_shows']:4.0%}  colour {s['colour']:4.0%}  "
            f"all three right {s['adherence']:4.0%}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="a toy-sd15 folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--init-word", default=None, help="the token's start (chat: init_word)")
    parser.add_argument("--lr", type=float, default=None, help="override the learning rate")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = held_out_prompts(args.prompts)
    pipe = build_toy_sd15_pipeline(args.weights)
    print(f"toy-sd15 from {args.weights}, {len(prompts)} held-out prompts, one seed each")
    print(line("base, no style word", score(pipe, prompts, "")))
    print(
        line(f'base, ", {OUTLINED_WORD}" (the ceiling)', score(pipe, prompts, f", {OUTLINED_WORD}"))
    )

    settings = builtin_training("toy-sd15", "textual_inversion")
    settings.update(steps=args.steps, sample_seeds=[1], checkpoint_every=args.steps,
                    validate_every=args.steps)  # fmt: skip
    # Only what was asked: a None would hide toy-sd15's own default behind the preset's.
    asked = {"learning_rate": args.lr, "initializer_token": args.init_word}
    settings.update({k: v for k, v in asked.items() if v is not None})
    config = make_config("textual_inversion", "sd15", "style", trigger=TRIGGER, **settings)
    items = [
        (draw(s, (STYLE,)), f"{s.caption}, {TRIGGER_PLACEHOLDER}") for s in reference_scenes(12)
    ]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(config, items, pipe, Path(tmp) / "out", checkpoint_dir=Path(tmp) / "ckpt")
        seconds = time.perf_counter() - started
        assert result.embedding_path is not None
        pipe.load_textual_inversion(load_file(result.embedding_path)["emb_params"], token=TRIGGER)
    print(f"\ntextual inversion: {args.steps} steps at lr {config.learning_rate:g} from "
          f"{config.initializer_token!r}, {seconds:.0f} s")  # fmt: skip
    print(line(f'with ", {TRIGGER}"', score(pipe, prompts, f", {TRIGGER}")))
    print(line("without it", score(pipe, prompts, "")))


if __name__ == "__main__":
    main()
