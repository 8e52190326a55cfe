"""Hand-written SQL for the queue's hot path, one statement per operation.

Building SQLAlchemy statements costs more than SQLite takes to run them, so enqueue,
claim, heartbeat and finish are prepared once per dialect here and bound at call time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from sqlalchemy import JSON, BigInteger, Integer, String, TextClause, bindparam, text

from storage.models import Job, UTCDateTime

_COLUMNS = Job.__table__.columns
RETURNING = ", ".join(column.name for column in _COLUMNS)

_TYPES = {
    "now": UTCDateTime(),
    "expires": UTCDateTime(),
    "run_after": UTCDateTime(),
    "payload": JSON(),
    "result": JSON(),
    "priority": Integer(),
    "max_attempts": Integer(),
    "id": BigInteger(),
    "team_id": Integer(),
    "requester": String(),
    "worker": String(),
    "kind": String(),
    "base_model": String(),
    "idempotency_key": String(),
    "status": String(),
    "batch_key": String(),
    "limit": Integer(),
    "min_memory_mb": Integer(),
    "memory_mb": Integer(),
}


def _prepare(sql: str, *expanding: str) -> TextClause:
    names = [name for name in _TYPES if re.search(rf":{name}\b", sql)]
    params = [bindparam(name, type_=_TYPES[name]) for name in names]
    params += [bindparam(name, expanding=True) for name in expanding]
    return text(sql).bindparams(*params).columns(*_COLUMNS)


@dataclass(frozen=True)
class QueueSQL:
    insert: TextClause
    claim_batch: TextClause
    heartbeat: TextClause
    finish: TextClause
    release: TextClause
    skip_locked: str

    def claim(self, *, by_kind: bool, by_model: bool, by_memory: bool) -> TextClause:
        return _claim(self.skip_locked, by_kind, by_model, by_memory)


@cache
def _claim(skip_locked: str, by_kind: bool, by_model: bool, by_memory: bool) -> TextClause:
    filters = " AND (min_memory_mb IS NULL OR min_memory_mb <= :memory_mb)" if by_memory else ""
    expanding = []
    if by_kind:
        filters += " AND kind IN :kinds"
        expanding.append("kinds")
    if by_model:
        filters += " AND (base_model IS NULL OR base_model IN :models)"
        expanding.append("models")
    return _prepare(
        f"UPDATE jobs SET {_CLAIMED} WHERE id = (SELECT id FROM jobs WHERE {_NEXT}{filters}"
        f" {_ORDER} LIMIT 1{skip_locked}) RETURNING {RETURNING}",
        *expanding,
    )


_CLAIMED = (
    "status = 'running', lease_owner = :worker, lease_expires_at = :expires,"
    " attempts = attempts + 1, started_at = COALESCE(started_at, :now)"
)
_NEXT = "status = 'queued' AND run_after <= :now"
_ORDER = "ORDER BY priority DESC, fair_seq, id"


def _insert(greatest: str) -> TextClause:
    # Start-time fair queueing: a newcomer joins at the head of its priority's line; a
    # requester with jobs waiting goes one step after its own last job.
    head = (
        "COALESCE((SELECT MIN(fair_seq) FROM jobs WHERE status = 'queued'"
        " AND priority = :priority), (SELECT MAX(fair_seq) FROM jobs"
        " WHERE priority = :priority), 0)"
    )
    own_next = (
        "COALESCE((SELECT MAX(fair_seq) + 1 FROM jobs WHERE priority = :priority"
        " AND requester = :requester), 0)"
    )
    return _prepare(
        "INSERT INTO jobs (kind, payload, priority, requester, team_id, base_model,"
        " min_memory_mb, idempotency_key, batch_key, status, fair_seq, attempts, max_attempts,"
        " run_after, cancel_requested, created_at) VALUES (:kind, :payload, :priority, :requester,"
        " :team_id, :base_model, :min_memory_mb, :idempotency_key, :batch_key, 'queued',"
        f" {greatest}({head}, {own_next}),"
        f" 0, :max_attempts, :run_after, false, :now) RETURNING {RETURNING}"
    )


_HELD = "id = :id AND status = 'running' AND lease_owner = :worker"

# Hand a running job back (its runner is stopping): claimable at once by any runner, in its
# old place in line (fair_seq is kept). The stop was no failed try, so the claim's attempt
# is given back. A cancel that raced in ends it instead.
_RELEASE = (
    "UPDATE jobs SET"
    " status = CASE WHEN cancel_requested THEN 'canceled' ELSE 'queued' END,"
    " finished_at = CASE WHEN cancel_requested THEN :now ELSE finished_at END,"
    " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,"
    f" run_after = :now, lease_owner = NULL, lease_expires_at = NULL WHERE {_HELD}"
    f" RETURNING {RETURNING}"
)


@cache
def queue_sql(dialect: str) -> QueueSQL:
    sqlite = dialect == "sqlite"
    return QueueSQL(
        insert=_insert("MAX" if sqlite else "GREATEST"),
        claim_batch=_prepare(
            f"UPDATE jobs SET {_CLAIMED} WHERE id IN (SELECT id FROM jobs WHERE {_NEXT}"
            f" AND batch_key = :batch_key"
            " AND (min_memory_mb IS NULL OR min_memory_mb <= :memory_mb)"
            f" {_ORDER} LIMIT :limit"
            f"{'' if sqlite else ' FOR UPDATE SKIP LOCKED'}) RETURNING {RETURNING}"
        ),
        heartbeat=_prepare(
            f"UPDATE jobs SET lease_expires_at = :expires WHERE {_HELD} RETURNING {RETURNING}"
        ),
        finish=_prepare(
            "UPDATE jobs SET status = :status, result = :result, finished_at = :now,"
            f" lease_owner = NULL, lease_expires_at = NULL WHERE {_HELD} RETURNING {RETURNING}"
        ),
        release=_prepare(_RELEASE),
        skip_locked="" if sqlite else " FOR UPDATE SKIP LOCKED",
    )
