"""Job queue benchmark: enqueue -> claim -> complete throughput and enqueue-to-claim latency.

Runs 1 and 4 runner processes on SQLite (WAL) and on PostgreSQL, and prints a table.

    .venv/bin/python bench/queue.py [--jobs 2000] [--latency-samples 200] [--postgres URL]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the stdlib `queue`; keep its folder off the import path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # shared test helpers

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import func, select
from throwaway_db import throwaway_postgres

from storage.db import Database
from storage.models import Job, JobStatus
from storage.queue import JobQueue
from storage.work_signal import open_work_signal

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def runner_main(url: str, worker_id: str, ready: mp.Barrier, stop: mp.Event) -> None:
    db = Database(url)
    queue = JobQueue(db)
    signal = open_work_signal(db)
    ready.wait()
    while not stop.is_set():
        job = queue.claim(worker_id)
        if job is None:
            signal.wait(0.05)
            continue
        latency = time.time() - job.payload["t"]
        queue.complete(job.id, worker_id, {"latency": latency})
    signal.close()


@contextmanager
def fresh_database(backend: str, postgres_url: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            Database(url).upgrade()
            yield url
        return
    with throwaway_postgres(postgres_url, "atelier_bench") as url:
        yield url


def _wait_until_done(db: Database, total: int) -> None:
    signal = open_work_signal(db)
    try:
        while True:
            with db.session() as s:
                done = s.scalar(select(func.count(Job.id)).where(Job.status == JobStatus.SUCCEEDED))
            if done >= total:
                return
            signal.wait(0.05)
    finally:
        signal.close()


def measure(url: str, runners: int, jobs: int, samples: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Barrier(runners + 1), ctx.Event()
    procs = [
        ctx.Process(target=runner_main, args=(url, f"r{n}", ready, stop)) for n in range(runners)
    ]
    for proc in procs:
        proc.start()
    db = Database(url)
    queue = JobQueue(db)
    try:
        ready.wait()
        # Latency: one job at a time, so a runner is idle when each arrives.
        for n in range(samples):
            queue.enqueue("bench", {"t": time.time()}, requester=f"lat{n % 5}")
            _wait_until_done(db, n + 1)
        with db.session() as s:
            latencies = sorted(
                job.result["latency"] * 1000 for job in s.scalars(select(Job)) if job.result
            )
        # Throughput: a burst from one producer while the runners drain it.
        started = time.time()
        for n in range(jobs):
            queue.enqueue("bench", {"t": time.time()}, requester=f"user{n % 10}")
        _wait_until_done(db, samples + jobs)
        elapsed = time.time() - started
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=30)
        db.dispose()
    return {
        "throughput": jobs / elapsed,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()

    print(f"{args.jobs} jobs end to end; {args.latency_samples} enqueue->claim samples (idle)")
    print(f"{'backend':<10} {'runners':>7} {'jobs/s':>9} {'claim p50 ms':>13} {'p99 ms':>9}")
    for backend in args.backends.split(","):
        for runners in (1, 4):
            with fresh_database(backend, args.postgres) as url:
                r = measure(url, runners, args.jobs, args.latency_samples)
            print(
                f"{backend:<10} {runners:>7} {r['throughput']:>9.0f} "
                f"{r['p50']:>13.1f} {r['p99']:>9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
