"""bench/gpu.py's GPU-free half: every family's full-size pipeline assembles from its
published configs (on the meta device: shapes, no memory), and the parameters it counts
are the weight figures storage.families claims devices by."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from storage.families import DENOISER_MB, WEIGHTS_MB

pytestmark = pytest.mark.runner
pytest.importorskip("diffusers")

BENCH = Path(__file__).parents[1] / "bench" / "gpu.py"


def _bench() -> ModuleType:
    # bench/ is no package: load the script as a module, as `python bench/gpu.py` runs it.
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _bench()


def test_count_params_agrees_with_the_weight_tables(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpu_runner.families import get_family

    counts: dict[str, dict[str, int]] = bench.count_params()
    assert set(counts) == {"sd15", "sdxl", "flux2-klein", "flux1"}
    bench.report_counts(counts)
    printed = capsys.readouterr().out
    for family, parts in counts.items():
        assert f"{family:<12} all" in printed
        weights = bench.bf16_mib(sum(parts.values()))
        denoiser = bench.bf16_mib(parts[get_family(family).denoiser_attr])
        assert abs(WEIGHTS_MB[family] - weights) / weights < 0.05, (family, weights)  # type: ignore[index]
        assert abs(DENOISER_MB[family] - denoiser) / denoiser < 0.05, (family, denoiser)  # type: ignore[index]


def test_the_mode_runs_from_the_command_line_without_a_gpu(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--count-params", "--families", "sd15"]) == 0
    assert "sd15         unet" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--count-params", "--families", "qwenimage"])  # no full-size build


def test_the_flux_pipelines_are_the_published_sizes(bench: ModuleType) -> None:
    from gpu_runner.families import family_of_pipeline

    for family, text_layers in (("flux2-klein", 36), ("flux1", 24)):
        pipe: Any = bench.build_pipeline(family, "meta", bench.torch.bfloat16)
        assert family_of_pipeline(pipe).name == family  # the runner takes it as that family
        encoder = pipe.text_encoder if family == "flux2-klein" else pipe.text_encoder_2
        assert encoder.config.num_hidden_layers == text_layers
        assert not encoder.training  # as from_pretrained: no dropout in the prompt
        assert pipe.transformer.dtype == bench.torch.bfloat16
        # The tokenizers are small, but prompts pad to the real 512 tokens.
        tokenizer = pipe.tokenizer if family == "flux2-klein" else pipe.tokenizer_2
        ids = tokenizer(
            bench.PROMPT, padding="max_length", max_length=512, truncation=True
        ).input_ids
        assert len(ids) == 512 and max(ids) < encoder.config.vocab_size


def test_flux_rows_come_first_in_bf16_with_the_quantized_run_last(bench: ModuleType) -> None:
    rows = bench.plan(["flux2-klein", "sd15"], ["bf16", "fp16"])
    klein = [r for r in rows if r.family == "flux2-klein"]
    assert rows[: len(klein)] == klein
    assert [(r.kind, r.precision, r.quantize) for r in klein] == [
        ("generate", "bf16", "none"),
        ("train", "bf16", "none"),
        ("train", "bf16", "nf4"),
    ]
    assert not bench.plan(["flux1"], ["fp16"])  # no fp16 FLUX figures
