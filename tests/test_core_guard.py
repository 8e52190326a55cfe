"""Guards: idempotency on event ids, the per-user rate limit, the prompt blocklist."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.core import CorePolicy
from bot.core.guard import PromptBlocklist, RateLimiter, claim_event
from storage.db import Database
from storage.models import ProcessedEvent

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import (  # noqa: E402
    FakeClock,
    Rig,
    approved_style,
    build_rig,
    command,
    images,
    reaction,
)

pytest_plugins = ("bot_fixtures",)


def test_rate_limiter_sliding_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, 60.0, clock)
    assert [limiter.check("u").allowed for _ in range(3)] == [True, True, True]
    clock.advance(10)
    refused = limiter.check("u")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(50.0)
    assert refused.first_refusal and not limiter.check("u").first_refusal
    assert limiter.check("someone else").allowed
    clock.advance(50)  # the first three fall out of the window
    assert limiter.check("u").allowed


def test_per_user_rate_limit_refuses_then_recovers(db: Database, tmp_path: Path) -> None:
    rig = build_rig(db, tmp_path, policy=CorePolicy(rate_limit_commands=2, rate_limit_window_s=60))
    assert "no styles yet" in rig.text("style list")
    assert "no styles yet" in rig.text("style list")
    (refused,) = rig.run("style list")
    assert refused.private and "at most 2 commands per minute" in refused.text
    assert "try again in 60 s" in refused.text
    rig.run("style list")  # still refused, not audited again
    # Images posted in some thread are chat, not commands: no "slow down" there.
    assert rig.run("style add", {}, thread="t-9", files=images(1)) == []
    assert "no styles yet" in rig.text("style list", user="U2")  # other people are unaffected
    (audited,) = rig.audit("rate_limit.refused")
    assert audited.actor == "U1"
    rig.clock.advance(61)
    assert "no styles yet" in rig.text("style list")


def test_blocklisted_prompt_is_refused_and_audited(db: Database, tmp_path: Path) -> None:
    policy = CorePolicy(prompt_blocklist=("gore", "brand x"))
    rig = build_rig(db, tmp_path, policy=policy)
    (reply,) = rig.run("imagine", {"prompt": "A poster for BRAND   X, bold"})
    assert reply.private and "“brand x”" in reply.text and "rephrase" in reply.text
    (event,) = rig.audit("generate.refused")
    assert event.detail["term"] == "brand x" and "BRAND" in event.detail["prompt"]
    assert rig.jobs() == []
    rig.run("imagine", {"prompt": "a gorge at sunset"})  # whole words only
    assert len(rig.jobs("generate")) == 1


def test_blocklist_matching() -> None:
    blocklist = PromptBlocklist(["gore", "brand x", "  "])
    assert blocklist.terms == ("gore", "brand x")
    assert blocklist.find("so much GORE") == "gore"
    assert blocklist.find("ｇｏｒｅ") == "gore"  # fullwidth look-alikes fold to the same word
    assert blocklist.find("gorest, brandx") is None
    assert PromptBlocklist([]).find("anything") is None


def test_claim_event_once_per_platform(db: Database) -> None:
    with db.session(write=True) as s:
        assert claim_event(s, "slack", "E1")
        assert not claim_event(s, "slack", "E1")
        assert claim_event(s, "discord", "E1")
    with db.session(write=True) as s:
        assert not claim_event(s, "slack", "E1")


def test_failed_command_does_not_burn_its_event_id(rig: Rig) -> None:
    """A refusal that rolled back leaves the event free, so a corrected retry is not lost."""
    rig.run("style create", {"name": "ink", "trigger": "inkstyle"})
    clash = command("style create", {"name": "ink2", "trigger": "inkstyle"}, event="E")
    assert "already switches on style ink" in rig.core.handle(clash)[0].text
    assert rig.count(ProcessedEvent, ProcessedEvent.event_id == "E") == 0
    good = command("style create", {"name": "ink2", "trigger": "ink2style"}, event="E2")
    assert "Created" in rig.core.handle(good)[0].text
    assert rig.core.handle(good) == []
    assert rig.count(ProcessedEvent, ProcessedEvent.event_id == "E2") == 1


def test_redelivered_reaction_approves_once(rig: Rig) -> None:
    approved_style(rig)
    rig.run("style add", {"name": "ink"}, files=images(7))
    rig.run("style review", {"name": "ink"})
    v2 = rig.datasets("ink")[-1]
    rig.deliverer.deliver_due()
    event = reaction(rig.sender.id_of(f"review:dataset:{v2.id}"), "✅", event="R1")
    assert "approved" in rig.core.handle_reaction(event)[0].text
    assert rig.core.handle_reaction(event) == []
    assert len(rig.audit("dataset.approve")) == 2  # v1 (by the helper) and v2, once
