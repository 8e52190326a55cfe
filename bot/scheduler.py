"""The bot process's periodic chores, on APScheduler's BackgroundScheduler.

Outbox delivery every second or so, lease recovery (jobs whose runner died go back to the
queue), and clean-ups: blob temp files a crashed writer left, old processed event ids.
Each chore runs one at a time (max_instances=1) and skips missed runs (coalesce), so a
slow platform never piles up overlapping deliveries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from bot.core.guard import prune_processed_events
from bot.delivery import OutboxDeliverer
from storage.blobs import BlobStore
from storage.db import Database
from storage.queue import JobQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intervals:
    deliver_s: float = 1.0
    recover_s: float = 15.0
    temp_cleanup_s: float = 3600.0
    temp_max_age_s: float = 6 * 3600.0
    events_prune_s: float = 6 * 3600.0
    events_keep: timedelta = timedelta(days=3)


def build_scheduler(
    *,
    deliverers: Sequence[OutboxDeliverer],
    queue: JobQueue,
    blobs: BlobStore,
    db: Database | None = None,
    intervals: Intervals | None = None,
) -> BackgroundScheduler:
    """A scheduler with the bot's chores added, not yet started (call `.start()`)."""
    every = intervals or Intervals()
    scheduler = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    )

    def add(job_id: str, func: Callable[[], object], seconds: float) -> None:
        scheduler.add_job(_logged(job_id, func), "interval", seconds=seconds, id=job_id)

    for deliverer in deliverers:
        add(f"deliver:{deliverer.platform}", deliverer.deliver_due, every.deliver_s)
    add("recover_expired", queue.recover_expired, every.recover_s)
    add(
        "remove_stale_temp",
        lambda: blobs.remove_stale_temp(every.temp_max_age_s),
        every.temp_cleanup_s,
    )
    database = db or queue.db
    add(
        "prune_processed_events",
        lambda: prune_processed_events(database, every.events_keep),
        every.events_prune_s,
    )
    return scheduler


def start_scheduler(
    *,
    deliverers: Sequence[OutboxDeliverer],
    queue: JobQueue,
    blobs: BlobStore,
    db: Database | None = None,
    intervals: Intervals | None = None,
) -> BackgroundScheduler:
    """`build_scheduler(...)`, started. Stop it with `.shutdown()`."""
    scheduler = build_scheduler(
        deliverers=deliverers, queue=queue, blobs=blobs, db=db, intervals=intervals
    )
    scheduler.start()
    return scheduler


def _logged(name: str, func: Callable[[], object]) -> Callable[[], None]:
    """Log a chore's failure and keep the schedule going (the next run may succeed)."""

    def run() -> None:
        try:
            result = func()
            if isinstance(result, int) and result:
                log.debug("%s: %d", name, result)
        except Exception:
            log.exception("scheduled chore %s failed", name)

    run.__name__ = name.replace(":", "_")
    return run
