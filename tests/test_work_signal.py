"""The idle runner's wake-up signal, made in one thread and waited on in another (as the
runner's loop does)."""

from __future__ import annotations

import threading

import pytest

from storage.db import Database
from storage.queue import JobQueue
from storage.work_signal import open_work_signal


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_signal_made_here_wakes_a_runner_thread(db: Database) -> None:
    signal_ = open_work_signal(db)
    idle = threading.Event()
    woken: list[bool] = []

    def runner_loop() -> None:
        woken.append(signal_.wait(0.01))  # nothing queued yet
        idle.set()
        woken.append(signal_.wait(30.0))

    thread = threading.Thread(target=runner_loop)
    try:
        thread.start()
        assert idle.wait(30.0), "the runner thread never got to wait"
        JobQueue(db).enqueue("generate", requester="u")
        thread.join(timeout=60)
    finally:
        signal_.close()
    assert woken == [False, True]
