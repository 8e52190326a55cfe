"""The console adapter: the same commands in a terminal, driven here as the demo drives it."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.cli import main as cli_main
from bot.console import (
    PLATFORM,
    ConsoleSender,
    ConsoleSession,
    console_counter,
    first_free_number,
    open_console,
)
from bot.console import main as console_main
from bot.core import CommandCore, CorePolicy
from bot.delivery import OutboxDeliverer
from storage.blobs import BlobStore
from storage.db import Database
from storage.job_payloads import TrainPayload
from storage.models import DatasetStatus, DatasetVersion, Job, OutboxMessage, TrainingRun
from storage.outbox import Outbox
from storage.queue import JobQueue

pytest.register_assert_rewrite("bot_fixtures")
from bot_fixtures import make_settings, png_bytes  # noqa: E402

pytest_plugins = ("bot_fixtures",)


def _session(db: Database, tmp: Path) -> ConsoleSession:
    settings = make_settings(tmp)
    blobs = BlobStore(settings.blob_dir, settings.max_blob_bytes)
    outbox = Outbox(db)
    core = CommandCore(
        db, blobs, settings, JobQueue(db), outbox, policy=CorePolicy(rate_limit_commands=100)
    )
    out = tmp / "console-out"
    sender = ConsoleSender(out, console_counter(db, out))
    deliverer = OutboxDeliverer(outbox, blobs, sender, PLATFORM)
    return ConsoleSession(core, deliverer, out, base_dir=tmp)


def _number(blocks: list[str], marker: str) -> int:
    """The message number of the printed block containing `marker`."""
    block = next(b for b in blocks if marker in b)
    match = re.match(r"\[(\d+)\]", block)
    assert match is not None
    return int(match.group(1))


def _pictures(tmp: Path, *seeds: int) -> None:
    for seed in seeds:
        (tmp / f"p{seed}.png").write_bytes(png_bytes(seed))


def test_console_end_to_end_create_add_review_react_train(db: Database, tmp_path: Path) -> None:
    _pictures(tmp_path, 1, 2, 3)
    (tmp_path / "notes.txt").write_text("not an image")
    session = _session(db, tmp_path)

    out = session.run_line("/style create ink inkstyle")
    assert out[0].startswith("[1] atelier: Created style **ink**")
    thread = _number(out, "Post reference images in this thread")

    out = session.run_line("/style add ink ./p1.png p2.png ./notes.txt")
    assert "added 2 of 3 files" in out[0] and "✗ notes.txt is not an image" in out[0]
    out = session.run_line(f"reply {thread} ./p3.png")
    assert "draft v1: added 1 of 1 file; the draft has 3 images" in out[0]
    assert "No such file: ./missing.png" in session.run_line("/style add ink ./missing.png")[0]

    out = session.run_line("/style review ink")
    sheet = _number(out, "📋")
    assert f"(thread of [{thread}])" in next(b for b in out if "📋" in b)
    saved = re.search(r"📎 (\S+review\.png)", "\n".join(out))
    assert saved is not None and Path(saved.group(1)).read_bytes().startswith(b"\x89PNG")
    assert sum("ink #" in b for b in out) == 3  # one card per image

    assert session.run_line("as sam")[0] == "You are now sam."
    refused = session.run_line(f"react {sheet} ✅")
    assert "Only art leads can approve" in refused[0] and "(only you)" in refused[0]
    session.run_line("as you lead")
    approved = session.run_line(f"react {sheet} approve")
    assert "approved **ink** dataset v1 (3 images)" in approved[0]
    assert any(b.startswith(f"[{sheet}] ") and "(edited)" in b for b in approved)
    with db.session() as s:
        assert s.scalar(select(DatasetVersion.status)) == DatasetStatus.APPROVED

    out = session.run_line("/style train ink steps=20")
    assert "Training **ink**" in out[0] and "1st in line" in out[0]
    with db.session() as s:
        (job,) = s.scalars(select(Job))
        (run,) = s.scalars(select(TrainingRun))
    assert job.kind == "train" and run.params["steps"] == 20
    assert TrainPayload.model_validate(job.payload).reply.platform == "console"
    # What the runner posts later comes out on the next line, or while waiting.
    session.core.services.outbox.put(
        f"job:{job.id}:progress", platform="console", channel="console", text="step 5/20"
    )
    waited = session.run_line("wait 0")
    assert len(waited) == 1 and "step 5/20" in waited[0]
    assert "Unknown console command 'dance'" in session.run_line("dance")[0]
    assert "react N EMOJI" in session.run_line("help")[0]
    assert session.run_line("# a comment") == [] and session.run_line("") == []


def test_message_numbers_continue_after_a_restart(db: Database, tmp_path: Path) -> None:
    first = _session(db, tmp_path)
    first.run_line("/style create ink inkstyle")
    numbers = [int(n) for n in re.findall(r"\[(\d+)\]", "\n".join(first.run_line("/style list")))]
    second = _session(db, tmp_path)
    out = second.run_line("/style list")
    assert _number(out, "Styles") > max(numbers)
    # Without the folder's record, the outbox alone still keeps posted ids unique.
    with db.session() as s:
        assert first_free_number(db) > int(s.scalar(select(OutboxMessage.platform_message_id)) or 0)


def test_scripted_console_from_stdin(tmp_path: Path) -> None:
    _pictures(tmp_path, 1)
    settings = make_settings(tmp_path)
    script = io.StringIO(
        f"/style create ink inkstyle\n/style add ink {tmp_path}/p1.png\nquit\n/jobs\n"
    )
    out = io.StringIO()
    assert console_main(settings, stdin=script, stdout=out) == 0
    text = out.getvalue()
    assert "> /style create ink inkstyle" in text and "✓ p1.png → #1" in text
    assert "/jobs" not in text  # quit stops the script


def test_atelier_bot_console_runs_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setattr(sys, "stdin", io.StringIO("/style list\n"))
    assert cli_main(["bot", "console"]) == 0
    assert "This team has no styles yet" in capsys.readouterr().out
    session = open_console(make_settings(tmp_path))
    assert session.out_dir == tmp_path / "data" / "console"
