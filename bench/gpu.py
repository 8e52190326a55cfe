"""GPU bench on full-size SD1.5 and SDXL architectures with random weights.

Each family's UNet, VAE and text encoder(s) are built from their published configs (no
download: speed and memory belong to the architecture, not to the weights), on the GPU, in
each precision. Printed per family and precision:
- LoRA training steps/s at the family's resolution (512 / 1024 px) through Atelier's own
  training loop, at batch 1 and 4 with gradient checkpointing on and off, and the peak GPU
  memory of the steps beside storage.families' estimate for the same run,
- generation seconds per image (30 steps) through the runner's Generator and through a
  bare pipeline call, the runner's overhead over the bare call, and the peak memory.

Rows run most telling first and stop at the time budget (the rest print as skipped), so
the whole script stays under 8 minutes on one GPU. Without CUDA it prints one line, exits 0.

    .venv/bin/python bench/gpu.py [--device cuda] [--steps 6] [--repeats 2] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Run as a script, bench/ is first on sys.path and bench/queue.py would shadow the stdlib
# `queue` that torch imports: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

PROMPT = "a watercolour harbour at dawn, boats, soft light"
GEN_STEPS = 30
# SD1.5 (runwayml/stable-diffusion-v1-5) and SDXL (stabilityai/stable-diffusion-xl-base-1.0)
# component configs, as published in those repositories' unet/vae/text_encoder*/config.json.
UNET: dict[str, dict[str, Any]] = {
    "sd15": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    "sdxl": {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
}
VAE_BY_FAMILY: dict[str, dict[str, Any]] = {
    "sd15": {"sample_size": 512, "scaling_factor": 0.18215},
    "sdxl": {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "layers": 12, "heads": 12}
CLIP_L |= {"act": "quick_gelu", "projection_dim": 768}
CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "layers": 32, "heads": 20}
CLIP_BIG_G |= {"act": "gelu", "projection_dim": 1280}
SIDE = {"sd15": 512, "sdxl": 1024}


def _text_encoder(spec: dict[str, Any], tokenizer: Any, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,  # CLIP's BPE vocabulary; the offline tokenizer uses a part of it
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        max_position_embeddings=77,
        hidden_act=spec["act"],
        projection_dim=spec["projection_dim"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_pipeline(family: str, device: str, dtype: torch.dtype) -> Any:
    """The family's full-size pipeline, random weights made on the GPU (seconds, not the
    minutes a CPU initialisation of SDXL's 3.5 B parameters takes), each component cast
    to `dtype` as soon as it exists so fp32 copies never pile up."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from gpu_runner.tiny_models import build_tiny_tokenizer

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    tokenizer = build_tiny_tokenizer()  # offline; prompt lengths and ids work the same way
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET[family]).to(dtype)
        vae = AutoencoderKL(**VAE, **VAE_BY_FAMILY[family]).to(dtype)
        text_encoder = _text_encoder(CLIP_L, tokenizer, projection=False).to(dtype)
        if family == "sdxl":
            tokenizer_2 = build_tiny_tokenizer(pad_token="!")
            text_encoder_2 = _text_encoder(CLIP_BIG_G, tokenizer_2, projection=True).to(dtype)
    if family == "sdxl":
        pipe: Any = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class Row:
    family: str
    precision: str  # bf16 | fp16
    kind: str  # generate | train
    batch: int = 1
    checkpointing: bool = True


def plan(families: list[str], precisions: list[str]) -> list[Row]:
    """Most telling first, so a time budget cuts the least: in every family and precision
    generation and the preset's own training shape (checkpointed; SD1.5 batch 4, SDXL 1),
    then the other shapes. Grouped by family: one model is resident at a time, so each
    row's peak memory is its own."""
    first: list[Row] = []
    rest: list[Row] = []
    for family in families:
        preset_batch = 4 if family == "sd15" else 1
        for precision in precisions:
            first.append(Row(family, precision, "generate"))
            first.append(Row(family, precision, "train", preset_batch))
            rest += [
                Row(family, precision, "train", 5 - preset_batch),
                Row(family, precision, "train", 1, checkpointing=False),
                Row(family, precision, "train", 4, checkpointing=False),
            ]
    return first + rest


def _peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20


def _fresh_peak() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def train_row(row: Row, pipe: Any, device: str, steps: int) -> dict[str, Any]:
    from gpu_runner.tiny_models import demo_dataset
    from gpu_runner.training.config import make_config
    from gpu_runner.training.loop import TrainingError, train
    from storage.families import training_memory_mb

    side = SIDE[row.family]
    config = make_config(
        "lora",
        row.family,
        "style",
        trigger="zxqbench",
        steps=steps,
        batch_size=row.batch,
        gradient_checkpointing=row.checkpointing,
        mixed_precision=row.precision,
        validate_every=steps,  # validation, checkpoint and samples only at the end
        checkpoint_every=steps,
        sample_steps=1,
        sample_seeds=[1],
        warmup_steps=0,
    )
    estimate = training_memory_mb(
        "bench",
        row.family,
        method="lora",
        resolution=side,
        batch_size=row.batch,
        rank=config.rank,
        gradient_checkpointing=row.checkpointing,
    )
    stamps: list[float] = []
    peaks: dict[str, float] = {}

    def progress(step: int, *_: Any) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if step == 1:  # set-up (latent caching, base validation) and the first step
            peaks["setup"] = _peak_mib()
            torch.cuda.reset_peak_memory_stats()
        elif step == steps - 1:  # steps 2 .. N-1 only
            peaks["steps"] = _peak_mib()

    _fresh_peak()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(
                config,
                demo_dataset(8, side, seed=0),
                pipe,
                Path(tmp) / "out",
                checkpoint_dir=Path(tmp) / "ckpt",
                progress=progress,
                device=device,
            )
    except TrainingError as exc:
        if "out of GPU memory" not in str(exc):
            raise
        return {"error": "out of memory", "estimate": estimate}
    # Steps 2 .. N-1: skips the first step's warm-up and the last step's validation.
    timed = len(stamps) - 2
    rate = timed / (stamps[-2] - stamps[0]) if timed > 0 else float("nan")
    job = max(peaks["setup"], _peak_mib())  # the whole run, final samples and export too
    return {"steps_per_s": rate, "peak": peaks["steps"], "job_peak": job, "estimate": estimate}


def generate_row(row: Row, pipe: Any, repeats: int) -> dict[str, Any]:
    from gpu_runner.devices import DeviceChoice
    from gpu_runner.families import family_of_pipeline
    from gpu_runner.generation import GenerationRequest, Generator
    from gpu_runner.pipelines import (
        BaseModelSpec,
        LoadedPipeline,
        PipelineCache,
        estimate_pipeline_bytes,
    )
    from storage.families import generation_memory_mb

    def load(spec: BaseModelSpec, _choice: Any) -> LoadedPipeline:
        return LoadedPipeline(
            spec=spec,
            pipe=pipe,
            family=family_of_pipeline(pipe).variant_of(pipe),
            model_hash="0" * 64,
            nbytes=estimate_pipeline_bytes(pipe),
            scheduler_config=dict(pipe.scheduler.config),
        )

    choice = DeviceChoice(str(pipe.device), pipe.unet.dtype)
    cache = PipelineCache([BaseModelSpec("bench", "bench")], choice, 1 << 40, loader=load)
    generator = Generator(cache)
    loaded = cache.get("bench")
    side, sampler, cfg = SIDE[row.family], "Euler", 7.0
    request = GenerationRequest(
        PROMPT, base_model="bench", seed=1, steps=GEN_STEPS, cfg=cfg, width=side, height=side,
        sampler=sampler,
    )  # fmt: skip

    def runner() -> None:
        generator.generate(request)

    def bare() -> None:
        # The Generator renders under inference_mode: the bare call does too (like for like).
        with torch.inference_mode():
            pipe.scheduler = generator._scheduler(loaded, sampler)
            pipe(
                prompt=[PROMPT], negative_prompt=[""], num_inference_steps=GEN_STEPS,
                guidance_scale=cfg, width=side, height=side,
                generator=[torch.Generator("cpu").manual_seed(1)], output_type="pil",
            )  # fmt: skip

    _fresh_peak()
    runner(), bare()  # warm-up: kernels, cuDNN autotuning, allocator
    times: dict[str, list[float]] = {"runner": [], "bare": []}
    for round_ in range(repeats):
        order = (("runner", runner), ("bare", bare))
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    runner_s, bare_s = (statistics.median(times[k]) for k in ("runner", "bare"))
    return {
        "runner_s": runner_s,
        "bare_s": bare_s,
        "overhead": (runner_s - bare_s) / bare_s * 100,
        "peak": _peak_mib(),
        "estimate": generation_memory_mb(row.family, width=side, height=side),  # type: ignore[arg-type]
    }


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=6, help="training steps per row (>= 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per side")
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--precisions", default="bf16,fp16")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting rows after")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA GPU here (torch {torch.__version__}); nothing to measure")
        return 0
    if args.steps < 4:
        parser.error("--steps must be at least 4")
    warnings.filterwarnings("ignore")  # random weights: NaN-to-uint8 casts etc. are expected
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    from gpu_runner.devices import has_native_bf16, pin_device, resolve_device

    choice = resolve_device(args.device)
    pin_device(choice)
    precisions = [p for p in args.precisions.split(",") if p]
    if "bf16" in precisions and not has_native_bf16(choice.device):
        precisions.remove("bf16")  # emulated bf16 is no figure a studio would run
    families = [f for f in args.families.split(",") if f]
    from gpu_runner.generation import GenerationOutOfMemoryError

    started = time.perf_counter()
    results: dict[Row, dict[str, Any]] = {}
    resident: tuple[str, Any] | None = None
    build_s: dict[str, float] = {}
    for row in plan(families, precisions):
        if time.perf_counter() - started > args.budget_s:
            results[row] = {"error": "skipped (time budget)"}
            continue
        if resident is None or resident[0] != row.family:
            resident = None  # the other family's weights go before this one's are built
            _fresh_peak()
            t0 = time.perf_counter()
            resident = (
                row.family,
                build_pipeline(row.family, choice.device, _dtype(row.precision)),
            )
            build_s[row.family] = time.perf_counter() - t0
        pipe = resident[1]
        if pipe.unet.dtype != _dtype(row.precision):
            pipe.to(dtype=_dtype(row.precision))  # in place: no second copy
        try:
            if row.kind == "generate":
                results[row] = generate_row(row, pipe, args.repeats)
            else:
                results[row] = train_row(row, pipe, choice.device, args.steps)
        except (torch.OutOfMemoryError, GenerationOutOfMemoryError):
            results[row] = {"error": "out of memory"}
        print(f"  {_label(row)}: done at {time.perf_counter() - started:.0f} s", flush=True)
    report(results, choice.device, build_s, time.perf_counter() - started)
    return 0


def _label(row: Row) -> str:
    if row.kind == "generate":
        return f"{row.family} {row.precision} generate"
    gc_ = "on" if row.checkpointing else "off"
    return f"{row.family} {row.precision} train batch {row.batch} checkpointing {gc_}"


def report(
    results: dict[Row, dict[str, Any]], device: str, build_s: dict[str, float], wall: float
) -> None:
    import diffusers

    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    print(
        f"\nbench/gpu.py: {torch.cuda.get_device_name(index)} (compute {major}.{minor}), torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}; full-size architectures, "
        f"random weights; built in "
        + ", ".join(f"{f} {s:.0f} s" for f, s in build_s.items())
        + f"; total {wall:.0f} s"
    )
    print("\nLoRA training (Atelier's loop, rank 32, latents cached, AdamW), family resolution")
    print(f"{'family':<6} {'prec':<5} {'batch':>5} {'ckpt':>4} {'steps/s':>8} {'img/s':>6} "
          f"{'steps MiB':>9} {'job MiB':>8} {'estimate':>9}")  # fmt: skip
    for row, r in results.items():
        if row.kind != "train":
            continue
        head = f"{row.family:<6} {row.precision:<5} {row.batch:>5} " + (
            f"{'on' if row.checkpointing else 'off':>4}"
        )
        if "error" in r:
            print(
                f"{head} {r['error']}"
                + (f" (estimate {r['estimate']} MiB)" if "estimate" in r else "")
            )
            continue
        print(
            f"{head} {r['steps_per_s']:>8.2f} {r['steps_per_s'] * row.batch:>6.2f} "
            f"{r['peak']:>9.0f} {r['job_peak']:>8.0f} {r['estimate']:>9}"
        )
    print("(steps MiB: peak over steps 2..N-1; job MiB: the whole run, set-up included)")
    print(f"\nGeneration, {GEN_STEPS} steps, Euler, CFG 7, family resolution, 1 image")
    print(f"{'family':<6} {'prec':<5} {'runner s':>9} {'bare s':>7} {'overhead':>9} "
          f"{'peak MiB':>9} {'estimate':>9}")  # fmt: skip
    for row, r in results.items():
        if row.kind != "generate":
            continue
        head = f"{row.family:<6} {row.precision:<5}"
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        print(
            f"{head} {r['runner_s']:>9.2f} {r['bare_s']:>7.2f} {r['overhead']:>+8.1f}% "
            f"{r['peak']:>9.0f} {r['estimate']:>9}"
        )


if __name__ == "__main__":
    sys.exit(main())
