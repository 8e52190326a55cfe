"""Base models: built-in, diffusers folder, single file, hub cache; the warm-pipeline LRU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ("generation_fixtures",)
pytestmark = pytest.mark.runner


def _same_weights(a: Any, b: Any) -> bool:
    import torch

    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        if set(sa) != set(sb) or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def test_builtin_models_load_with_family_and_stable_hash(cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelSpec, load_pipeline

    sd15 = load_pipeline(BaseModelSpec("tiny", "tiny-sd15"), cpu_choice)
    again = load_pipeline(BaseModelSpec("tiny-again", "tiny-sd15"), cpu_choice)
    xl = load_pipeline(BaseModelSpec("xl", "tiny-sdxl"), cpu_choice)
    assert (sd15.family, xl.family) == ("sd15", "sdxl")
    assert sd15.model_hash == again.model_hash != xl.model_hash
    assert len(sd15.short_hash) == 10
    assert sd15.nbytes > 1_000_000
    assert len(xl.tokenizers) == 2


def test_diffusers_folder_round_trip(tmp_path: Path, tiny_sd15: Any, cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelSpec, load_pipeline

    tiny_sd15.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(BaseModelSpec("folder", str(tmp_path / "model")), cpu_choice)
    assert loaded.spec.kind == "folder"
    assert loaded.family == "sd15"
    assert _same_weights(loaded.pipe, tiny_sd15)
    # The hash follows the weight files: same folder -> same hash.
    again = load_pipeline(BaseModelSpec("folder2", str(tmp_path / "model")), cpu_choice)
    assert again.model_hash == loaded.model_hash


def test_single_file_round_trip(
    sd15_single_file: tuple[Path, Path], tiny_sd15: Any, cpu_choice: Any
) -> None:
    from gpu_runner.lora_import import file_sha256
    from gpu_runner.pipelines import BaseModelSpec, load_pipeline

    ckpt, config = sd15_single_file
    spec = BaseModelSpec.from_config("single", {"source": str(ckpt), "config": str(config)})
    loaded = load_pipeline(spec, cpu_choice)
    assert spec.kind == "single_file"
    assert loaded.family == "sd15"
    assert _same_weights(loaded.pipe, tiny_sd15)
    # Same as A1111's "Model hash": sha256 of the file.
    assert loaded.model_hash == file_sha256(ckpt)


def test_single_file_needs_a_config_folder(
    sd15_single_file: tuple[Path, Path], cpu_choice: Any
) -> None:
    from gpu_runner.pipelines import BaseModelLoadError, BaseModelSpec, load_pipeline

    ckpt, _ = sd15_single_file
    with pytest.raises(BaseModelLoadError, match="set `config` to a local diffusers folder"):
        load_pipeline(BaseModelSpec("single", str(ckpt)), cpu_choice)


def test_pickle_checkpoint_is_refused_as_base(tmp_path: Path, cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelLoadError, BaseModelSpec, load_pipeline

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04junk")
    with pytest.raises(BaseModelLoadError, match="can run arbitrary code"):
        load_pipeline(BaseModelSpec("old", str(ckpt), config=str(tmp_path)), cpu_choice)


def test_uncached_hub_id_says_how_to_fetch(cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelLoadError, BaseModelSpec, load_pipeline

    spec = BaseModelSpec("hub", "atelier-tests/never-downloaded-model")
    assert spec.kind == "hub"
    with pytest.raises(
        BaseModelLoadError, match="hf download atelier-tests/never-downloaded-model"
    ):
        load_pipeline(spec, cpu_choice)


def test_folder_without_model_index_is_explained(tmp_path: Path, cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelLoadError, BaseModelSpec, load_pipeline

    with pytest.raises(BaseModelLoadError, match=r"no model_index\.json"):
        load_pipeline(BaseModelSpec("empty", str(tmp_path)), cpu_choice)


def test_configured_family_must_match(cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelLoadError, BaseModelSpec, load_pipeline

    spec = BaseModelSpec.from_config("wrong", {"source": "tiny-sd15", "family": "sdxl"})
    with pytest.raises(BaseModelLoadError, match=r"configured as SDXL but loads as SD1\.5"):
        load_pipeline(spec, cpu_choice)


def test_spec_errors_are_clear() -> None:
    from gpu_runner.pipelines import BaseModelError, BaseModelSpec

    with pytest.raises(BaseModelError, match="family 'sd3'"):
        BaseModelSpec.from_config("x", {"source": "tiny-sd15", "family": "sd3"})
    with pytest.raises(BaseModelError, match="not a built-in model"):
        _ = BaseModelSpec("x", "no such thing").kind


def test_unknown_base_model_names_configured_ones(cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelSpec, PipelineCache, UnknownBaseModelError

    cache = PipelineCache([BaseModelSpec("tiny-sd15", "tiny-sd15")], cpu_choice, budget_bytes=1)
    with pytest.raises(UnknownBaseModelError, match=r"unknown base model 'sdxl-real'.*tiny-sd15"):
        cache.get("sdxl-real")


def test_cache_keeps_warm_and_evicts_least_recently_used(cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelSpec, PipelineCache

    specs = [
        BaseModelSpec("a", "tiny-sd15"),
        BaseModelSpec("b", "tiny-sdxl"),
        BaseModelSpec("c", "tiny-sd15"),
    ]
    probe = PipelineCache(specs, cpu_choice, budget_bytes=10**12)
    size_a, size_b = probe.get("a").nbytes, probe.get("b").nbytes
    # Room for a and b, but not for all three.
    cache = PipelineCache(specs, cpu_choice, budget_bytes=size_a + size_b + size_a // 2)
    first_a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is first_a  # warm: no reload
    cache.get("c")  # b is least recently used now, so b goes, not a
    assert cache.loaded_names() == ["a", "c"]
    assert cache.used_bytes <= cache.budget_bytes
    assert cache.get("a") is first_a


def test_model_larger_than_budget_still_loads_alone(cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelSpec, PipelineCache

    cache = PipelineCache(
        [BaseModelSpec("a", "tiny-sd15"), BaseModelSpec("b", "tiny-sdxl")],
        cpu_choice,
        budget_bytes=1,
    )
    cache.get("a")
    cache.get("b")
    assert cache.loaded_names() == ["b"]


def test_unsupported_pipeline_class_is_named(tmp_path: Path, cpu_choice: Any) -> None:
    from gpu_runner.pipelines import BaseModelLoadError, BaseModelSpec, load_pipeline

    # FluxPipeline was the example until FLUX.1 became a family; SD3 is none.
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(
        BaseModelLoadError, match=r"is a StableDiffusion3Pipeline; Atelier runs SD1\.5/SD2"
    ):
        load_pipeline(BaseModelSpec("sd3", str(tmp_path)), cpu_choice)


# --- devices -------------------------------------------------------------------------------


def test_device_choice_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from gpu_runner.devices import DeviceError, pick_device, resolve_device

    monkeypatch.delenv("ATELIER_DEVICE", raising=False)
    monkeypatch.delenv("ATELIER_DTYPE", raising=False)
    assert resolve_device("cpu") == resolve_device("CPU")
    assert resolve_device("cpu").dtype == torch.float32
    assert resolve_device("cpu", "bf16").dtype == torch.bfloat16
    monkeypatch.setenv("ATELIER_DEVICE", "cpu")
    assert pick_device() == "cpu"
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        pick_device("tpu")
    with pytest.raises(DeviceError, match="unknown dtype 'int4'"):
        resolve_device("cpu", "int4")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU; use 'cpu'"):
            pick_device("cuda")
        assert pick_device("auto") in ("cpu", "mps")


def test_out_of_memory_is_recognised() -> None:
    import torch

    from gpu_runner.devices import is_out_of_memory

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
