"""GPU bench on full-size SD1.5, SDXL, FLUX.2 [klein] 4B and FLUX.1 [dev] architectures with
random weights.

Each family's denoiser, VAE and text encoder(s) are built from their published configs (no
download: speed and memory belong to the architecture, not to the weights), directly on the
GPU in each precision. Printed per family and precision:
- LoRA training steps/s at the family's resolution (512 / 1024 px) through Atelier's own
  training loop, and the peak GPU memory of the steps beside storage.families' estimate for
  the same run: SD at batch 1 and 4 with gradient checkpointing on and off; FLUX in bf16 at
  batch 1, checkpointed, on the base as loaded and quantized to NF4 (`quantize=nf4`),
- generation seconds per image through the runner's Generator and through a bare pipeline
  call, the runner's overhead over the bare call, and the peak memory: SD at 30 Euler steps
  and CFG 7, FLUX at its family's defaults (storage.families.FAMILY_DEFAULTS).

Rows run most telling first (FLUX's, then SD's) and stop starting at the time budget (the
rest print as skipped): the script takes the budget plus the row in flight, about 8 minutes
by default on one GPU. Without CUDA it prints one line, exits 0. `--count-params` needs no
GPU: it builds every family on the meta device and prints each component's parameters
beside storage.families' weight figures.

    .venv/bin/python bench/gpu.py [--device cuda] [--steps 6] [--repeats 2] [--budget-s 420]
    .venv/bin/python bench/gpu.py --count-params
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

from storage.families import DENOISER_MB, FAMILY_DEFAULTS, WEIGHTS_MB  # noqa: E402
from storage.training_bounds import Quantization  # noqa: E402

PROMPT = "a watercolour harbour at dawn, boats, soft light"
GEN_STEPS = 30
BENCH_FAMILIES = ("flux2-klein", "flux1", "sd15", "sdxl")
# FLUX runs in bf16 only: the figures asked for, and T5 v1.1 overflows in fp16 (recalled).
FLUX = ("flux2-klein", "flux1")
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
    # FLUX.1 [dev] vae/config.json (read in public copies of it): 16 latent channels, no
    # quant convs, its own shift and scale.
    "flux1": {
        "latent_channels": 16,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    },
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "layers": 12, "heads": 12}
CLIP_L |= {"act": "quick_gelu", "projection_dim": 768}
CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "layers": 32, "heads": 20}
CLIP_BIG_G |= {"act": "gelu", "projection_dim": 1280}
# black-forest-labs/FLUX.2-klein-base-4B transformer/config.json (read: a public repository
# copies it verbatim and says the distilled FLUX.2-klein-4B's is byte-identical; diffusers'
# scripts/convert_flux2_to_diffusers.py writes the same "klein-4b" config).
FLUX2_KLEIN_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,  # 32 VAE channels x the 2x2 patch
    "out_channels": None,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,  # Qwen3's hidden layers 9, 18 and 27, 2560 wide, stacked
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}
# Its text encoder, Qwen3-4B as Qwen3ForCausalLM. Read: Qwen3-4B's config.json in public
# copies (the klein repository's text_encoder/config.json itself was not found; configs
# written after it agree on hidden 2560, 36 layers, 32 / 8 heads, intermediate 9728).
QWEN3_4B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# The FLUX.2 VAE's vae/config.json (read in a public copy; the klein repositories take it
# from FLUX.2-dev). diffusers' defaults are these values too; its force_upcast is no
# AutoencoderKLFlux2 argument. --count-params counts 84,046,115 parameters, the number a
# public loader of the released weights reports for them.
FLUX2_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 32,
    "patch_size": (2, 2),
    "batch_norm_eps": 1e-4,
    "sample_size": 1024,
}
# black-forest-labs/FLUX.1-dev transformer/config.json (read in public copies of it).
FLUX1_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 VAE channels x the 2x2 patch
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL's width
    "pooled_projection_dim": 768,  # CLIP-L's
    "guidance_embeds": True,  # dev is guidance-distilled
    "axes_dims_rope": (16, 56, 56),
}
# Its text_encoder_2, T5-v1.1-XXL's encoder (read: the config.json kohya sd-scripts embeds
# for FLUX.1's T5, google/t5-v1_1-xxl's).
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
# FLUX.1 [dev]'s scheduler_config (recalled, as the tiny builders use it; klein's not read):
# dynamic shifting, the pipelines pass their resolution-dependent mu. A step's cost does not
# depend on it.
FLOW_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SIDE = {"sd15": 512, "sdxl": 1024, "flux2-klein": 1024, "flux1": 1024}


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


def _sd_parts(family: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from gpu_runner.tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()  # offline; prompt lengths and ids work the same way
    parts: dict[str, Any] = {
        "tokenizer": tokenizer,
        "unet": UNet2DConditionModel(**UNET[family]),
        "vae": AutoencoderKL(**VAE, **VAE_BY_FAMILY[family]),
        "text_encoder": _text_encoder(CLIP_L, tokenizer, projection=False),
    }
    if family == "sdxl":
        tokenizer_2 = build_tiny_tokenizer(pad_token="!")
        parts |= {
            "tokenizer_2": tokenizer_2,
            "text_encoder_2": _text_encoder(CLIP_BIG_G, tokenizer_2, projection=True),
            "force_zeros_for_empty_prompt": True,
        }
    else:
        parts |= {
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
    return parts


def _flux2_klein_parts() -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from gpu_runner.families.tiny_flux2_klein import build_tiny_qwen_tokenizer

    return {
        # A byte-level vocabulary and Qwen3's chat template reduced to what the pipeline
        # asks: prompts still pad to the real 512 tokens, the encoder is the real size.
        "tokenizer": build_tiny_qwen_tokenizer(),
        "text_encoder": Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B)),
        "transformer": Flux2Transformer2DModel(**FLUX2_KLEIN_TRANSFORMER),
        "vae": AutoencoderKLFlux2(**FLUX2_VAE),
        "is_distilled": False,  # the base model, which LoRAs train on (50 steps, CFG)
    }


def _flux1_parts() -> dict[str, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from gpu_runner.families.tiny_flux1 import build_tiny_t5_tokenizer
    from gpu_runner.tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    return {
        "tokenizer": tokenizer,  # CLIP's 77 tokens
        "text_encoder": _text_encoder(CLIP_L, tokenizer, projection=False),
        "tokenizer_2": build_tiny_t5_tokenizer(),  # pads to the real 512 T5 tokens
        "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
        "transformer": FluxTransformer2DModel(**FLUX1_TRANSFORMER),
        "vae": AutoencoderKL(**{**VAE, **VAE_BY_FAMILY["flux1"]}),
    }


_PARTS: dict[str, Callable[[], dict[str, Any]]] = {
    "sd15": lambda: _sd_parts("sd15"),
    "sdxl": lambda: _sd_parts("sdxl"),
    "flux2-klein": _flux2_klein_parts,
    "flux1": _flux1_parts,
}


def _scheduler(family: str) -> Any:
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if family in FLUX:
        return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER)
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


@contextmanager
def _building(device: str, dtype: torch.dtype) -> Iterator[None]:
    """New tensors on `device` in `dtype`, seeded: random weights made on the GPU take
    seconds, not the minutes a CPU initialisation of billions of parameters takes, and no
    fp32 copy ever exists (FLUX.1's transformer alone would be 44 GiB of it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(family: str, device: str, dtype: torch.dtype) -> Any:
    """The family's full-size pipeline with random weights on `device` ("meta": shapes only)."""
    from gpu_runner.families import get_family

    scheduler = _scheduler(family)  # its tables stay on the CPU, as a loaded one's
    with _building(device, dtype):
        parts = _PARTS[family]()
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval()  # as from_pretrained hands them over: no dropout (T5 has 0.1)
    pipe = get_family(family).pipeline_class()(scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(families: tuple[str, ...] = BENCH_FAMILIES) -> dict[str, dict[str, int]]:
    """Parameters of each torch component of each family's full-size pipeline, assembled on
    the meta device (no memory, no initialisation)."""
    counts: dict[str, dict[str, int]] = {}
    for family in families:
        pipe = build_pipeline(family, "meta", torch.bfloat16)
        counts[family] = {
            name: sum(p.numel() for p in part.parameters())
            for name, part in pipe.components.items()
            if isinstance(part, torch.nn.Module)
        }
    return counts


def bf16_mib(params: int) -> float:
    return params * 2 / 2**20


def report_counts(counts: dict[str, dict[str, int]]) -> None:
    from gpu_runner.families import get_family

    print("bench/gpu.py --count-params: full-size architectures on the meta device, bf16 MiB")
    print(f"{'family':<12} {'component':<15} {'params':>15} {'bf16 MiB':>9}")
    for family, parts in counts.items():
        for name, params in parts.items():
            print(f"{family:<12} {name:<15} {params:>15,} {bf16_mib(params):>9,.0f}")
        total = bf16_mib(sum(parts.values()))
        denoiser = bf16_mib(parts[get_family(family).denoiser_attr])
        table_w, table_d = WEIGHTS_MB[family], DENOISER_MB[family]  # type: ignore[index]
        print(
            f"{family:<12} {'all':<15} {sum(parts.values()):>15,} {total:>9,.0f}  "
            f"WEIGHTS_MB {table_w:,} ({(table_w - total) / total:+.1%}); denoiser "
            f"{denoiser:,.0f}, DENOISER_MB {table_d:,} ({(table_d - denoiser) / denoiser:+.1%})"
        )


@dataclass(frozen=True)
class Row:
    family: str
    precision: str  # bf16 | fp16
    kind: str  # generate | train
    batch: int = 1
    checkpointing: bool = True
    quantize: Quantization = "none"


def plan(families: list[str], precisions: list[str]) -> list[Row]:
    """Most telling first, so a time budget cuts the least: in every family and precision
    generation and the preset's own training shape (checkpointed; SD1.5 batch 4, the others
    1; FLUX also on an NF4 base, last as it quantizes the pipeline in place), then SD's
    other shapes. Grouped by family: one model is resident at a time, so each row's peak
    memory is its own."""
    first: list[Row] = []
    rest: list[Row] = []
    for family in families:
        if family in FLUX:
            if "bf16" in precisions:
                first += [
                    Row(family, "bf16", "generate"),
                    Row(family, "bf16", "train"),
                    Row(family, "bf16", "train", quantize="nf4"),
                ]
            continue
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


def _loaded(pipe: Any, spec: Any) -> Any:
    """The pipeline as the runner's cache holds it (what quantizes it and owns adapters)."""
    from gpu_runner.families import family_of_pipeline
    from gpu_runner.pipelines import LoadedPipeline, estimate_pipeline_bytes

    return LoadedPipeline(
        spec=spec,
        pipe=pipe,
        family=family_of_pipeline(pipe).variant_of(pipe),  # type: ignore[arg-type]
        model_hash="0" * 64,
        nbytes=estimate_pipeline_bytes(pipe),
        scheduler_config=dict(pipe.scheduler.config),
    )


def train_row(row: Row, pipe: Any, device: str, steps: int) -> dict[str, Any]:
    from gpu_runner.families import get_family
    from gpu_runner.pipelines import BaseModelSpec
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
        quantize=row.quantize,
        # The family's own layers, as the runner's training job sets them.
        target_modules=list(get_family(row.family).lora_targets),
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
        quantize=row.quantize,
    )
    # As the runner's training job: the cached pipeline quantizes its denoiser in place.
    loaded = _loaded(pipe, BaseModelSpec("bench", "bench"))
    t0 = time.perf_counter()
    loaded.quantize_denoiser(row.quantize)
    quantize_s = time.perf_counter() - t0
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
    resident = torch.cuda.memory_allocated() / 2**20  # the weights, after quantization
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
                adapters=loaded.adapters,
            )
    except TrainingError as exc:
        if "out of GPU memory" not in str(exc):
            raise
        return {"error": "out of memory", "estimate": estimate}
    # Steps 2 .. N-1: skips the first step's warm-up and the last step's validation.
    timed = len(stamps) - 2
    rate = timed / (stamps[-2] - stamps[0]) if timed > 0 else float("nan")
    job = max(peaks["setup"], _peak_mib())  # the whole run, final samples and export too
    return {
        "steps_per_s": rate,
        "resident": resident,
        "peak": peaks["steps"],
        "job_peak": job,
        "estimate": estimate,
        "quantize_s": quantize_s,
    }


def _generation_settings(family: str) -> tuple[int, str, float]:
    """Steps, sampler and CFG: SD's as earlier runs of this bench (comparable with them),
    FLUX's its family's defaults (what an /imagine there costs)."""
    if family in FLUX:
        defaults = FAMILY_DEFAULTS[family]  # type: ignore[index]
        return defaults.steps, defaults.sampler, defaults.cfg
    return GEN_STEPS, "Euler", 7.0


def generate_row(row: Row, pipe: Any, repeats: int) -> dict[str, Any]:
    from gpu_runner.devices import DeviceChoice
    from gpu_runner.families import get_family
    from gpu_runner.generation import GenerationRequest, Generator
    from gpu_runner.pipelines import BaseModelSpec, PipelineCache
    from storage.families import generation_memory_mb

    family = get_family(row.family)
    choice = DeviceChoice(str(pipe.device), family.denoiser(pipe).dtype)
    cache = PipelineCache(
        [BaseModelSpec("bench", "bench")], choice, 1 << 40, loader=lambda s, _c: _loaded(pipe, s)
    )
    generator = Generator(cache)
    loaded = cache.get("bench")
    side = SIDE[row.family]
    steps, sampler, cfg = _generation_settings(row.family)
    request = GenerationRequest(
        PROMPT, base_model="bench", seed=1, steps=steps, cfg=cfg, width=side, height=side,
        sampler=sampler,
    )  # fmt: skip

    def runner() -> None:
        generator.generate(request)

    def bare() -> None:
        # The Generator renders under inference_mode: the bare call does too (like for like),
        # with the arguments the Generator gives this family.
        with torch.inference_mode():
            pipe.scheduler = generator._scheduler(loaded, sampler)
            pipe(
                prompt=[PROMPT], num_inference_steps=steps, width=side, height=side,
                generator=[torch.Generator("cpu").manual_seed(1)], output_type="pil",
                **family.cfg_kwargs(cfg), **family.call_kwargs([""]),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=6, help="training steps per row (>= 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per side")
    parser.add_argument("--families", default=",".join(BENCH_FAMILIES))
    parser.add_argument("--precisions", default="bf16,fp16")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting rows after")
    parser.add_argument(
        "--count-params", action="store_true", help="count parameters on the meta device (no GPU)"
    )
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(BENCH_FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}: use {', '.join(BENCH_FAMILIES)}")
    if args.count_params:
        report_counts(count_params(tuple(families)))
        return 0
    if not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA GPU here (torch {torch.__version__}); nothing to measure")
        return 0
    if args.steps < 4:
        parser.error("--steps must be at least 4")
    warnings.filterwarnings("ignore")  # random weights: NaN-to-uint8 casts etc. are expected
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    from gpu_runner.devices import has_native_bf16, pin_device, resolve_device
    from gpu_runner.families import get_family
    from gpu_runner.generation import GenerationOutOfMemoryError
    from gpu_runner.training.quantize import QuantizationError

    choice = resolve_device(args.device)
    pin_device(choice)
    precisions = [p for p in args.precisions.split(",") if p]
    if "bf16" in precisions and not has_native_bf16(choice.device):
        precisions.remove("bf16")  # emulated bf16 is no figure a studio would run
    started = time.perf_counter()
    results: dict[Row, dict[str, Any]] = {}
    resident: tuple[str, Any] | None = None
    unbuildable: set[str] = set()
    build_s: dict[str, float] = {}
    for row in plan(families, precisions):
        if time.perf_counter() - started > args.budget_s:
            results[row] = {"error": "skipped (time budget)"}
            continue
        if row.family in unbuildable:
            results[row] = {"error": "out of memory building the model"}
            continue
        if resident is None or resident[0] != row.family:
            # The other family's weights go before this one's are built (`pipe` too holds them).
            resident = pipe = None
            _fresh_peak()
            t0 = time.perf_counter()
            try:
                resident = (
                    row.family,
                    build_pipeline(row.family, choice.device, _dtype(row.precision)),
                )
            except torch.OutOfMemoryError:
                unbuildable.add(row.family)
                results[row] = {"error": "out of memory building the model"}
                continue
            build_s[row.family] = time.perf_counter() - t0
        pipe = resident[1]
        if get_family(row.family).denoiser(pipe).dtype != _dtype(row.precision):
            pipe.to(dtype=_dtype(row.precision))  # in place: no second copy
        try:
            if row.kind == "generate":
                results[row] = generate_row(row, pipe, args.repeats)
            else:
                results[row] = train_row(row, pipe, choice.device, args.steps)
        except (torch.OutOfMemoryError, GenerationOutOfMemoryError):
            results[row] = {"error": "out of memory"}
        except QuantizationError as exc:
            results[row] = {"error": str(exc)}
        if row.quantize != "none":
            resident = None  # quantized in place: a later row builds the family afresh
        print(f"  {_label(row)}: done at {time.perf_counter() - started:.0f} s", flush=True)
    report(results, choice.device, build_s, time.perf_counter() - started)
    return 0


def _label(row: Row) -> str:
    if row.kind == "generate":
        return f"{row.family} {row.precision} generate"
    gc_ = "on" if row.checkpointing else "off"
    label = f"{row.family} {row.precision} train batch {row.batch} checkpointing {gc_}"
    return label if row.quantize == "none" else f"{label} quantize {row.quantize}"


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
    print(f"{'family':<11} {'prec':<5} {'quant':<5} {'batch':>5} {'ckpt':>4} {'steps/s':>8} "
          f"{'img/s':>6} {'weights':>8} {'steps MiB':>9} {'job MiB':>8} "
          f"{'estimate':>9}")  # fmt: skip
    for row, r in results.items():
        if row.kind != "train":
            continue
        head = f"{row.family:<11} {row.precision:<5} {row.quantize:<5} {row.batch:>5} " + (
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
            f"{r['resident']:>8.0f} {r['peak']:>9.0f} {r['job_peak']:>8.0f} {r['estimate']:>9}"
            + (f"  (quantized in {r['quantize_s']:.0f} s)" if row.quantize != "none" else "")
        )
    print(
        "(weights: resident at the row's start, after any quantization; steps MiB: peak over "
        "steps 2..N-1; job MiB: the whole run, set-up included)"
    )
    print(
        f"\nGeneration, family resolution, 1 image: SD {GEN_STEPS} Euler steps at CFG 7, FLUX "
        "its family's defaults"
    )
    print(f"{'family':<11} {'prec':<5} {'steps':>5} {'cfg':>4} {'runner s':>9} {'bare s':>7} "
          f"{'overhead':>9} {'peak MiB':>9} {'estimate':>9}")  # fmt: skip
    for row, r in results.items():
        if row.kind != "generate":
            continue
        steps, _, cfg = _generation_settings(row.family)
        head = f"{row.family:<11} {row.precision:<5} {steps:>5} {cfg:>4g}"
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        print(
            f"{head} {r['runner_s']:>9.2f} {r['bare_s']:>7.2f} {r['overhead']:>+8.1f}% "
            f"{r['peak']:>9.0f} {r['estimate']:>9}"
        )


if __name__ == "__main__":
    sys.exit(main())
