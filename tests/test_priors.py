"""Prior preservation: base-model images of the plain class join each training step."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from gpu_runner.training.priors import without_trigger

pytest_plugins = ("runner_fixtures",)


@pytest.mark.parametrize(
    ("caption", "plain"),
    [
        ("zxq, a red circle on a white background", "a red circle on a white background"),
        ("a red circle, ZXQ style", "a red circle, style"),
        ("zxq", ""),
        ("zxqs are not the trigger", "zxqs are not the trigger"),
    ],
)
def test_the_trigger_is_taken_out_of_prior_captions(caption: str, plain: str) -> None:
    assert without_trigger(caption, "zxq") == plain


@pytest.mark.runner
def test_prior_images_are_drawn_and_trained_on(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    from gpu_runner.training.config import make_config
    from gpu_runner.training.loop import train

    def run(weight: float, root: Path) -> Any:
        cfg = make_config(
            "lora", "sd15", "style", trigger="zxq", rank=4, alpha=4, prior_preservation=weight,
            **{**fast, "steps": 3, "checkpoint_every": 3, "validate_every": 3, "sample_seeds": [1]},
        )  # fmt: skip
        return train(
            cfg, demo_items, tiny_builders["sd15"](0), root / "o", checkpoint_dir=root / "c"
        )

    with_priors, without = run(1.0, tmp_path / "a"), run(0.0, tmp_path / "b")
    report = json.loads(with_priors.report.json.read_text())
    assert report["prior_images"] == report["train_images"] > 0
    assert json.loads(without.report.json.read_text())["prior_images"] == 0
    # Step 1 sees the same batch and noise either way; the prior term adds to its loss.
    assert with_priors.loss_history[0] > without.loss_history[0]


def test_prior_weight_is_bounded() -> None:
    from gpu_runner.training.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="prior_preservation"):
        make_config("lora", trigger="zxq", prior_preservation=5)


# Every family's tiny model (tests/runner_fixtures.py `tiny_builders`).
FAMILIES = ("sd15", "sdxl", "flux2-klein", "flux1", "qwenimage", "zimage")


def _tiny_name(family: Any) -> str:
    (name,) = family.tiny_builders
    return str(name)


@pytest.mark.runner
@pytest.mark.parametrize("name", FAMILIES)
def test_priors_train_in_the_layout_of_the_training_latents_on_every_family(
    name: str,
    tiny_builders: Any,
    demo_items: Any,
    fast: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from gpu_runner.families import get_family
    from gpu_runner.training import loop
    from gpu_runner.training.config import make_config
    from gpu_runner.training.dataset import split_indices

    family = get_family(name)
    drawn: list[Any] = []
    trained: list[torch.Size] = []
    draw, sample = loop.draw_priors, loop.sample_latents

    def record_draw(*args: Any, **kwargs: Any) -> Any:
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]

    def record_sample(*args: Any, **kwargs: Any) -> torch.Tensor:
        latents = sample(*args, **kwargs)
        trained.append(latents.shape)
        return latents

    monkeypatch.setattr(loop, "draw_priors", record_draw)
    monkeypatch.setattr(loop, "sample_latents", record_sample)
    cfg = make_config(
        "lora", name, "style", trigger="zxq", rank=4, alpha=4, prior_preservation=1.0,
        target_modules=list(family.lora_targets), base_model_name=_tiny_name(family),
        **{**fast, "steps": 2, "checkpoint_every": 2, "validate_every": 2, "sample_seeds": [1]},
    )  # fmt: skip
    result = loop.train(
        cfg, demo_items, tiny_builders[name](0), tmp_path / "o", checkpoint_dir=tmp_path / "c"
    )
    (priors,) = drawn
    # One prior per training image (a small set trains on every image).
    train_idx, _ = split_indices(len(demo_items), cfg.val_fraction, cfg.seed)
    assert len(priors) == len(train_idx)
    assert priors.latents.shape[1:] == trained[0][1:]
    assert torch.isfinite(priors.latents).all()
    assert len(result.loss_history) == 2 and all(map(math.isfinite, result.loss_history))


def _draw(pipe: Any, family: Any, captions: list[str], seed: int) -> Any:
    import torch

    from gpu_runner.training.priors import draw_priors
    from storage.families import defaults_for

    defaults = defaults_for(_tiny_name(family), family.name)
    return draw_priors(
        pipe, captions, "zxq", resolution=64, seed=seed, steps=2, sampler=defaults.sampler,
        cfg=defaults.cfg, device=torch.device("cpu"),
    )  # fmt: skip


def _generate(pipe: Any, family: Any, captions: list[str], seed: int) -> Any:
    """The priors' images as generation draws them (the family's CFG and call arguments),
    on the seeds `draw_priors` gives them, as pixels in 0-1."""
    import torch

    from storage.families import defaults_for

    defaults = defaults_for(_tiny_name(family), family.name)
    pipe.scheduler = family.make_scheduler(pipe.scheduler.config, defaults.sampler)
    gens = [torch.Generator("cpu").manual_seed(seed * 7919 + i) for i in range(len(captions))]
    return pipe(
        prompt=captions, num_inference_steps=2, height=64, width=64, generator=gens,
        output_type="np", **family.cfg_kwargs(defaults.cfg),
        **family.call_kwargs([""] * len(captions)),
    ).images  # fmt: skip


@pytest.mark.runner
@pytest.mark.parametrize("name", FAMILIES)
def test_prior_latents_are_what_the_pipeline_decodes_into_its_image_scaled_as_training_sees_it(
    name: str, tiny_builders: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from gpu_runner.families import get_family

    family = get_family(name)
    pipe = tiny_builders[name](0)
    priors = _draw(pipe, family, ["zxq, a red circle", "a blue square, zxq"], seed=3)
    assert priors.captions == ["a red circle", "a blue square"]  # as given, trigger removed
    handed: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def record(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        handed.append(z.detach().clone())
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", record)
    _generate(pipe, family, priors.captions, seed=3)
    (z,) = handed
    # The VAE latents of the pipeline's own image, scaled as a VAE-encoded training image.
    want = family.latent_scaler(pipe.vae)(z.float())
    torch.testing.assert_close(priors.latents, want, rtol=1e-4, atol=1e-5)


@pytest.mark.runner
def test_flux2_klein_prior_latents_decode_to_the_pipelines_own_image(tiny_builders: Any) -> None:
    """Undone as the pipeline undoes its latents (batch-norm statistics, then 2x2 patches
    back to VAE channels), the priors decode to the image output_type="np" gives."""
    import torch
    from diffusers import Flux2KleinPipeline

    from gpu_runner.families import get_family

    family = get_family("flux2-klein")
    pipe = tiny_builders["flux2-klein"](0)
    bn = pipe.vae.bn  # a trained VAE's statistics, not the fresh ones (0 and 1)
    gen = torch.Generator().manual_seed(0)
    bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
    bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
    priors = _draw(pipe, family, ["zxq, a red circle", "a blue square"], seed=5)
    images = _generate(pipe, family, priors.captions, seed=5)
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    z = Flux2KleinPipeline._unpatchify_latents(priors.latents * std + mean)
    with torch.no_grad():
        pixels = pipe.vae.decode(z, return_dict=False)[0]
    decoded = pipe.image_processor.postprocess(pixels, output_type="np")
    assert decoded.shape == images.shape == (2, 64, 64, 3)
    assert abs(decoded - images).max() < 1e-4
