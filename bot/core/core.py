"""CommandCore: the platform-neutral CommandHandler every chat adapter talks to.

Per command: skip a redelivered event, apply the per-user rate limit, validate the
arguments, then run the handler, which does its writes in one transaction that also
records the event id. Nothing here waits on model work: jobs go to the queue, later
messages to the outbox.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from bot.commands import Command, Form, Press, Reaction, Reply, TeamRef, TextParser
from bot.core import (
    audit,
    command_forms,
    imagine,
    imports,
    jobs,
    models,
    results,
    review,
    styles,
    suggestions,
    training,
    uploads,
)
from bot.core.arguments import scrub_text, validate_args
from bot.core.auth import LeadPolicy
from bot.core.context import Context, Services
from bot.core.errors import AuditNote, DuplicateEvent, Refused, UserError
from bot.core.guard import (
    Clock,
    PromptBlocklist,
    RateLimiter,
    already_processed,
    claim_event,
)
from bot.core.parsing import COMMANDS, HELP, PARSE_ERROR, help_text, parse_command_text
from bot.core.policy import CorePolicy, resolve
from bot.core.previews import PreviewCache
from bot.core.teams import ensure_team
from storage.blobs import BlobStore
from storage.db import Database
from storage.ingest import IngestLimits
from storage.outbox import Outbox, OutboxItem
from storage.queue import JobQueue
from storage.result_buttons import ButtonId, parse_button_id
from storage.settings import Settings
from storage.training_summary import row_of

log = logging.getLogger(__name__)

Handler = Callable[[Context, Any, Command], list[Reply]]

HANDLERS: dict[str, Handler] = {
    "style create": lambda ctx, a, _c: styles.create(ctx, a),
    "style add": lambda ctx, a, c: uploads.add(ctx, a, c.attachments),
    "style caption": lambda ctx, a, _c: styles.caption(ctx, a),
    "style review": lambda ctx, a, _c: review.review(ctx, a),
    "style train": lambda ctx, a, _c: training.train(ctx, a),
    "style list": lambda ctx, a, _c: styles.list_styles(ctx, a),
    "style info": lambda ctx, a, _c: styles.info(ctx, a),
    "style export": lambda ctx, a, _c: styles.export(ctx, a),
    "style versions": lambda ctx, a, _c: models.versions(ctx, a),
    "style use": lambda ctx, a, _c: models.use(ctx, a),
    "style import": lambda ctx, a, c: imports.import_lora(ctx, a, c.attachments),
    "imagine": lambda ctx, a, c: imagine.imagine(ctx, a, c.attachments),
    "jobs": lambda ctx, a, _c: jobs.jobs(ctx, a),
    "cancel": lambda ctx, a, _c: jobs.cancel(ctx, a),
    "audit": lambda ctx, a, _c: audit.audit_command(ctx, a),
}

_VARIATION_SELECTORS = str.maketrans("", "", "\ufe0e\ufe0f")
# Other emoji people use for the same intent.
_EMOJI_ALIASES = {"✔": "✅", "☑": "✅", "✖": "❌", "❎": "❌", "🔄": "🔁"}

_SORRY = "Something went wrong on Atelier's side; it was logged. Try again in a moment."
_RACE = "That clashed with a change made at the same moment; try again."
_OLD_BUTTON = "That button is not one Atelier knows (from an older version?); run `/imagine` anew."


def normalize_emoji(emoji: str) -> str:
    plain = emoji.translate(_VARIATION_SELECTORS).strip()
    return _EMOJI_ALIASES.get(plain, plain)


class CommandCore:
    """Implements bot.commands.CommandHandler. Adapters parse free text with `text_parser`."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        settings: Settings,
        queue: JobQueue,
        outbox: Outbox,
        *,
        policy: CorePolicy | None = None,
        clock: Clock = time.monotonic,
        leads: LeadPolicy | None = None,
        preview_dir: Path | None = None,
    ) -> None:
        policy = resolve(policy or CorePolicy(), settings)
        self.text_parser: TextParser = parse_command_text
        self.services = Services(
            db=db,
            blobs=blobs,
            settings=settings,
            queue=queue,
            outbox=outbox,
            policy=policy,
            leads=leads or LeadPolicy.from_settings(settings),
            limiter=RateLimiter(policy.rate_limit_commands, policy.rate_limit_window_s, clock),
            blocklist=PromptBlocklist(policy.prompt_blocklist),
            previews=PreviewCache(preview_dir or settings.data_dir / "previews", blobs),
            limits=IngestLimits(
                max_bytes=settings.max_upload_bytes,
                max_pixels=settings.max_image_pixels,
                min_side=settings.min_image_side,
            ),
        )

    # -- commands ------------------------------------------------------------------------

    def handle(self, command: Command) -> list[Reply]:
        ctx = self._context(command.team.platform, command, command.thread)
        return self._guarded(ctx, lambda: self._run(ctx, command))

    def _run(self, ctx: Context, command: Command) -> list[Reply]:
        if command.name == HELP or command.name not in COMMANDS:
            problem = command.args.get(PARSE_ERROR)
            if problem is None and command.name != HELP:
                problem = f"Atelier has no command '{command.name}'"
            topic = command.args.get("topic")
            # The problem may quote what was typed: never echo text a platform cannot carry.
            lead = f"{scrub_text(problem).rstrip('.')}.\n" if problem else ""
            return [Reply(lead + help_text(topic), private=True)]
        if already_processed(self.services.db, ctx.platform, ctx.event_id):
            raise DuplicateEvent(ctx.event_id)
        # Images posted in a thread are chat, not commands: most threads are not a style's,
        # and a "slow down" there would be noise.
        if not (command.name == "style add" and not command.args.get("name")):
            self._rate_limit(ctx)
        args = validate_args(command.name, command.args)
        return HANDLERS[command.name](ctx, args, command)

    def _rate_limit(self, ctx: Context) -> None:
        policy = self.services.policy
        decision = self.services.limiter.check(
            (ctx.platform, ctx.team_ref.external_id, ctx.actor.user_id)
        )
        if decision.allowed:
            return
        window = policy.rate_limit_window_s
        per = "minute" if window == 60 else f"{window:g} s"
        message = (
            f"Slow down: at most {policy.rate_limit_commands} commands per {per} per person; "
            f"try again in {max(1, round(decision.retry_after_s))} s."
        )
        if decision.first_refusal:
            raise Refused(message, AuditNote("rate_limit.refused", "user", ctx.actor.user_id))
        raise UserError(message)

    # -- reactions -----------------------------------------------------------------------

    def handle_reaction(self, reaction: Reaction) -> list[Reply]:
        if not reaction.added:
            return []  # taking a reaction back undoes nothing: decisions are audited events
        emoji = normalize_emoji(reaction.emoji)
        if emoji not in (review.APPROVE, review.REJECT, imagine.REROLL) and row_of(emoji) is None:
            return []
        item = self.services.outbox.find_posted(reaction.team.platform, reaction.message_id)
        if item is None:
            return []  # not one of our messages
        ctx = self._context(reaction.team.platform, reaction, None)
        return self._guarded(ctx, lambda: self._route(ctx, item, emoji))

    def _route(self, ctx: Context, item: OutboxItem, emoji: str) -> list[Reply]:
        if already_processed(self.services.db, ctx.platform, ctx.event_id):
            raise DuplicateEvent(ctx.event_id)
        kind, _, rest = item.key.partition(":")
        if kind == "review" and rest.startswith("dataset:"):
            return review.on_sheet(ctx, int(rest.split(":")[1]), emoji)
        if kind == "card" and rest.startswith("image:"):
            return review.on_card(ctx, int(rest.split(":")[1]), emoji)
        model_id = item.extra.get("model_version_id")
        if isinstance(model_id, int) and emoji == review.APPROVE:
            return models.approve(ctx, model_id)
        row = row_of(emoji)
        if isinstance(model_id, int) and row is not None:
            return models.use_row(ctx, model_id, row)
        generation_id = item.extra.get("generation_id")
        job_id = results.result_job_id(item.key)
        if not isinstance(generation_id, int) and job_id is not None:
            generation_id = results.first_generation_of_job(ctx, job_id)
        if emoji != imagine.REROLL:
            return []
        if isinstance(generation_id, int):
            # 🔁 is the Reroll button by another name.
            self._rate_limit(ctx)
            return results.press(ctx, ButtonId("reroll", generation_id), {})
        if job_id is not None:
            self._rate_limit(ctx)
            return results.reroll_job(ctx, job_id)
        return []

    # -- buttons ---------------------------------------------------------------------------

    def handle_press(self, press: Press) -> list[Reply]:
        ctx = Context(
            services=self.services,
            platform=press.team.platform,
            team_ref=press.team,
            actor=press.user,
            channel=press.channel,
            thread=press.thread,
            event_id=press.event_id,
        )
        return self._guarded(ctx, lambda: self._press(ctx, press))

    def _press(self, ctx: Context, press: Press) -> list[Reply]:
        button = parse_button_id(press.button)
        if button is None:
            return [Reply(_OLD_BUTTON, private=True)]
        if button.action == "edit" and not press.values:
            return results.edit_form(ctx, button)  # reads only; the submit is the action
        if already_processed(self.services.db, ctx.platform, ctx.event_id):
            raise DuplicateEvent(ctx.event_id)
        if button.action != "delete":
            self._rate_limit(ctx)
        return results.press(ctx, button, press.values)

    # -- autocomplete ----------------------------------------------------------------------

    def suggest(self, team: TeamRef, option: str, typed: str) -> list[str]:
        try:
            return suggestions.suggest(self.services, team, option, typed)
        except Exception:  # a suggestion list is a convenience: never an error dialog
            log.exception("suggestions for %s failed", option)
            return []

    def command_form(self, team: TeamRef, name: str) -> Form | None:
        return command_forms.command_form(self.services, team, name)

    # -- shared --------------------------------------------------------------------------

    def _context(self, platform: str, event: Command | Reaction, thread: str | None) -> Context:
        return Context(
            services=self.services,
            platform=platform,
            team_ref=event.team,
            actor=event.user,
            channel=event.channel,
            thread=thread,
            event_id=event.event_id,
        )

    def _guarded(self, ctx: Context, work: Callable[[], list[Reply]]) -> list[Reply]:
        """Run `work`, turning what it raises into replies (and audited refusals)."""
        try:
            return work()
        except DuplicateEvent:
            log.info("event %s on %s was handled before; ignoring it", ctx.event_id, ctx.platform)
            return []
        except Refused as refusal:
            self._audit_refusal(ctx, refusal.audit)
            return [Reply(refusal.message, private=True)]
        except UserError as error:
            return [Reply(error.message, private=error.private)]
        except IntegrityError:
            log.warning("write race on event %s", ctx.event_id, exc_info=True)
            return [Reply(_RACE, private=True)]
        except Exception:
            log.exception("event %s on %s failed", ctx.event_id, ctx.platform)
            return [Reply(_SORRY, private=True)]

    def _audit_refusal(self, ctx: Context, note: AuditNote) -> None:
        """Record a refusal on its own (the refused work was rolled back)."""
        try:
            with self.services.db.session(write=True) as s:
                if not claim_event(s, ctx.platform, ctx.event_id):
                    return
                team = ensure_team(s, ctx.team_ref)
                audit.record(
                    s,
                    team_id=team.id,
                    actor=ctx.actor.user_id,
                    action=note.action,
                    object_type=note.object_type,
                    object_id=note.object_id,
                    detail={**note.detail, "name": ctx.actor.display_name},
                )
        except Exception:
            log.exception("could not audit a refusal of event %s", ctx.event_id)
