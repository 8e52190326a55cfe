"""A DoRA style renders in Atelier as trained, and its kohya file renders the same under
ComfyUI's rule for `dora_scale` (comfy/weight_adapter/base.py `weight_decompose`)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures", "generation_fixtures")
pytestmark = pytest.mark.runner
torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from gpu_runner.generation import GenerationRequest, Generator  # noqa: E402
from gpu_runner.pipelines import BaseModelSpec, PipelineCache  # noqa: E402
from gpu_runner.prompts import AdapterInfo, AdapterUse  # noqa: E402
from gpu_runner.training.config import make_config  # noqa: E402
from gpu_runner.training.loop import train  # noqa: E402

REQUEST: dict[str, Any] = {"steps": 4, "width": 64, "height": 64, "cfg": 5.0, "seed": 7}


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _render(pipe: Any, prompt: str) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(REQUEST["seed"])
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True
    )
    out = pipe(
        prompt, num_inference_steps=REQUEST["steps"], guidance_scale=REQUEST["cfg"],
        width=64, height=64, generator=gen, output_type="np",
    )  # fmt: skip
    return np.rint(out.images[0] * 255).astype(int)


def comfy_weight(weight: Any, up: Any, down: Any, alpha: float, dora_scale: Any) -> Any:
    """ComfyUI's DoRA rule at strength 1, in our words: the LoRA difference (up times down,
    both flattened past their first axis and reshaped to the weight, so conv kernels too;
    scaled by alpha / rank) is added; a dora_scale as long as the output dimension rescales
    each output channel by dora_scale / (norm of that channel of the ORIGINAL weight + eps),
    otherwise each column by dora_scale / (column norm of the merged weight + eps)."""
    weight = weight.float()
    diff = (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape)
    merged = weight + diff * (alpha / down.shape[0])
    eps = torch.finfo(torch.float32).eps
    if dora_scale.shape[0] == merged.shape[0]:
        norm = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = merged.norm(dim=0, keepdim=True)
    return merged * (dora_scale.float() / (norm + eps))


# Attention only (the SD presets) and LoCon (conv, ff and proj too, as toy-sd15 trains).
TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "locon": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
              "ff.net.2", "conv1", "conv2"],
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(TARGETS))
def trained_dora(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    demo_items: Any,
    tiny_builders: Any,
) -> Any:
    root = tmp_path_factory.mktemp("dora")
    config = make_config(
        "dora", "sd15", "style", trigger="zxdora", rank=4, alpha=4, steps=40,
        target_modules=TARGETS[request.param],
        resolution=64, batch_size=4, learning_rate=1e-2, warmup_steps=0, sample_steps=2,
        sample_seeds=[1], checkpoint_every=40, validate_every=40, output_name="zxdora",
    )  # fmt: skip
    return train(
        config, demo_items, tiny_builders["sd15"](0), root / "out", checkpoint_dir=root / "c"
    )


def test_atelier_renders_dora_as_the_diffusers_file_does(
    trained_dora: Any, cpu_choice: Any, tiny_builders: Any
) -> None:
    generator = Generator(PipelineCache([BaseModelSpec("tiny-sd15", "tiny-sd15")], cpu_choice))
    kohya, diffusers_file = str(trained_dora.kohya_path), str(trained_dora.diffusers_path)
    style = AdapterInfo(name="d", path=kohya, trigger="zxdora", render_path=diffusers_file)
    prompt = "zxdora red and blue stripes"
    atelier = _pixels(
        generator.generate(GenerationRequest(prompt, adapters=(AdapterUse(style),), **REQUEST))
        .images[0]
        .png
    )

    reference = tiny_builders["sd15"](0)
    reference.load_lora_weights(load_file(diffusers_file), adapter_name="dora_ref")
    as_trained = _render(reference, prompt)
    assert np.abs(atelier - as_trained).max() <= 1

    # diffusers drops dora_scale from kohya files: loading that file alone loses DoRA.
    plain = tiny_builders["sd15"](0)
    plain.load_lora_weights(load_file(kohya), adapter_name="kohya_only")
    assert np.abs(_render(plain, prompt) - as_trained).max() > 3


def test_kohya_dora_file_renders_the_same_under_comfyui_rule(
    trained_dora: Any, tiny_builders: Any
) -> None:
    state = load_file(str(trained_dora.kohya_path))
    prompt = "zxdora red and blue stripes"
    reference = tiny_builders["sd15"](0)
    reference.load_lora_weights(
        load_file(str(trained_dora.diffusers_path)), adapter_name="dora_ref"
    )
    as_trained = _render(reference, prompt)

    comfy = tiny_builders["sd15"](0)
    by_kohya_name = {
        "lora_unet_" + name.replace(".", "_"): module for name, module in comfy.unet.named_modules()
    }
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert modules and all(m in by_kohya_name for m in modules)  # every key maps: none left
    with torch.no_grad():
        for module in modules:
            layer = by_kohya_name[module]
            dora = state[f"{module}.dora_scale"]
            # The output axis, as peft trains: (out, 1), or (out, 1, 1, 1) for a conv.
            assert dora.shape == (layer.weight.shape[0], *[1] * (layer.weight.dim() - 1))
            layer.weight.copy_(
                comfy_weight(
                    layer.weight,
                    state[f"{module}.lora_up.weight"],
                    state[f"{module}.lora_down.weight"],
                    float(state[f"{module}.alpha"]),
                    dora,
                )
            )
    assert np.abs(_render(comfy, prompt) - as_trained).max() <= 1
