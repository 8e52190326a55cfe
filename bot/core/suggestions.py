"""Choices offered while an option is typed (Discord autocomplete): the team's own style
names, and the fixed lists of kinds, presets, methods, quantizations, base models and
aspect ratios.
Slack's command modals show the same lists as pick lists."""

from __future__ import annotations

from bot.commands import TeamRef
from bot.core.context import Services
from bot.core.parsing import METHOD_CHOICES
from bot.core.policy import known_base_models
from bot.core.teams import find_team, team_styles
from storage.families import ASPECT_RATIOS
from storage.models import StyleKind
from storage.training_bounds import LAYER_SETS, OPTIMIZERS, PRESETS, QUANTIZATIONS

MAX_CHOICES = 25  # Discord shows at most 25


def suggest(services: Services, team: TeamRef, option: str, typed: str) -> list[str]:
    typed = typed.strip().casefold()
    if option in ("name", "style"):
        with services.db.session() as s:
            found = find_team(s, team)
            options = [] if found is None else [style.name for style in team_styles(s, found.id)]
    elif option == "kind":
        options = list(StyleKind)
    elif option == "preset":
        options = list(PRESETS)
    elif option == "method":
        options = list(METHOD_CHOICES)
    elif option == "quantize":
        options = list(QUANTIZATIONS)
    elif option == "layers":
        options = list(LAYER_SETS)
    elif option == "optimizer":
        options = list(OPTIMIZERS)
    elif option in ("flip", "shuffle", "text_encoder"):
        options = ["on", "off"]
    elif option == "base":
        options = sorted(known_base_models(services.settings))
    elif option == "ar":
        options = [f"{w}:{h}" for w, h in ASPECT_RATIOS]
    else:
        return []
    starts = [o for o in options if o.casefold().startswith(typed)]
    inside = [o for o in options if typed in o.casefold() and o not in starts]
    return (starts + inside)[:MAX_CHOICES]
