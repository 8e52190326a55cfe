"""The demo's GPU runner: `python -m gpu_runner` as a child process it never outlives.

The bot side never imports the runner (or torch): it starts it as its own process, like a
studio runs `atelier runner` beside the bot. Stopping: SIGTERM (the runner finishes its
loop and exits), then SIGKILL if it does not exit in time. On Linux the child also asks the
kernel for SIGTERM when the demo dies, so even a killed demo leaves no runner behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RunnerProcess:
    """`with RunnerProcess(env, log) as runner:` starts it; leaving the block stops it."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        device: str = "cpu",
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.device = device
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "gpu_runner", "--device", self.device]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C reaches the demo, which then stops the runner.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                # Busy in a long step (SIGTERM waits for the job): end it now; the job's
                # lease expires and the queue takes it back.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> RunnerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
