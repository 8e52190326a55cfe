"""A runner stand-in for queue tests, run as its own process.

drain URL WORKER  claim and complete jobs until none is left; print each id as done
hold URL WORKER   claim one job, print its id, then block on stdin (to be SIGKILLed)
"""

from __future__ import annotations

import sys

from storage.db import Database
from storage.queue import JobQueue


def main() -> None:
    mode, url, worker = sys.argv[1:4]
    lease = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
    queue = JobQueue(Database(url), lease_seconds=lease)
    if mode == "drain":
        while (job := queue.claim(worker)) is not None:
            queue.complete(job.id, worker, {"by": worker})
            print(job.id, flush=True)
    elif mode == "hold":
        job = queue.claim(worker)
        print(job.id if job else "none", flush=True)
        sys.stdin.read()
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
