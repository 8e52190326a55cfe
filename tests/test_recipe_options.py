"""The recipe options `/style train` takes, each doing what it says: flip (mirrored copies,
cached), offset noise, gradient accumulation, the optimizers (Prodigy without a learning
rate; 8-bit AdamW only on CUDA), and the LoRA layer sets every family exports; chat refuses
bad values with the range or the choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

pytest_plugins = ("runner_fixtures", "bot_fixtures")


def _config(fast: dict[str, Any], **settings: Any) -> Any:
    from gpu_runner.training.config import make_config

    values = {**fast, "steps": 4, "checkpoint_every": 4, "validate_every": 4, "sample_seeds": [1]}
    return make_config(
        "lora", "sd15", "style", trigger="zxq", rank=4, alpha=4, **{**values, **settings}
    )


def test_offset_noise_moves_each_channels_mean_by_the_offset() -> None:
    import torch

    from gpu_runner.training.objective import offset_noise

    noise = torch.randn((64, 4, 64, 64), generator=torch.Generator().manual_seed(0))
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    # A channel's spatial mean spreads by 1/64 in plain noise, by ~0.1 with the offset.
    assert float(noise.mean((2, 3)).std()) < 0.03
    assert 0.08 < float(shifted.mean((2, 3)).std()) < 0.12
    # Within a channel the shift is one constant: the noise around it is the same noise.
    assert torch.allclose(shifted - shifted.mean((2, 3), keepdim=True),
                          noise - noise.mean((2, 3), keepdim=True), atol=1e-5)  # fmt: skip


@pytest.mark.runner
@pytest.mark.parametrize("family", ["sd15", "flux2-klein"])  # DDPM, flow matching
def test_a_timestep_range_trains_only_the_steps_inside_it(tiny_builders: Any, family: str) -> None:
    import torch

    from gpu_runner.families import get_family
    from gpu_runner.training.config import make_config

    pipe = tiny_builders[family](0)

    def drawn(**settings: Any) -> Any:
        cfg = make_config("lora", family, "style", trigger="zxq", **settings)
        objective = get_family(family).objective(pipe, cfg, torch.device("cpu"))
        return objective.sample_timesteps(4000, torch.Generator().manual_seed(0))

    everywhere, low = drawn(), drawn(max_timestep=700)
    assert float(everywhere.max()) > 950 and float(everywhere.min()) < 50
    assert float(low.max()) <= 700 and float(low.max()) > 650 and float(low.min()) < 50
    middle = drawn(min_timestep=300, max_timestep=600)
    assert 300 <= float(middle.min()) < 320 and 580 < float(middle.max()) <= 600


@pytest.mark.runner
def test_flip_caches_both_orientations_and_trains_on_both(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    import torch

    from gpu_runner.adapter_state import AdapterState
    from gpu_runner.training import loop

    pipe = tiny_builders["sd15"](0)
    cfg = _config(fast, flip=True)
    trainer = loop._Trainer(
        cfg, demo_items, pipe, tmp_path / "o", tmp_path / "c", "cpu", AdapterState(pipe)
    )
    try:
        trainer._setup()
        data = trainer.data
        assert data is not None and data.mirrored_mean is not None
        # Twice the cached latents: each image and its mirror image.
        assert len(data.latent_mean) == len(data.mirrored_mean) == len(demo_items)  # type: ignore[arg-type]
        mirrored, _ = trainer.family.latent_dist(pipe.vae, data.stack([0]).flip(-1))
        torch.testing.assert_close(data.mirrored_mean[0], mirrored[0])
        assert not torch.allclose(data.mirrored_mean[0], data.latent_mean[0])  # type: ignore[index]
        # The steps draw both: some batches hold mirrored latents, some the originals.
        used: list[torch.Tensor] = []
        sample = loop.sample_latents
        loop.sample_latents = lambda mean, *a, **k: (used.append(mean), sample(mean, *a, **k))[1]  # type: ignore[assignment]
        try:
            for _ in range(4):
                trainer.train_step()
        finally:
            loop.sample_latents = sample  # type: ignore[assignment]
        rows = torch.cat(used)
        originals = torch.stack(data.latent_mean)  # type: ignore[arg-type]
        mirrors = torch.stack(data.mirrored_mean)

        def found(table: torch.Tensor) -> int:
            return sum(bool((table - row).abs().amax((1, 2, 3)).min() < 1e-6) for row in rows)

        assert found(originals) > 0 and found(mirrors) > 0
        assert found(originals) + found(mirrors) == len(rows)
    finally:
        trainer.cleanup()


@pytest.mark.runner
def test_accumulation_steps_once_per_micro_batches_and_the_header_says_the_recipe(
    tiny_builders: Any,
    demo_items: Any,
    fast: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors import safe_open

    from gpu_runner.training import loop
    from gpu_runner.training.dataset import BatchSampler

    batches: list[list[int]] = []
    draw = BatchSampler.next_batch
    monkeypatch.setattr(
        BatchSampler, "next_batch", lambda self: batches.append(draw(self)) or batches[-1]
    )
    cfg = _config(fast, steps=2, checkpoint_every=2, validate_every=2, gradient_accumulation=3,
                  noise_offset=0.05)  # fmt: skip
    result = loop.train(
        cfg, demo_items, tiny_builders["sd15"](0), tmp_path / "o", checkpoint_dir=tmp_path / "c"
    )
    assert len(result.loss_history) == 2  # two optimizer steps
    assert len(batches) == 6  # of three micro-batches each
    assert result.kohya_path is not None
    with safe_open(str(result.kohya_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_gradient_accumulation_steps"] == "3"
    assert meta["ss_noise_offset"] == "0.05"
    assert meta["ss_optimizer"] == "torch.optim.AdamW"


@pytest.mark.runner
def test_prodigy_trains_without_a_learning_rate(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    import math

    from safetensors import safe_open

    from gpu_runner.training import loop

    settings = {k: v for k, v in fast.items() if k != "learning_rate"}
    cfg = _config(settings, optimizer="prodigy", steps=30, validate_every=30, checkpoint_every=30)
    result = loop.train(
        cfg, demo_items, tiny_builders["sd15"](0), tmp_path / "o", checkpoint_dir=tmp_path / "c"
    )
    assert all(map(math.isfinite, result.loss_history))
    assert result.val_loss is not None and result.val_loss < result.base_val_loss
    with safe_open(str(result.kohya_path), "pt") as f:
        assert f.metadata()["ss_optimizer"] == "prodigyopt.Prodigy"


@pytest.mark.runner
def test_8bit_adamw_asks_for_cuda_and_names_what_runs_here(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    from gpu_runner.training import loop
    from gpu_runner.training.optimizers import OptimizerError

    with pytest.raises(OptimizerError, match=r"CUDA kernels.*train with optimizer=adamw"):
        loop.train(
            _config(fast, optimizer="adamw8bit"), demo_items, tiny_builders["sd15"](0),
            tmp_path / "o", checkpoint_dir=tmp_path / "c",
        )  # fmt: skip


FAMILIES = ("sd15", "sdxl", "flux2-klein", "flux1", "qwenimage", "zimage")


@pytest.mark.runner
@pytest.mark.parametrize("name", FAMILIES)
def test_every_layer_set_of_every_family_exports_every_trained_layer(
    name: str, tiny_builders: Any
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from gpu_runner.families import get_family
    from storage.families import LAYER_SETS_OF

    family = get_family(name)
    assert tuple(family.lora_layer_sets) == LAYER_SETS_OF[name]  # type: ignore[index]
    sizes = []
    for layers, targets in family.lora_layer_sets.items():
        denoiser = family.denoiser(tiny_builders[name](0))
        denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
        state = get_peft_model_state_dict(denoiser)
        trained = {k.split(".lora_")[0] for k in state}
        kohya = family.kohya_state(state, 4.0)
        downs = [k for k in kohya if k.endswith(".lora_down.weight")]
        # Every trained layer is in the file (fused ones share one down weight).
        rows = sum(kohya[k].shape[0] for k in downs)
        assert rows == 4 * len(trained), (layers, rows, len(trained))
        assert all(torch.isfinite(v).all() for v in kohya.values())
        sizes.append(len(trained))
        if layers == "locon":  # kohya's LoCon names: the ResNet convolutions, 4-D
            convs = [k for k in downs if "_resnets_" in k and k.split(".")[0].endswith("conv1")]
            assert convs and all(kohya[k].ndim == 4 for k in convs)
    assert sizes == sorted(set(sizes))  # each set trains more layers than the one before


def test_chat_takes_the_recipe_options_and_refuses_bad_ones(rig: Any) -> None:
    from bot_fixtures import approved_style as approved_chat_style

    from storage.models import TrainingRun

    approved_chat_style(rig)
    cases = {
        "flip": ("sideways", "Flip must be one of"),
        "noise_offset": ("0.5", "between 0 and 0.2"),
        "accumulate": ("40", "between 1 and 16"),
        "optimizer": ("sgd", "Optimizer must be one of adamw, adamw8bit, prodigy"),
        "layers": ("everything", "Layers must be one of attention, full, locon"),
        "preserve": ("9", "between 0 and 4"),
        "max_timestep": ("0", "between 1 and 1000"),
    }
    for option, (value, told) in cases.items():
        assert told in rig.text("style train", {"name": "ink", option: value}), option
    prodigy = rig.text("style train", {"name": "ink", "optimizer": "prodigy", "lr": "1e-4"})
    assert "Prodigy sets its own learning rate; leave lr out" in prodigy
    assert rig.jobs() == []
    asked = {"flip": "off", "noise_offset": "0.05", "accumulate": "2", "optimizer": "prodigy",
             "layers": "locon", "preserve": "0.5", "max_timestep": "700"}  # fmt: skip
    assert "Training **ink**" in rig.text("style train", {"name": "ink", **asked})
    with rig.db.session() as s:
        (run,) = s.scalars(select(TrainingRun))
    assert run.params["flip"] is False and run.params["noise_offset"] == 0.05
    assert run.params["gradient_accumulation"] == 2 and run.params["layers"] == "locon"
    assert run.params["optimizer"] == "prodigy" and "learning_rate" not in run.params
    assert run.params["output_preservation"] == 0.5 and run.params["max_timestep"] == 700
    # A textual inversion's token starts from a word the person names; other methods have no
    # token, and a phrase or a number is not a word.
    rig.clock.advance(60)  # past the per-person command rate limit
    lora_init = rig.text("style train", {"name": "ink", "init_word": "sketch"})
    assert "init_word is the word a textual inversion's new token starts from" in lora_init
    phrase = rig.text("style train", {"name": "ink", "method": "ti", "init_word": "line art"})
    assert "'line art' must be one word of 1-32 letters" in phrase
    assert len(rig.jobs()) == 1
    rig.clock.advance(60)
    assert "Canceled job" in rig.text("cancel", {"job": str(rig.jobs()[0].id)})
    ti = {"name": "ink", "method": "ti", "init_word": "sketch"}
    assert "Training **ink**" in rig.text("style train", ti)
    with rig.db.session() as s:
        newest = s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())).first()
    assert newest.method == "textual_inversion" and newest.params["initializer_token"] == "sketch"
    # A transformer family has no convolutions for LoCon: said before anything is queued.
    rig.clock.advance(60)  # past the per-person command rate limit
    approved_chat_style(rig, "fx", "fxs", base="tiny-flux1")
    refused = rig.text("style train", {"name": "fx", "layers": "locon"})
    assert "FLUX.1 has no convolutions for layers=locon" in refused
    assert "use layers=attention or layers=full" in refused


def test_shuffled_tags_keep_the_first_ones_and_the_trigger_in_place() -> None:
    from storage.prompt_rules import shuffled_tags

    caption = "zxq, red, circle, white background, soft light"
    shuffled = shuffled_tags(caption, "zxq", 0, [0.9, 0.1, 0.5, 0.3, 0.2])
    assert shuffled == "zxq, red, soft light, white background, circle"
    # keep counts the caption's own tags, not the trigger's.
    kept_first = shuffled_tags(caption, "zxq", 1, [0.9, 0.9, 0.5, 0.3, 0.2])
    assert kept_first == "zxq, red, soft light, white background, circle"
    # The trigger's tag stays where it is wherever it stands; keep holds the first tags.
    assert (
        shuffled_tags("a red circle, zxq, on white", "zxq", 0, [0.9, 0.5, 0.1]).split(", ")[1]
        == "zxq"
    )
    kept = shuffled_tags("one, two, three, four", "zxq", 2, [0.0, 0.0, 0.9, 0.1])
    assert kept == "one, two, four, three"
    assert sorted(kept.split(", ")) == sorted(["one", "two", "three", "four"])


@pytest.mark.runner
def test_shuffled_captions_reach_the_text_encoder_in_new_orders(
    tiny_builders: Any, demo_items: Any, fast: dict[str, Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from gpu_runner.training import loop

    items = [(image, "red, stripes, disc, blue, soft") for image, _ in demo_items[:4]]
    seen: list[list[str]] = []
    encode = loop.encode_text

    def record(pipe: Any, prompts: list[str], *args: Any, **kwargs: Any) -> Any:
        seen.append(list(prompts))
        return encode(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(loop, "encode_text", record)
    cfg = _config(fast, caption_shuffle=True, keep_tags=1, steps=3)
    loop.train(cfg, items, tiny_builders["sd15"](0), tmp_path / "o", checkpoint_dir=tmp_path / "c")
    captions = {c for prompts in seen for c in prompts}
    original = "zxq, red, stripes, disc, blue, soft"  # the trigger prefixed, kohya-style
    assert original in captions  # validation reads them as written
    shuffled = captions - {original, ""}
    assert shuffled, captions
    for caption in shuffled:  # the trigger and the kept first tag stay first
        tags = caption.split(", ")
        assert tags[:2] == ["zxq", "red"] and sorted(tags) == sorted(original.split(", "))


def test_chat_refuses_steps_with_epochs(rig: Any) -> None:
    from bot_fixtures import approved_style as approved_chat_style

    approved_chat_style(rig)
    both = rig.text("style train", {"name": "ink", "steps": "100", "epochs": "3"})
    assert "Give steps or epochs, not both" in both and rig.jobs() == []


@pytest.mark.runner
def test_epochs_set_the_steps_from_the_images(
    db_url: str, tmp_path: Path, tiny_builders: Any
) -> None:
    from bot_fixtures import png_bytes
    from runner_fixtures import console_studio

    studio = console_studio(db_url, tmp_path)
    studio.approved_style("tiny-sd15", {f"p{n}.png": png_bytes(n) for n in range(1, 7)})
    studio.session.run_line("/style train ink epochs=3 accumulate=2")
    done = studio.work()
    # 6 images, batch 4 x 2 micro-batches a step: one step an epoch, three in all.
    assert "done, 3/3 steps" in done, done
