"""The CUDA branches on the tiny models: mixed precision (bf16; fp16 with the grad scaler),
gradient checkpointing, the VAE's fp32 upcast, generation, device pinning and free memory.

Skipped, with the reason, where there is no CUDA GPU. On a GPU machine:
    .venv/bin/python -m pytest -m cuda tests/test_cuda.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytest_plugins = ("runner_fixtures",)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.runner,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]


def _native_bf16() -> bool:
    return torch.cuda.get_device_capability()[0] >= 8


PRECISIONS = [
    pytest.param("bf16", torch.bfloat16, id="bf16"),
    pytest.param("fp16", torch.float16, id="fp16-grad-scaler"),
]


def _cache(dtype: Any, *names: str) -> Any:
    from gpu_runner.devices import DeviceChoice
    from gpu_runner.pipelines import BaseModelSpec, PipelineCache

    specs = [BaseModelSpec(n, n) for n in names]
    return PipelineCache(specs, DeviceChoice("cuda", dtype), budget_bytes=1 << 34)


def _config(family: str, fast: dict[str, Any], **kw: Any) -> Any:
    from gpu_runner.training.config import make_config

    settings = {"steps": 6, "checkpoint_every": 3, "validate_every": 3, **fast, **kw}
    method = settings.pop("method", "lora")
    if method != "textual_inversion":
        settings.setdefault("rank", 4)
    return make_config(method, family, "style", trigger="zxqtok", **settings)


def _train(config: Any, pipe: Any, items: Any, root: Path, watch: Any = None) -> Any:
    from gpu_runner.training.loop import train

    return train(
        config,
        items,
        pipe,
        root / "out",
        checkpoint_dir=root / "ckpt",
        device="cuda",
        progress=watch,
    )


def _report(result: Any) -> dict[str, Any]:
    return json.loads(result.report.json.read_text())


def test_auto_precision_is_bf16_exactly_where_the_gpu_has_it() -> None:
    from gpu_runner.devices import resolve_device
    from gpu_runner.training.precision import choose_precision

    choice = resolve_device("cuda")
    precision = choose_precision(torch.device("cuda"), "auto")
    expected = torch.bfloat16 if _native_bf16() else torch.float16
    assert choice.dtype == expected and precision.autocast_dtype == expected
    assert precision.use_grad_scaler is (expected == torch.float16)


@pytest.mark.parametrize(("setting", "dtype"), PRECISIONS)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_trains_in_mixed_precision_with_checkpointing(
    setting: str,
    dtype: Any,
    family: str,
    fast: dict[str, Any],
    demo_items: list[tuple[Any, str]],
    tmp_path: Path,
) -> None:
    """Weights in the runner's dtype on the GPU, autocast, the fp16 grad scaler, the UNet's
    gradient checkpointing on while training and off afterwards."""
    from gpu_runner.training.checkpoint import latest_checkpoint, load_checkpoint

    if dtype == torch.bfloat16 and not _native_bf16():
        pytest.skip("this GPU has no native bf16")
    loaded = _cache(dtype, f"tiny-{family}").get(f"tiny-{family}")
    unet = loaded.pipe.unet
    seen: list[bool] = []
    config = _config(family, fast, mixed_precision=setting, gradient_checkpointing=True)
    result = _train(
        config,
        demo_items,
        loaded.pipe,
        tmp_path,
        watch=lambda *_: seen.append(unet.is_gradient_checkpointing),
    )
    assert all(math.isfinite(x) for x in result.loss_history) and len(result.loss_history) == 6
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    assert _report(result)["precision"] == str(dtype).removeprefix("torch.")
    assert seen and all(seen) and not unet.is_gradient_checkpointing
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
    assert bool(state["scaler"]) is (setting == "fp16")  # the scaler's state is checkpointed
    assert unet.dtype == dtype  # the warm pipeline is handed back in its dtype


def test_gradient_checkpointing_does_not_change_the_losses(
    fast: dict[str, Any], demo_items: list[tuple[Any, str]], tmp_path: Path
) -> None:
    runs = []
    for checkpointing in (False, True):
        loaded = _cache(torch.float32, "tiny-sd15").get("tiny-sd15")
        config = _config("sd15", fast, mixed_precision="no", gradient_checkpointing=checkpointing)
        runs.append(_train(config, demo_items, loaded.pipe, tmp_path / str(checkpointing)))
    plain, checkpointed = (r.loss_history for r in runs)
    assert plain == pytest.approx(checkpointed, rel=1e-3, abs=1e-5)


def test_fp16_vae_that_asks_for_it_encodes_in_fp32(
    fast: dict[str, Any], demo_items: list[tuple[Any, str]], tmp_path: Path
) -> None:
    """SDXL's VAE overflows in fp16 (force_upcast): training encodes in fp32 and gives the
    VAE back in fp16; generation on the same pipeline decodes finite images."""
    from gpu_runner.generation import GenerationRequest, Generator

    cache = _cache(torch.float16, "tiny-sdxl")
    loaded = cache.get("tiny-sdxl")
    loaded.pipe.vae.register_to_config(force_upcast=True)
    config = _config("sdxl", fast, mixed_precision="fp16")
    result = _train(config, demo_items, loaded.pipe, tmp_path)
    assert all(math.isfinite(x) for x in result.loss_history)
    assert loaded.pipe.vae.dtype == torch.float16
    out = Generator(cache).generate(
        GenerationRequest("a red cat", base_model="tiny-sdxl", seed=1, steps=4, width=64, height=64)
    )
    pixels = _pixels(out.images[0])
    assert pixels.std() > 0  # NaN latents decode to a flat black image


@pytest.mark.parametrize(("setting", "dtype"), PRECISIONS)
def test_generation_on_the_gpu(setting: str, dtype: Any) -> None:
    import numpy as np

    from gpu_runner.generation import GenerationRequest, Generator

    if dtype == torch.bfloat16 and not _native_bf16():
        pytest.skip("this GPU has no native bf16")
    generator = Generator(_cache(dtype, "tiny-sd15", "tiny-sdxl"))
    for base in ("tiny-sd15", "tiny-sdxl"):
        request = GenerationRequest(
            "a red cat", base_model=base, seed=3, steps=4, width=64, height=64, count=2
        )
        first, again = generator.generate(request), generator.generate(request)
        assert len(first.images) == 2
        pixels = _pixels(first.images[0])
        assert pixels.std() > 0  # not a flat (black or NaN-turned-black) image
        assert np.array_equal(pixels, _pixels(again.images[0]))  # the seed holds on the GPU


def _pixels(image: Any) -> Any:
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"), dtype=np.float32)


def test_textual_inversion_on_the_gpu_checkpoints_its_text_encoders(
    fast: dict[str, Any], demo_items: list[tuple[Any, str]], tmp_path: Path
) -> None:
    from gpu_runner.training.textual_inversion import attach_token

    loaded = _cache(torch.float16, "tiny-sdxl").get("tiny-sdxl")
    tuned, token = attach_token(loaded.pipe, "zxqprobe", "style", 1)  # defaults on CUDA
    for encoder in (tuned.text_encoder, tuned.text_encoder_2):
        assert any(getattr(m, "gradient_checkpointing", False) for m in encoder.modules())
    token.remove_hooks()
    config = _config("sdxl", fast, method="textual_inversion", mixed_precision="fp16")
    result = _train(config, demo_items, loaded.pipe, tmp_path)
    assert all(math.isfinite(x) for x in result.loss_history)
    assert result.embedding_path is not None and result.embedding_path.is_file()


def test_runner_pins_its_gpu_and_claims_by_free_memory(
    tmp_path: Path, sqlite_template: Path
) -> None:
    from gpu_runner.services import open_services
    from storage.settings import load_settings

    data = tmp_path / "data"
    data.mkdir()
    (data / "atelier.db").write_bytes(sqlite_template.read_bytes())
    last = torch.cuda.device_count() - 1
    services = open_services(load_settings(data_dir=data, device=f"cuda:{last}"))
    assert torch.cuda.current_device() == last
    free, total = torch.cuda.mem_get_info(last)
    cached = torch.cuda.memory_reserved(last) - torch.cuda.memory_allocated(last)
    assert services.memory_mb <= total >> 20
    assert abs(services.memory_mb - ((free + cached) >> 20)) < 64  # free now, not the total
    services.db.dispose()


def test_text_encoders_wait_in_cpu_memory_while_a_lora_trains_on_cached_text(
    fast: dict[str, Any], demo_items: list[tuple[Any, str]], tmp_path: Path
) -> None:
    """Off the card during the steps, back for the checkpoint samples and afterwards."""
    from gpu_runner.training.text_encoders import text_encoders

    loaded = _cache(torch.float32, "tiny-sdxl").get("tiny-sdxl")
    encoders = text_encoders(loaded.pipe)
    where: list[set[str]] = []
    config = _config("sdxl", fast, checkpoint_every=3)
    result = _train(
        config, demo_items, loaded.pipe, tmp_path,
        watch=lambda *_: where.append({next(e.parameters()).device.type for e in encoders}),
    )  # fmt: skip
    assert len(encoders) == 2 and where and all(w == {"cpu"} for w in where)
    assert result.sample_images  # the step-3 samples encoded their prompts on the GPU
    assert {next(e.parameters()).device.type for e in encoders} == {"cuda"}
