"""Guards in front of every command: idempotency, per-user rate limit, prompt blocklist."""

from __future__ import annotations

import re
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Select, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import ProcessedEvent, utcnow

Clock = Callable[[], float]

# -- idempotency on the platform's event id ------------------------------------------------


def already_processed(db: Database, platform: str, event_id: str) -> bool:
    """A cheap read before doing work; `claim_event` is the authoritative check."""
    with db.session() as s:
        return s.scalar(_lookup(platform, event_id)) is not None


def claim_event(s: Session, platform: str, event_id: str) -> bool:
    """Record the event in the caller's transaction; False when it was handled before.

    Two deliveries racing on PostgreSQL: the second insert waits for the first to commit,
    then fails the unique constraint inside a savepoint, so only one does the work.
    """
    if s.scalar(_lookup(platform, event_id)) is not None:
        return False
    try:
        with s.begin_nested():
            s.add(ProcessedEvent(platform=platform, event_id=event_id[:200]))
    except IntegrityError:
        return False
    return True


def _lookup(platform: str, event_id: str) -> Select[tuple[int]]:
    return select(ProcessedEvent.id).where(
        ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id[:200]
    )


def prune_processed_events(db: Database, older_than: timedelta = timedelta(days=3)) -> int:
    """Forget old event ids; platforms redeliver within minutes, not days."""
    with db.session(write=True) as s:
        result = s.execute(
            delete(ProcessedEvent).where(ProcessedEvent.created_at < utcnow() - older_than)
        )
        return int(getattr(result, "rowcount", 0) or 0)


# -- rate limit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: float = 0.0
    first_refusal: bool = False  # the first refusal in this window (the one worth auditing)


class RateLimiter:
    """Sliding window: at most `max_events` per key in any `window_s` seconds (per process)."""

    def __init__(self, max_events: int, window_s: float, clock: Clock = time.monotonic) -> None:
        if max_events < 1 or window_s <= 0:
            raise ValueError("a rate limit needs max_events >= 1 and a positive window")
        self.max_events = max_events
        self.window_s = window_s
        self.clock = clock
        self._events: dict[Hashable, deque[float]] = {}
        self._refused_at: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def check(self, key: Hashable) -> RateDecision:
        """Count one event for `key` if allowed; say how long to wait if not."""
        now = self.clock()
        with self._lock:
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.window_s:
                events.popleft()
            if len(events) < self.max_events:
                events.append(now)
                self._refused_at.pop(key, None)
                return RateDecision(True)
            retry_after = events[0] + self.window_s - now
            first = key not in self._refused_at
            self._refused_at.setdefault(key, now)
            return RateDecision(False, retry_after, first)


# -- prompt blocklist --------------------------------------------------------------------


def _fold(text: str) -> str:
    # NFKC folds look-alike forms (fullwidth letters, ligatures); casefold ignores case.
    return unicodedata.normalize("NFKC", text).casefold()


class PromptBlocklist:
    """Whole words or phrases, matched in any case and across runs of spaces."""

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = tuple(t.strip() for t in terms if t.strip())
        self._patterns = [
            (
                term,
                re.compile(
                    r"(?<!\w)" + r"\s+".join(map(re.escape, _fold(term).split())) + r"(?!\w)"
                ),
            )
            for term in self.terms
        ]

    def find(self, text: str) -> str | None:
        """The first blocked term in `text`, or None."""
        folded = _fold(text)
        for term, pattern in self._patterns:
            if pattern.search(folded):
                return term
        return None
