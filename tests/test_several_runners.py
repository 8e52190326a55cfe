"""Three runner processes share one PostgreSQL queue: 300 mixed jobs, each done exactly once.

Nothing in a finished job says which runner ran it (the lease owner is cleared when it
ends), so the test database gets a trigger that logs every queued -> running claim with
its lease owner. That log shows both that no job was claimed twice and who did the work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from runner_seed import approved_style, enqueue_generate, enqueue_training, generate_payload
from sqlalchemy import create_engine, select, text

from storage.blobs import BlobStore
from storage.db import Database
from storage.job_payloads import JobKind, result_key
from storage.models import (
    Base,
    Generation,
    Job,
    JobStatus,
    ModelVersion,
    OutboxMessage,
    Style,
)
from storage.queue import JobQueue

pytest_plugins = ("runner_fixtures",)
pytestmark = [pytest.mark.postgres, pytest.mark.runner]

RUNNERS = ("runner-a", "runner-b", "runner-c")
TOTAL_JOBS = 300
TRAININGS = 3
MISSING_MODEL = "sdxl-not-configured"
MISSING_MODEL_JOBS = 6  # 5 generations and 1 training
TOO_BIG_JOBS = 4
TOO_MUCH_MEMORY_MB = 1 << 30  # a petabyte: more than any runner's device has
NO_MODEL, NO_MEMORY = "a base model no runner has", "more memory than any runner has"
REQUESTERS = ("ana", "ben", "chen", "dara", "eli", "fox")
ROOT = Path(__file__).parents[1]

_CLAIM_LOG = """
CREATE TABLE test_claims (job_id BIGINT NOT NULL, worker TEXT NOT NULL);
CREATE FUNCTION test_log_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_claims (job_id, worker) VALUES (NEW.id, NEW.lease_owner);
    RETURN NEW;
END $$;
CREATE TRIGGER test_log_claim AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (OLD.status = 'queued' AND NEW.status = 'running') EXECUTE FUNCTION test_log_claim();
"""
_DROP_CLAIM_LOG = """
DROP TRIGGER IF EXISTS test_log_claim ON jobs;
DROP FUNCTION IF EXISTS test_log_claim();
DROP TABLE IF EXISTS test_claims;
"""


@dataclass
class Stores:
    db: Database
    blobs: BlobStore
    queue: JobQueue


@pytest.fixture
def claim_logged_database(postgres_database: str) -> Iterator[str]:
    """The session's PostgreSQL database, emptied, with every job claim logged."""
    engine = create_engine(postgres_database)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(_DROP_CLAIM_LOG))
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        conn.execute(text(_CLAIM_LOG))
    try:
        yield postgres_database
    finally:
        with engine.begin() as conn:
            conn.execute(text(_DROP_CLAIM_LOG))
        engine.dispose()


@dataclass
class Seeded:
    runnable: dict[int, str] = field(default_factory=dict)  # job id -> kind
    train_runs: dict[int, int] = field(default_factory=dict)  # job id -> training run id
    unclaimable: dict[int, str] = field(default_factory=dict)  # job id -> why
    missing_model_run: int = 0


def _seed(stores: Stores, demo_items: list[tuple[Any, str]]) -> Seeded:
    """3 short trainings, 287 tiny generations across 6 batch keys and 6 requesters, and,
    interleaved, 10 jobs no runner may claim: 5 generations and 1 training for a base model
    none has, 4 generations needing more device memory than any has."""
    styles = [
        approved_style(stores, demo_items, f"team-{n}", name=f"ink{n}", trigger=f"ink{n}style")
        for n in range(TRAININGS)
    ]
    lost_style = approved_style(
        stores, demo_items, "team-x", name="xl", trigger="xlstyle", base_model=MISSING_MODEL
    )
    with stores.db.session() as s:
        teams = [s.get(Style, style_id).team_id for style_id in styles]  # type: ignore[union-attr]
    seeded = Seeded()
    train_at = {TOTAL_JOBS * (k + 1) // (TRAININGS + 1): k for k in range(TRAININGS)}
    lost_at = {
        TOTAL_JOBS * (k + 1) // (MISSING_MODEL_JOBS + 1) + 7 for k in range(MISSING_MODEL_JOBS - 1)
    }
    big_at = {TOTAL_JOBS * (k + 1) // (TOO_BIG_JOBS + 1) + 3 for k in range(TOO_BIG_JOBS)}
    generated = 0
    for slot in range(TOTAL_JOBS - 1):  # the last slot: a training no runner can run
        if slot in train_at:
            run_id, job_id = enqueue_training(
                stores, styles[train_at[slot]], steps=10, checkpoint_every=5
            )
            seeded.runnable[job_id] = JobKind.TRAIN
            seeded.train_runs[job_id] = run_id
            continue
        if slot in lost_at:
            payload = generate_payload(teams[0], base_model=MISSING_MODEL, seed=slot)
            seeded.unclaimable[enqueue_generate(stores, payload)] = NO_MODEL
            continue
        if slot in big_at:
            # A size of its own: the bot gives every job of one batch key the same need.
            payload = generate_payload(teams[1], seed=slot, width=128, height=128)
            job_id = enqueue_generate(stores, payload, min_memory_mb=TOO_MUCH_MEMORY_MB)
            seeded.unclaimable[job_id] = NO_MEMORY
            continue
        n = generated
        generated += 1
        payload = generate_payload(
            teams[n % TRAININGS],
            prompt=f"a harbour at dawn, study {n}",
            requester=REQUESTERS[n % len(REQUESTERS)],
            steps=2 + n % 3,
            cfg=(5.0, 7.0)[n // 3 % 2],
            seed=n,
        )
        seeded.runnable[enqueue_generate(stores, payload)] = JobKind.GENERATE
    seeded.missing_model_run, job_id = enqueue_training(stores, lost_style, steps=10)
    seeded.unclaimable[job_id] = NO_MODEL
    assert len(seeded.runnable) + len(seeded.unclaimable) == TOTAL_JOBS
    assert len(seeded.unclaimable) == MISSING_MODEL_JOBS + TOO_BIG_JOBS
    return seeded


def _start_runner(worker: str, data_dir: Path, database_url: str, log: Path) -> Any:
    env = {
        **os.environ,
        "ATELIER_DATA_DIR": str(data_dir),
        "ATELIER_DATABASE_URL": database_url,
        "ATELIER_DEVICE": "cpu",
        "ATELIER_BASE_MODELS": "{}",
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    env.pop("ATELIER_FAILPOINTS", None)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gpu_runner", "--until-idle", "--id", worker],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_three_runners_share_300_mixed_jobs_each_done_once(
    claim_logged_database: str, tmp_path: Path, demo_items: list[tuple[Any, str]]
) -> None:
    data_dir = tmp_path / "data"
    db = Database(claim_logged_database)
    stores = Stores(db, BlobStore(data_dir / "blobs", 2_000_000_000), JobQueue(db))
    seeded = _seed(stores, demo_items)

    # Everything is queued before any runner starts, so none sees an empty queue and exits
    # before the others are up; each exits once nothing it can run is left.
    logs = {worker: tmp_path / f"{worker}.log" for worker in RUNNERS}
    procs = {w: _start_runner(w, data_dir, claim_logged_database, logs[w]) for w in RUNNERS}
    for worker, proc in procs.items():
        try:
            code = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            pytest.fail(f"{worker} did not finish:\n{logs[worker].read_text()[-3000:]}")
        assert code == 0, f"{worker} exited {code}:\n{logs[worker].read_text()[-3000:]}"

    with db.session() as s:
        jobs = {job.id: job for job in s.scalars(select(Job))}
        generations = Counter(s.scalars(select(Generation.job_id)))
        versions = Counter(s.scalars(select(ModelVersion.training_run_id)))
        results = {
            row.key: row.revision
            for row in s.scalars(select(OutboxMessage).where(OutboxMessage.key.like("job:%")))
            if row.key.endswith(":result")
        }
        claims = s.execute(text("SELECT job_id, worker FROM test_claims")).all()
    db.dispose()
    claims_per_job = Counter(job_id for job_id, _ in claims)

    assert len(jobs) == TOTAL_JOBS
    # No runner has that base model or that much memory: never claimed, still waiting.
    for job_id, why in seeded.unclaimable.items():
        job = jobs[job_id]
        state = (job.status, job.attempts, job.lease_owner)
        assert state == (JobStatus.QUEUED, 0, None), f"job {job_id} ({why}) was claimed: {state}"
        assert job_id not in claims_per_job and job_id not in generations, why
    assert seeded.missing_model_run not in versions

    for job_id, kind in seeded.runnable.items():
        job = jobs[job_id]
        assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1), (job_id, job.error)
        assert claims_per_job[job_id] == 1, f"job {job_id} was claimed {claims_per_job[job_id]}x"
        assert results.get(result_key(job_id)) == 1, f"job {job_id}: result not posted once"
        if kind == JobKind.GENERATE:
            assert generations[job_id] == 1, f"job {job_id} has {generations[job_id]} rows"
        else:
            run_id = seeded.train_runs[job_id]
            assert versions[run_id] == 1, f"run {run_id} has {versions[run_id]} model versions"
    assert len(results) == len(seeded.runnable)
    assert sum(generations.values()) == sum(k == JobKind.GENERATE for k in seeded.runnable.values())
    assert sum(versions.values()) == TRAININGS

    by_runner = Counter(worker for _, worker in claims)
    print(f"\njobs claimed per runner: {dict(sorted(by_runner.items()))}")
    assert set(by_runner) <= set(RUNNERS)
    assert len(by_runner) > 1, f"one runner did all the work: {by_runner}"
