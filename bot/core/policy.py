"""Knobs of the command core that are set in code (defaults suit a small team)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from storage.families import BUILTIN_MODELS
from storage.settings import Settings

# The built-in tiny SD1.5-shaped pipeline: what a style trains on unless told otherwise
# (Settings.default_base_model, when set, takes precedence).
DEFAULT_BASE_MODEL = "tiny-sd15"
# Shipped with the runner, so always available; Settings.base_models names the rest.
BUILTIN_BASE_MODELS = tuple(BUILTIN_MODELS)


@dataclass(frozen=True)
class CorePolicy:
    # Empty: Settings.default_base_model (itself tiny-sd15 unless configured).
    default_base_model: str = ""
    # Per user: at most this many commands (and rerolls) in the window.
    rate_limit_commands: int = 12
    rate_limit_window_s: float = 60.0
    # Words or phrases refused in /imagine prompts (whole words, any case).
    prompt_blocklist: tuple[str, ...] = ()
    max_files_per_add: int = 50
    max_adapters: int = 4
    # Post one card per image at review, so a lead can ❌ a single image.
    image_cards: bool = True
    # Below this many kept images a review still runs but the reply says it is thin.
    recommended_images: int = 10


def known_base_models(settings: Settings) -> frozenset[str]:
    return frozenset(BUILTIN_BASE_MODELS) | frozenset(settings.base_models)


def resolve(policy: CorePolicy, settings: Settings) -> CorePolicy:
    """The policy with its defaults filled in from the settings."""
    if policy.default_base_model:
        return policy
    return replace(policy, default_base_model=settings.default_base_model or DEFAULT_BASE_MODEL)
