"""`atelier runner` (python -m gpu_runner): claim and run jobs on this machine's GPU."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from functools import partial

from storage.db import SchemaOutOfDate
from storage.job_payloads import JobKind
from storage.settings import ConfigError, load_settings
from storage.work_signal import open_work_signal

log = logging.getLogger("gpu_runner")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atelier runner", description=__doc__)
    parser.add_argument("--device", help="cpu, mps, cuda or cuda:N (default: ATELIER_DEVICE)")
    parser.add_argument("--id", default=f"{socket.gethostname()}:{os.getpid()}")
    parser.add_argument(
        "--kinds", default=",".join(JobKind), help="job kinds to take (default: all)"
    )
    parser.add_argument(
        "--until-idle", action="store_true", help="exit once the queue has nothing left for it"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        settings = load_settings()
        from gpu_runner.jobs import handlers
        from gpu_runner.services import open_services
        from gpu_runner.worker import Runner

        services = open_services(settings, device=args.device)
    except (ConfigError, SchemaOutOfDate, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(JobKind)
    if unknown:
        print(f"unknown job kind(s) {', '.join(sorted(unknown))}; use {', '.join(JobKind)}")
        return 2
    runner = Runner(
        queue=services.queue,
        outbox=services.outbox,
        handlers={kind: partial(handlers[kind], services) for kind in kinds},
        worker_id=args.id,
        base_models=services.models.names(),
        memory_mb=services.memory_mb,
    )
    log.info("runner %s on %s (%s)", args.id, services.device.device, services.device.dtype)
    if args.until_idle:
        while runner.run_once():
            pass
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    work = open_work_signal(services.db)
    try:
        runner.run_forever(work, stop)
    finally:
        work.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
