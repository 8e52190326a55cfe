"""The platform-neutral command core: every chat adapter hands it Commands and Reactions.

core = CommandCore(db, blobs, settings, queue, outbox)
parsed = core.text_parser("/style", "create ink inkstyle")   # Slack, console
replies = core.handle(Command(..., name=parsed.name, args=parsed.args))
"""

from bot.core.core import CommandCore
from bot.core.parsing import COMMANDS, CommandSpec, parse_command_text
from bot.core.policy import DEFAULT_BASE_MODEL, CorePolicy

__all__ = [
    "COMMANDS",
    "DEFAULT_BASE_MODEL",
    "CommandCore",
    "CommandSpec",
    "CorePolicy",
    "parse_command_text",
]
