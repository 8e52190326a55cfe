"""`atelier runner` (python -m gpu_runner): claim and run jobs on this machine's GPU.

SIGTERM (docker stop, systemd) or Ctrl-C stops it gracefully: the job at hand stops after
its current step (a training writes a checkpoint first), goes straight back to the queue,
and the runner exits. A second signal ends it at once.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING

from storage.db import SchemaOutOfDate
from storage.job_payloads import JobKind
from storage.settings import ConfigError, load_settings
from storage.work_signal import open_work_signal

if TYPE_CHECKING:
    from gpu_runner.services import RunnerServices
    from gpu_runner.worker import Runner

log = logging.getLogger("gpu_runner")


def build_runner(
    services: RunnerServices,
    kinds: Sequence[str],
    worker_id: str,
    stopping: threading.Event | None = None,
) -> Runner:
    """The runner for these services; it reads the device's free memory at each claim."""
    from gpu_runner.jobs import handlers
    from gpu_runner.worker import Runner

    return Runner(
        queue=services.queue,
        outbox=services.outbox,
        handlers={kind: partial(handlers[kind], services) for kind in kinds},
        worker_id=worker_id,
        base_models=services.models.names(),
        memory_mb=lambda: services.memory_mb,
        stopping=stopping,
    )


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set `stop`; a second one of either exits at once (default action)."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info("%s: stopping after the current step", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


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
    stop = threading.Event()
    stop_on_signals(stop)  # first, so a stop while models load is not lost
    try:
        settings = load_settings()
        from gpu_runner.services import open_services

        services = open_services(settings, device=args.device)
        # torch, diffusers and transformers leave millions of long-lived objects: frozen, the
        # collector stops walking them in every full pass and at exit (measured: a stop took
        # 3.4 s, most of it the exit's collection).
        gc.freeze()
    except (ConfigError, SchemaOutOfDate, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(JobKind)
    if unknown:
        print(f"unknown job kind(s) {', '.join(sorted(unknown))}; use {', '.join(JobKind)}")
        return 2
    runner = build_runner(services, kinds, args.id, stopping=stop)
    log.info("runner %s on %s (%s)", args.id, services.device.device, services.device.dtype)
    if args.until_idle:
        while runner.run_once():
            pass
        return 0
    work = open_work_signal(services.db)
    try:
        runner.run_forever(work, stop)
    finally:
        work.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
