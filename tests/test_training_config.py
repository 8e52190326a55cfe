"""Training presets and per-run overrides (pure pydantic: no torch needed)."""

from __future__ import annotations

import pytest

from gpu_runner.training.config import (
    ConfigError,
    DoraConfig,
    LoraConfig,
    TextualInversionConfig,
    config_from_dict,
    make_config,
    preset_defaults,
)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", ["style", "concept"])
@pytest.mark.parametrize("method", ["lora", "dora", "textual_inversion"])
def test_every_preset_builds(method: str, family: str, preset: str) -> None:
    cfg = make_config(method, family, preset, trigger="zxq")
    assert cfg.method == method and cfg.family == family and cfg.preset == preset
    assert cfg.resolution == (512 if family == "sd15" else 1024)


def test_presets_differ_where_they_should() -> None:
    style = make_config("lora", "sd15", "style", trigger="t")
    concept = make_config("lora", "sd15", "concept", trigger="t")
    assert isinstance(style, LoraConfig)
    assert style.rank > concept.rank  # styles get more capacity
    assert style.caption_dropout > 0 and concept.caption_dropout == 0
    assert style.min_snr_gamma == 5.0
    dora = make_config("dora", "sd15", "style", trigger="t")
    assert isinstance(dora, DoraConfig) and dora.rank == style.rank // 2
    ti = make_config("textual_inversion", "sdxl", "style", trigger="t")
    assert isinstance(ti, TextualInversionConfig)
    assert ti.learning_rate == 5e-4 and ti.min_snr_gamma is None


def test_overrides_apply_and_none_is_ignored() -> None:
    cfg = make_config("lora", trigger="zxq", rank=64, learning_rate=2e-4, steps=None)
    assert isinstance(cfg, LoraConfig)
    assert cfg.rank == 64 and cfg.learning_rate == 2e-4
    assert cfg.steps == preset_defaults("lora", "sd15", "style")["steps"]
    # The preset's alpha/rank ratio is kept when only rank is given.
    assert cfg.alpha == 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rank": 0}, "rank must be between 1 and 128 (got 0)"),
        ({"rank": 500}, "rank must be between 1 and 128 (got 500)"),
        ({"learning_rate": 0.5}, "learning_rate must be between 1e-06 and 0.01 (got 0.5)"),
        ({"steps": 50_000}, "steps must be between 1 and 20000 (got 50000)"),
        ({"resolution": 500}, "resolution must be a multiple of 8 (got 500)"),
        ({"resolution": 4096}, "resolution must be between 64 and 2048 (got 4096)"),
        ({"batch_size": 0}, "batch_size must be between 1 and 64 (got 0)"),
        ({"caption_dropout": 0.9}, "caption_dropout must be between 0 and 0.5 (got 0.9)"),
        ({"rank": "lots"}, "rank must be a whole number (got 'lots')"),
        ({"warmup_steps": 900, "steps": 100}, "warmup_steps (900) must not exceed steps (100)"),
        ({"ranks": 4}, "unknown setting 'ranks'"),
        ({"max_timestep": 1200}, "max_timestep must be between 1 and 1000 (got 1200)"),
        (
            {"min_timestep": 600, "max_timestep": 400},
            "min_timestep (600) must be below max_timestep (400)",
        ),
    ],
)
def test_bad_overrides_are_refused_with_one_clear_line(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make_config("lora", trigger="zxq", **overrides)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("family", "step"),
    [
        ("sd15", 8), ("sdxl", 8), ("flux2-klein", 16), ("flux1", 16), ("qwenimage", 16),
        ("zimage", 16),
    ],
)  # fmt: skip
def test_the_resolution_is_on_the_grid_the_familys_pipeline_draws(family: str, step: int) -> None:
    assert make_config("lora", family, trigger="zxq", resolution=1008).resolution == 1008
    if step > 8:
        with pytest.raises(ConfigError) as err:
            make_config("lora", family, trigger="zxq", resolution=1000)
        assert str(err.value) == f"resolution must be a multiple of {step} (got 1000)"
    else:
        assert make_config("lora", family, trigger="zxq", resolution=1000).resolution == 1000


def test_bad_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown method 'lokr': use one of lora, dora"):
        make_config("lokr", trigger="zxq")
    with pytest.raises(ConfigError, match="unknown preset 'anime'"):
        make_config("lora", "sd15", "anime", trigger="zxq")
    with pytest.raises(ConfigError, match="trigger must be one word"):
        make_config("lora", trigger="two words")
    with pytest.raises(ConfigError, match="rank"):
        make_config("textual_inversion", trigger="zxq", rank=4)  # TI has no rank


def test_config_round_trips_and_fingerprint_tracks_weights_settings() -> None:
    cfg = make_config("dora", "sdxl", "concept", trigger="zxq", steps=300)
    again = config_from_dict(cfg.model_dump())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    renamed = cfg.model_copy(update={"output_name": "other"})
    assert renamed.fingerprint() == cfg.fingerprint()  # cosmetic
    assert cfg.model_copy(update={"rank": 4}).fingerprint() != cfg.fingerprint()


# --- chat and runner read one table (storage.training_bounds) -----------------------------

# Chat argument -> the config setting it overrides.
CHAT_SETTINGS = {"steps": "steps", "rank": "rank", "lr": "learning_rate"}


@pytest.mark.parametrize(("arg", "setting"), CHAT_SETTINGS.items())
def test_chat_accepts_exactly_what_the_runner_accepts(arg: str, setting: str) -> None:
    from bot.core.arguments import validate_args
    from bot.core.errors import UserError
    from storage.training_bounds import BOUNDS, WHOLE_BOUNDS

    low, high = BOUNDS[setting]
    step = 1 if setting in WHOLE_BOUNDS else low / 2
    for value in (low, high):  # the edges pass both
        chat = validate_args("style train", {"name": "ink", arg: str(value)})
        assert getattr(chat, arg) == value
        make_config("lora", trigger="zxq", **{setting: value, "warmup_steps": 0})
    for value in (low - step, high + step):  # just past them fails both
        with pytest.raises(UserError, match=f"(?i){arg} must be between"):
            validate_args("style train", {"name": "ink", arg: str(value)})
        with pytest.raises(ConfigError, match=f"{setting} must be between"):
            make_config("lora", trigger="zxq", **{setting: value, "warmup_steps": 0})


def test_chat_runner_and_database_name_the_same_methods_and_presets() -> None:
    from bot.core.arguments import validate_args
    from gpu_runner.training.config import METHODS, PRESETS
    from storage.models import StyleKind, TrainingMethod

    assert tuple(TrainingMethod) == METHODS and tuple(StyleKind) == PRESETS
    for method in METHODS:
        assert validate_args("style train", {"name": "ink", "method": method}).method == method
        preset_defaults(method, "sd15", "style")
    for preset in PRESETS:
        assert validate_args("style train", {"name": "ink", "preset": preset}).preset == preset
