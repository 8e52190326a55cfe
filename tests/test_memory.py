"""Device memory: the trained model stays loaded, warm models make room for training,
claims compare with free memory, estimates follow the job, TI shares the pipeline's
weights, and an out-of-memory message advises only what chat offers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from runner_fixtures import make_runner
from runner_seed import approved_style, enqueue_generate, enqueue_training, generate_payload

from storage.families import memory_needed_mb
from storage.job_payloads import JobKind
from storage.models import JobStatus, Style
from storage.settings import load_settings

pytest_plugins = ("runner_fixtures", "generation_fixtures", "simulated_gpus")


# --- the trained model is pinned ------------------------------------------------------------


def test_generation_at_a_checkpoint_never_evicts_the_model_in_training(
    data_dir: Path, tiny_builders: Any, demo_items: list[tuple[Any, str]]
) -> None:
    """Room for one warm model only: a generation on another model served at a checkpoint
    loads beside the training's model instead of evicting it, so nothing loads it twice."""
    from gpu_runner.services import open_services

    services = open_services(load_settings(data_dir=data_dir, device="cpu", model_cache_bytes=1))
    style_id = approved_style(services, demo_items)
    with services.db.session() as s:
        team_id = s.get(Style, style_id).team_id
    _, train_id = enqueue_training(services, style_id, steps=8, checkpoint_every=4)
    same_model = enqueue_generate(services, generate_payload(team_id, None, seed=1))
    other_model = enqueue_generate(
        services, generate_payload(team_id, None, base_model="tiny-sdxl", seed=2)
    )
    trained_on = services.models.get("tiny-sd15")
    job = services.queue.claim("test-runner", kinds=[JobKind.TRAIN])
    assert job is not None and job.id == train_id
    make_runner(services).run_job(job)  # serves both generations between its steps

    for job_id in (train_id, same_model, other_model):
        assert services.queue.get(job_id).status == JobStatus.SUCCEEDED, job_id
    training = services.queue.get(train_id)
    assert training.started_at < services.queue.get(other_model).finished_at < training.finished_at
    assert services.models.get("tiny-sd15") is trained_on  # never evicted, never reloaded
    assert services.models.pinned_names() == []  # released when the training ended


def _cache(cpu_choice: Any) -> Any:
    from gpu_runner.pipelines import BaseModelSpec, PipelineCache

    specs = [
        BaseModelSpec("trained", "tiny-sd15"),
        BaseModelSpec("old", "tiny-sdxl"),
        BaseModelSpec("recent", "tiny-sd15"),
    ]
    return PipelineCache(specs, cpu_choice, budget_bytes=1 << 40)


def test_warm_models_make_room_for_training_least_recent_first(cpu_choice: Any) -> None:
    """On a GPU whose free memory is what the warm models leave, training evicts the
    least recently used other model until it has what it needs, and never its own."""
    cache = _cache(cpu_choice)
    trained, old, recent = (cache.get(n) for n in ("trained", "old", "recent"))
    capacity = trained.nbytes + old.nbytes + recent.nbytes + 1000
    cache.free_bytes = lambda: capacity - cache.used_bytes  # the device's own accounting
    with cache.pinned("trained"):
        cache.get("trained")  # most recently used now: order is old, recent, trained
        assert cache.make_room(1000 + old.nbytes, keep="trained") == ["old"]
        assert cache.loaded_names() == ["recent", "trained"]
        # More than all of it: everything else goes, the pinned model stays.
        assert cache.make_room(capacity * 2, keep="trained") == ["recent"]
        assert cache.evict("trained") is False
        assert cache.loaded_names() == ["trained"]
    assert cache.evict("trained") is True  # unpinned when the block ends


def test_nothing_is_evicted_where_memory_has_no_limit(cpu_choice: Any) -> None:
    cache = _cache(cpu_choice)
    cache.get("old")
    with cache.pinned("trained"):
        assert cache.make_room(1 << 50, keep="trained") == []  # CPU: the OS pages
    assert cache.loaded_names() == ["old", "trained"]


# --- claims ------------------------------------------------------------------------------


def test_claims_compare_with_free_gpu_memory_read_at_each_claim(
    gpus: Any, data_dir: Path, tiny_builders: Any
) -> None:
    """A 24 GB card that another program fills to 18 GB takes a 4 GB job, not a 16 GB one;
    when that program exits, the next claim takes the big job."""
    from gpu_runner.__main__ import build_runner
    from gpu_runner.services import open_services

    machine = gpus([(8, 9)], total_gib=[24], free_gib=[6])
    services = open_services(load_settings(data_dir=data_dir, device="cuda"))
    big = services.queue.enqueue(JobKind.GENERATE, requester="a", min_memory_mb=16_000)
    small = services.queue.enqueue(JobKind.GENERATE, requester="b", min_memory_mb=4_000)
    runner = build_runner(services, [JobKind.GENERATE], "gpu-runner")
    assert services.memory_mb == 6 * 1024
    first = runner.claim()
    assert first is not None and first.id == small.id
    assert runner.claim() is None  # the 16 GB job waits for room
    machine.free[0] = 22 << 30  # the other program exited
    second = runner.claim()
    assert second is not None and second.id == big.id
    services.db.dispose()


# --- estimates ---------------------------------------------------------------------------


def test_estimates_follow_family_size_count_rank_and_method() -> None:
    def gen(base: str, **kw: Any) -> int:
        need = memory_needed_mb(JobKind.GENERATE, base, {}, **kw)
        assert need is not None
        return need

    def train(base: str, **kw: Any) -> int:
        need = memory_needed_mb(JobKind.TRAIN, base, {}, **kw)
        assert need is not None
        return need

    assert memory_needed_mb(JobKind.TRAIN, "tiny-sd15", {}) is None  # built-in: tiny
    assert memory_needed_mb(JobKind.CAPTION, "sd15", {}) is None
    assert gen("sdxl") > gen("sd15") and train("sdxl") > train("sd15")
    assert gen("sd15") == gen("sd15", width=512, height=512)  # the family's size by default
    assert gen("sd15", width=1024, height=1024) > gen("sd15")
    assert gen("sdxl", count=4) > gen("sdxl", count=1)
    assert train("sdxl", rank=128) > train("sdxl", rank=8)
    assert train("sdxl", method="dora") > train("sdxl", method="lora", rank=16)
    assert train("sd15", preset="concept") < train("sd15", preset="style")  # batch 2 vs 4
    # Textual inversion back-propagates through the UNet at batch 4: more than the 16 GB
    # the old table claimed, and more than an SDXL LoRA at batch 1.
    ti = train("sdxl", method="textual_inversion")
    assert ti > 16 * 1024 and ti > train("sdxl")
    # A model's family comes from its config when its name does not say.
    configured = {"house": {"source": "/m/house.safetensors", "family": "sdxl"}}
    assert memory_needed_mb(JobKind.GENERATE, "house", configured) == gen("sdxl")


def test_preset_shapes_in_the_estimates_match_the_presets() -> None:
    from gpu_runner.training.config import preset_defaults
    from storage.families import FAMILIES, FAMILY_DEFAULTS, PRESET_BATCH_RANK, TRAINING_METHODS
    from storage.training_bounds import PRESETS

    for (family, method, preset), (batch, rank) in PRESET_BATCH_RANK.items():
        values = preset_defaults(method, family, preset)
        assert (values["batch_size"], values.get("rank")) == (batch, rank), (family, method)
        assert values["resolution"] == FAMILY_DEFAULTS[family].width
    # One entry for every method each family trains, in every preset, and no other.
    assert set(PRESET_BATCH_RANK) == {
        (f, m, p) for f in FAMILIES for m in TRAINING_METHODS[f] for p in PRESETS
    }


# --- textual inversion ---------------------------------------------------------------------


def test_textual_inversion_shares_the_pipelines_encoder_weights(tiny_builders: Any) -> None:
    """Only the token tables are private: SDXL's 0.8 B encoder weights are not copied,
    and the warm pipeline still knows nothing of the new token."""
    from gpu_runner.training.textual_inversion import attach_token

    pipe = tiny_builders["sdxl"](0)
    vocab = [len(pipe.tokenizer), len(pipe.tokenizer_2)]
    tuned, token = attach_token(pipe, "zxqtok", "style", 2)
    for name in ("text_encoder", "text_encoder_2"):
        original, private = getattr(pipe, name), getattr(tuned, name)
        table = original.get_input_embeddings().weight
        ours = private.get_input_embeddings().weight
        assert ours.data_ptr() != table.data_ptr() and ours.shape[0] == table.shape[0] + 2
        shared = {
            n: p.data_ptr() for n, p in original.named_parameters() if "token_embedding" not in n
        }
        assert shared == {
            n: p.data_ptr() for n, p in private.named_parameters() if "token_embedding" not in n
        }
    assert [len(pipe.tokenizer), len(pipe.tokenizer_2)] == vocab
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == vocab[0]
    token.remove_hooks()


def test_checkpointed_text_encoder_gives_the_same_gradient(tiny_builders: Any) -> None:
    import torch

    from gpu_runner.training.dataset import encode_text
    from gpu_runner.training.textual_inversion import attach_token

    grads = []
    for checkpointing in (False, True):
        pipe = tiny_builders["sdxl"](0)
        tuned, token = attach_token(
            pipe, "zxqtok", "style", 1, gradient_checkpointing=checkpointing
        )
        layers = list(tuned.text_encoder_2.modules())
        assert any(getattr(m, "gradient_checkpointing", False) for m in layers) is checkpointing
        cond = encode_text(tuned, ["a zxqtok painting"], torch.device("cpu"), grad=True)
        (cond.hidden.square().mean() + cond.pooled.square().mean()).backward()
        grads.append([p.grad.clone() for p in token.parameters()])
        token.remove_hooks()
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


# --- out of memory ---------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "method"), [("sd15", "dora"), ("sdxl", "textual_inversion")])
def test_out_of_memory_advises_only_options_chat_offers(
    tiny_builders: Any, demo_items: list[tuple[Any, str]], tmp_path: Path, fast: dict[str, Any],
    family: str, method: str,
) -> None:  # fmt: skip
    import torch

    from bot.core.arguments import StyleTrainArgs
    from gpu_runner.training.config import make_config
    from gpu_runner.training.loop import TrainingError, train

    config = make_config(
        method, family, "style", trigger="zxqtok", steps=3, checkpoint_every=3, validate_every=3,
        base_model_name="real", **fast,
    )  # fmt: skip

    def out_of_memory(_pause: Any, _at_checkpoint: bool) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingError) as caught:
        train(
            config, demo_items, tiny_builders[family](0), tmp_path / "out",
            checkpoint_dir=tmp_path / "ckpt", between_steps=out_of_memory,
        )  # fmt: skip
    message = str(caught.value)
    assert message.startswith("out of GPU memory")
    advised = re.findall(r"`(\w+)=", message)
    assert advised and set(advised) <= set(StyleTrainArgs.model_fields), message
    assert "batch_size" not in message and "lower resolution" not in message


def test_flux2_klein_estimates_use_its_own_figures_and_refuse_textual_inversion() -> None:
    from storage.families import MethodNotSupportedError

    klein = {"klein": {"source": "/m/klein", "family": "flux2-klein"}}

    def need(kind: str, **kw: Any) -> int:
        value = memory_needed_mb(kind, "klein", klein, **kw)
        assert value is not None
        return value

    sdxl = {"xl": {"source": "/m/xl", "family": "sdxl"}}
    # Its ~8 B parameters of weights outweigh SDXL's 3.4 B, generating and training alike.
    assert need(JobKind.GENERATE) > memory_needed_mb(JobKind.GENERATE, "xl", sdxl)  # type: ignore[operator]
    assert need(JobKind.TRAIN) > memory_needed_mb(JobKind.TRAIN, "xl", sdxl)  # type: ignore[operator]
    assert need(JobKind.TRAIN, rank=128) > need(JobKind.TRAIN, rank=8)
    with pytest.raises(MethodNotSupportedError, match="use method=lora or method=dora"):
        memory_needed_mb(JobKind.TRAIN, "klein", klein, method="textual_inversion")
    assert memory_needed_mb(JobKind.TRAIN, "tiny-flux2-klein", {}) is None  # built-in


def test_flux1_estimates_use_its_own_figures_and_refuse_textual_inversion() -> None:
    from storage.families import MethodNotSupportedError

    flux1 = {"dev": {"source": "/m/FLUX.1-dev", "family": "flux1"}}
    klein = {"klein": {"source": "/m/klein", "family": "flux2-klein"}}

    def need(kind: str, models: dict[str, Any] = flux1, **kw: Any) -> int:
        value = memory_needed_mb(kind, next(iter(models)), models, **kw)
        assert value is not None
        return value

    # Its 16.9 B parameters (12 B transformer, T5-XXL) outweigh klein's ~8 B.
    assert need(JobKind.GENERATE) > need(JobKind.GENERATE, klein)
    assert need(JobKind.TRAIN) > need(JobKind.TRAIN, klein)
    assert need(JobKind.TRAIN, rank=128) > need(JobKind.TRAIN, rank=8)
    with pytest.raises(
        MethodNotSupportedError,
        match=r"FLUX\.1 base models cannot train textual inversion; use method=lora or method=dora",
    ):
        memory_needed_mb(JobKind.TRAIN, "dev", flux1, method="textual_inversion")
    assert memory_needed_mb(JobKind.TRAIN, "tiny-flux1", {}) is None  # built-in


def test_qwen_image_estimates_use_its_own_figures_and_refuse_textual_inversion() -> None:
    from storage.families import MethodNotSupportedError

    qwen = {"qwen": {"source": "/m/qwen-image", "family": "qwenimage"}}
    klein = {"klein": {"source": "/m/klein", "family": "flux2-klein"}}

    def need(kind: str, name: str = "qwen", configured: Any = qwen, **kw: Any) -> int:
        value = memory_needed_mb(kind, name, configured, **kw)
        assert value is not None
        return value

    # 20 B transformer + 8 B text encoder: past what FLUX.2 [klein] needs, and more than a
    # 48 GB card holds for a LoRA at its native 1328 px even before activations.
    assert need(JobKind.GENERATE) > need(JobKind.GENERATE, "klein", klein)
    assert need(JobKind.TRAIN) > 48 * 1024
    assert need(JobKind.TRAIN, method="dora") > need(JobKind.TRAIN, preset="concept")
    assert need(JobKind.GENERATE, width=1328, height=1328, count=2) > need(JobKind.GENERATE)
    with pytest.raises(MethodNotSupportedError, match="use method=lora or method=dora"):
        memory_needed_mb(JobKind.TRAIN, "qwen", qwen, method="textual_inversion")
    assert memory_needed_mb(JobKind.TRAIN, "tiny-qwenimage", {}) is None  # built-in


def test_the_readme_memory_table_is_the_estimates() -> None:
    from pathlib import Path

    from storage.families import FAMILIES, FAMILY_LABELS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for family in FAMILIES:
        configured = {"m": {"source": "/m", "family": family}}
        figures = [
            memory_needed_mb(JobKind.GENERATE, "m", configured),
            memory_needed_mb(JobKind.TRAIN, "m", configured, method="lora"),
            memory_needed_mb(JobKind.TRAIN, "m", configured, method="dora"),
            memory_needed_mb(JobKind.TRAIN, "m", configured, method="lora", quantize="nf4"),
        ]
        cells = " | ".join(f"about {mb / 1024:.1f} GB" for mb in figures if mb is not None)
        assert f"| {FAMILY_LABELS[family]} | {cells} |" in readme, family
