"""Forms for typed commands (Slack modals): a command's options from the command table, as
pick lists where the choices are known (the team's styles, presets, methods, base models,
kinds, aspect ratios: the lists Discord's autocomplete offers). Submitted, a form comes
back as the same neutral Command a typed one makes."""

from __future__ import annotations

from bot.commands import Form, FormField, TeamRef, command_form_id
from bot.core.context import Services
from bot.core.parsing import COMMANDS, FORM_COMMANDS
from bot.core.suggestions import suggest

# Options with a fixed or team-wide list of values.
_PICKED = (
    "name", "style", "kind", "preset", "method", "quantize", "layers", "optimizer", "flip",
    "shuffle", "text_encoder",
    "base", "ar",
)  # fmt: skip
# Options too open for a form (image-to-image needs an attached image).
_LEFT_OUT = ("strength",)


def command_form(services: Services, team: TeamRef, name: str) -> Form | None:
    spec = COMMANDS.get(name)
    if spec is None or name not in FORM_COMMANDS:
        return None
    fields = []
    for param in spec.params:
        if param.name in _LEFT_OUT:
            continue
        # A pick list only where there is something to pick: a team with no styles types
        # a name (and is told what to do next, as when typing the command).
        choices = suggest(services, team, param.name, "") if param.name in _PICKED else []
        fields.append(
            FormField(
                name=param.name,
                label=f"{param.name}: {param.help}",
                multiline=param.name == "prompt",
                required=param.required,
                max_length=1000 if param.rest else 200,
                choices=tuple(choices),
            )
        )
    return Form(submit_id=command_form_id(name), title=f"/{name}", fields=fields)
