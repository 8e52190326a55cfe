"""One owner of adapter state: a generation after any training (finished, cancelled or
crashed) equals the same request made before it, byte for byte."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest_plugins = ("runner_fixtures", "generation_fixtures")
pytestmark = pytest.mark.runner
torch = pytest.importorskip("torch")

from gpu_runner.generation import GenerationRequest, Generator  # noqa: E402
from gpu_runner.pipelines import BaseModelSpec, PipelineCache  # noqa: E402
from gpu_runner.prompts import AdapterInfo  # noqa: E402
from gpu_runner.training.config import make_config  # noqa: E402
from gpu_runner.training.loop import train  # noqa: E402

FAST: dict[str, Any] = {"steps": 3, "width": 64, "height": 64, "cfg": 5.0}


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


@pytest.fixture
def warm(cpu_choice: Any) -> Generator:
    # Its own cache: this test trains on the warm pipeline.
    return Generator(PipelineCache([BaseModelSpec("tiny-sd15", "tiny-sd15")], cpu_choice))


def _train(generator: Generator, items: Any, root: Path, fast: dict[str, Any], **kw: Any) -> Any:
    loaded = generator.cache.get("tiny-sd15")
    config = make_config(
        "lora", "sd15", "style", trigger="zxq", rank=4, alpha=4,
        **{**fast, "steps": 4, "checkpoint_every": 2, "validate_every": 2, "sample_seeds": [1]},
    )  # fmt: skip
    return train(
        config,
        items,
        loaded.pipe,
        root / "out",
        checkpoint_dir=root / "ckpt",
        adapters=loaded.adapters,
        **kw,
    )


class _Crash(RuntimeError):
    pass


def _crash_at_step_three(step: int, total: int, loss: float, extras: dict[str, Any]) -> None:
    if step == 3:
        raise _Crash("the runner died mid-training")


@pytest.mark.parametrize("ending", ["finished", "cancelled", "crashed"])
def test_plain_generation_after_training_equals_the_one_before(
    warm: Generator,
    sd15_lora: Path,
    demo_items: Any,
    fast: dict[str, Any],
    tmp_path: Path,
    ending: str,
) -> None:
    ink = AdapterInfo(name="ink", path=str(sd15_lora), trigger="inkwash")
    plain_request = GenerationRequest("a red cat", seed=11, **FAST)
    styled = warm.generate(
        GenerationRequest.from_prompt("inkwash cat", {"inkwash": ink}, seed=11, **FAST)
    )
    plain_before = warm.generate(plain_request).images[0].png
    assert _max_diff(styled.images[0].png, plain_before) > 10  # the style shows at all

    if ending == "finished":
        result = _train(warm, demo_items, tmp_path, fast)
        assert not result.stopped
    elif ending == "cancelled":
        result = _train(
            warm, demo_items, tmp_path, fast, should_stop=iter([False, False, True]).__next__
        )
        assert result.stopped and result.final_step == 2
    else:
        with pytest.raises(_Crash):
            _train(warm, demo_items, tmp_path, fast, progress=_crash_at_step_three)

    plain_after = warm.generate(plain_request).images[0].png
    assert plain_after == plain_before
    # The style still renders as before, from the adapter kept loaded.
    styled_after = warm.generate(
        GenerationRequest.from_prompt("inkwash cat", {"inkwash": ink}, seed=11, **FAST)
    )
    assert styled_after.images[0].png == styled.images[0].png
    assert warm.cache.get("tiny-sd15").adapters.active == ((warm.adapter_name(ink), 1.0),)


def test_generation_served_mid_training_sees_no_training_adapter(
    warm: Generator, sd15_lora: Path, demo_items: Any, fast: dict[str, Any], tmp_path: Path
) -> None:
    ink = AdapterInfo(name="ink", path=str(sd15_lora), trigger="inkwash")
    plain_request = GenerationRequest("a red cat", seed=4, **FAST)
    styled_request = GenerationRequest.from_prompt("inkwash cat", {"inkwash": ink}, seed=4, **FAST)
    plain_before = warm.generate(plain_request).images[0].png
    styled_before = warm.generate(styled_request).images[0].png
    served: list[tuple[bytes, bytes]] = []

    def between(pause: Any, at_checkpoint: bool) -> None:
        with pause():
            served.append(
                (
                    warm.generate(plain_request).images[0].png,
                    warm.generate(styled_request).images[0].png,
                )
            )

    result = _train(warm, demo_items, tmp_path, fast, between_steps=between)
    assert not result.stopped and len(served) == 3  # between steps 1-2, 2-3, 3-4
    assert all(p == plain_before and s == styled_before for p, s in served)
    # Training went on with its own adapter after each pause: the LoRA learned something.
    assert result.val_loss is not None and result.val_loss < result.base_val_loss


def test_base_pass_predicts_as_the_base_and_leaves_the_training_adapter_trainable(
    tiny_builders: Any,
) -> None:
    from peft import LoraConfig

    from gpu_runner.adapter_state import AdapterState

    pipe = tiny_builders["sd15"](0)
    unet = pipe.unet
    gen = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    noisy = torch.randn((2, unet.config.in_channels, size, size), generator=gen)
    text = torch.randn((2, 5, unet.config.cross_attention_dim), generator=gen)
    t = torch.tensor([100, 700])

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return unet(noisy, t, encoder_hidden_states=text).sample

    base = predict()
    state = AdapterState(pipe)
    with pytest.raises(RuntimeError, match="no training adapter"), state.base_pass():
        pass
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"])
    params = state.start_training(config, "style_training", seed=0)
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the output
        for p in params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    trained = predict()
    assert (trained - base).abs().max() > 1e-3
    with state.base_pass():
        assert torch.equal(predict(), base)
    assert torch.equal(predict(), trained)
    assert all(p.requires_grad for p in params.values())
    state.end_training()
    assert torch.equal(predict(), base)
