"""`atelier demo`: the whole story in a subprocess, then its report and files checked.

The demo runs once per session (1-3 minutes on 2 cores) with its default training
steps, and its measured style is checked (the LoRA trained from chat shows its style with
the trigger and not without); a second, shorter run on the same data folder checks the
reuse path. A third
start is interrupted with SIGINT as soon as its runner is up. The transcript parser and the
progress bar are checked directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from bot.demo.progress import ProgressBar, Snapshot, Validation, render_bar
from bot.demo.story import DEFAULT_STEPS, STYLE, TRIGGER
from bot.demo.transcript import Transcript, parse_block
from storage.db import Database
from storage.job_payloads import GeneratePayload, JobKind, ReplyTarget
from storage.models import DatasetVersion, Generation, Job, JobStatus, ModelVersion, Style, Team
from storage.queue import JobQueue

FIRST_STEPS = DEFAULT_STEPS
SECOND_STEPS = 8
RUN_TIMEOUT_S = 600

needs_runner = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="the demo's runner needs the runner extra (torch, diffusers)",
)


@dataclass(frozen=True)
class DemoRun:
    data_dir: Path
    done: subprocess.CompletedProcess[str]
    report: Path  # a copy of the report folder's index.html, taken right after the run
    leftover_job: int | None = None  # queued before the run, as an interrupted run leaves it

    @property
    def runner_pid(self) -> int:
        match = re.search(r"runner as its own process \(pid (\d+)\)", self.done.stdout)
        assert match, self.done.stdout
        return int(match.group(1))


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["ATELIER_DATA_DIR"] = str(home / "unused-default")
    env.pop("ATELIER_DATABASE_URL", None)
    return env


def _demo(data_dir: Path, steps: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bot.cli", "demo", "--data-dir", str(data_dir)]
    return subprocess.run(
        [*command, "--steps", str(steps)],
        cwd=data_dir.parent,  # no stray .env from the repository
        env=_env(data_dir.parent),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def _snapshot(done: subprocess.CompletedProcess[str], into: Path) -> Path:
    match = re.search(r"^Report: (.+)$", done.stdout, re.MULTILINE)
    assert match, done.stdout + done.stderr
    report = Path(match.group(1))
    shutil.copytree(report.parent, into)
    return into / report.name


@pytest.fixture(scope="session")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    home = tmp_path_factory.mktemp("demo")
    data_dir = home / "data"
    done = _demo(data_dir, FIRST_STEPS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return DemoRun(data_dir, done, _snapshot(done, home / "first-report"))


@pytest.fixture(scope="session")
def second_run(first_run: DemoRun) -> DemoRun:
    leftover = _leave_a_queued_job(first_run.data_dir)
    done = _demo(first_run.data_dir, SECOND_STEPS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = _snapshot(done, first_run.data_dir.parent / "second")
    return DemoRun(first_run.data_dir, done, report, leftover)


def _leave_a_queued_job(data_dir: Path) -> int:
    """A job of the demo's team still queued, as a run interrupted mid-way leaves one."""
    db = Database(f"sqlite:///{data_dir / 'atelier.db'}")
    try:
        with db.session() as s:
            team_id = s.scalar(select(Team.id).where(Team.platform == "console"))
        assert team_id is not None
        target = ReplyTarget(
            platform="console", channel="console", team_id=team_id, requester="you"
        )
        payload = GeneratePayload(
            reply=target, prompt="left over", base_model="tiny-sd15", width=64, height=64, steps=1
        )
        job = JobQueue(db).enqueue(
            JobKind.GENERATE, payload.model_dump(mode="json"), requester="you", team_id=team_id
        )
        return job.id
    finally:
        db.dispose()


@pytest.fixture
def demo_db(first_run: DemoRun) -> Iterator[Database]:
    db = Database(f"sqlite:///{first_run.data_dir / 'atelier.db'}")
    yield db
    db.dispose()


@dataclass
class Figure:
    seed_attr: str
    src: str = ""
    caption: str = ""


class _ReportParser(HTMLParser):
    """Figures (image, visible caption), generation sections, LoRA links."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[Figure] = []
        self.jobs: list[int] = []
        self.loras: list[str] = []
        self._figure: Figure | None = None
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "figure" and a.get("data-seed") is not None:
            self._figure = Figure(str(a["data-seed"]))
        elif tag == "img" and self._figure is not None and not self._figure.src:
            self._figure.src = str(a.get("src"))
        elif tag == "figcaption" and self._figure is not None:
            self._in_caption = True
        elif tag == "section" and a.get("data-job"):
            self.jobs.append(int(str(a["data-job"])))
        elif tag == "a" and a.get("class") == "lora":
            self.loras.append(str(a.get("href")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figcaption":
            self._in_caption = False
        elif tag == "figure" and self._figure is not None:
            self.figures.append(self._figure)
            self._figure = None

    def handle_data(self, data: str) -> None:
        if self._figure is not None and self._in_caption:
            self._figure.caption += data


def _parse_report(path: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _safetensors_metadata(path: Path) -> dict[str, str]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return dict(header["__metadata__"])


# -- the first run --------------------------------------------------------------------------


@needs_runner
def test_demo_prints_its_report_wall_time_and_what_the_model_is(first_run: DemoRun) -> None:
    out, err = first_run.done.stdout, first_run.done.stderr
    assert re.search(r"^Demo wall time: \d+( min \d+)? s\.$", out, re.MULTILINE)
    assert "toy-sd15 is Atelier's own" in out and "ATELIER_BASE_MODELS" in out
    assert "noise" not in out
    # The progress bar came from the runner's progress events, up to the last step.
    assert f"Training {STYLE} [" in err and f"{FIRST_STEPS}/{FIRST_STEPS}" in err
    page = first_run.report.read_text(encoding="utf-8")
    assert "About the model." in page and "ATELIER_BASE_MODELS" in page
    assert "loss-curve.png" in page and "base-vs-style" in page
    # 12 references are too few to hold any out: the page says what the loss was measured on.
    assert "loss on the training images" in page and "held-out loss" not in page


def _measured(out: str, label: str) -> list[int]:
    line = next(x for x in out.splitlines() if x.strip().startswith(label))
    return [int(v) for v in re.findall(r"(\d+)%", line)]


@needs_runner
def test_the_lora_trained_from_chat_learns_its_style(
    first_run: DemoRun,
) -> None:
    out = first_run.done.stdout
    line = next(x for x in out.splitlines() if "Stripe score with the trigger" in x)
    base, trained = (float(v) for v in re.findall(r"(\d+\.\d+)", line))
    (shown_base, shown) = _measured(out, "Stripes show with the trigger (base → trained)")
    (leak,) = _measured(out, "Stripes show without the trigger, LoRA on (a leak)")
    # The style is learned (its score rises well over the base's, measured 0.022 -> 0.406)
    # and stays behind its trigger (measured: shows in 83%, leaks into 0% of 12 images);
    # tests/test_toy_learning.py holds the targets on more prompts and steps.
    assert shown_base <= 10 and trained >= 2 * base, out[-1500:]
    assert shown >= 40 and leak <= 17, out[-1500:]
    page = first_run.report.read_text(encoding="utf-8")
    assert "What the LoRA learned" in page


@needs_runner
def test_the_runner_does_not_outlive_the_demo(first_run: DemoRun) -> None:
    cmdline = Path(f"/proc/{first_run.runner_pid}/cmdline")
    assert not cmdline.exists() or b"gpu_runner" not in cmdline.read_bytes()


@needs_runner
def test_report_names_the_seed_of_every_image_atelier_recorded(
    first_run: DemoRun, demo_db: Database
) -> None:
    parsed = _parse_report(first_run.report)
    assert len(parsed.jobs) == 2  # count=4, and the base-vs-style comparison
    with demo_db.session() as s:
        recorded = [list(s.get(Job, job_id).result["seeds"]) for job_id in parsed.jobs]  # type: ignore[union-attr]
        rows = s.scalars(select(Generation).where(Generation.job_id.in_(parsed.jobs))).all()
    assert recorded == [[7, 8, 9, 10], [7]]
    assert {row.seed for row in rows} == {7}
    shown = [int(f.seed_attr) for f in parsed.figures]
    assert shown == [seed for seeds in recorded for seed in seeds]
    for figure in parsed.figures:
        assert f"Seed {figure.seed_attr}" in figure.caption


@needs_runner
def test_each_png_parameters_chunk_matches_the_seed_shown_beside_it(first_run: DemoRun) -> None:
    figures = _parse_report(first_run.report).figures
    assert len(figures) == 5
    for figure in figures:
        shown = re.match(r"\s*Seed (\d+)", figure.caption)
        assert shown, figure.caption
        with Image.open(first_run.report.parent / figure.src) as image:
            image.load()
            parameters = image.text["parameters"]  # type: ignore[attr-defined]
        in_file = re.search(r"\bSeed: (\d+)", parameters)
        assert in_file and in_file.group(1) == shown.group(1), (figure.src, parameters)
        assert TRIGGER in parameters.split("\n")[0] and "Size: 64x64" in parameters


@needs_runner
def test_exported_lora_next_to_the_report_carries_the_trigger(
    first_run: DemoRun, demo_db: Database
) -> None:
    links = _parse_report(first_run.report).loras
    assert sorted(links) == [f"lora/{TRIGGER}-diffusers.safetensors", f"lora/{TRIGGER}.safetensors"]
    kohya = first_run.report.parent / f"lora/{TRIGGER}.safetensors"
    meta = _safetensors_metadata(kohya)
    assert meta["modelspec.trigger_phrase"] == TRIGGER
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v1")
    # The very file the first run's model version holds (blobs are named by sha256).
    with demo_db.session() as s:
        kohya_blob = s.scalar(select(ModelVersion.kohya_blob).where(ModelVersion.version == 1))
    assert hashlib.sha256(kohya.read_bytes()).hexdigest() == kohya_blob


@needs_runner
def test_transcript_shows_a_refused_teammate_then_the_leads_approval(first_run: DemoRun) -> None:
    page = first_run.report.read_text(encoding="utf-8")
    refused = page.index("Only art leads can approve")
    approved = page.index("you approved <b>stripes</b> dataset v1 (12 images)")
    assert refused < approved
    assert "sam</span>reacted ✅" in page


# -- running it again ---------------------------------------------------------------------


@needs_runner
def test_a_second_run_reuses_the_style_and_dataset_and_trains_a_new_version(
    second_run: DemoRun,
) -> None:
    out = second_run.done.stdout
    assert f"Canceled job #{second_run.leftover_job} (generate) left over" in out
    assert f"Reusing the style {STYLE}" in out and "Reusing the approved dataset v1" in out
    assert "> /style create" not in out and "> /style add" not in out
    page = second_run.report.read_text(encoding="utf-8")
    assert f"Training {STYLE} v2" in page
    kohya = second_run.report.parent / f"lora/{TRIGGER}.safetensors"
    assert _safetensors_metadata(kohya)["modelspec.trigger_phrase"] == TRIGGER
    db = Database(f"sqlite:///{second_run.data_dir / 'atelier.db'}")
    try:
        with db.session() as s:
            assert len(s.scalars(select(Style)).all()) == 1
            assert len(s.scalars(select(DatasetVersion)).all()) == 1
            assert sorted(v.version for v in s.scalars(select(ModelVersion))) == [1, 2]
            leftover = s.get(Job, second_run.leftover_job)
            assert leftover is not None and leftover.status == JobStatus.CANCELED
    finally:
        db.dispose()


@needs_runner
def test_ctrl_c_stops_the_demo_and_its_runner(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    command = [sys.executable, "-m", "bot.cli", "demo", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        pid = None
        for line in proc.stdout:
            found = re.search(r"runner as its own process \(pid (\d+)\)", line)
            if found:
                pid = int(found.group(1))
                break
        assert pid is not None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Demo interrupted; the runner was stopped." in err
    cmdline = Path(f"/proc/{pid}/cmdline")
    assert not cmdline.exists() or b"gpu_runner" not in cmdline.read_bytes()


# -- pieces, without a runner ---------------------------------------------------------------


def test_console_blocks_parse_into_messages_and_edits_replace_in_place() -> None:
    transcript = Transcript()
    transcript.command("you", "/style review ink")
    transcript.add_blocks(
        [
            "[5] atelier (thread of [2]): 📋 **ink** v1\nArt leads: ✅\n"
            "    📎 /tmp/c/0005-sheet.png",
            "[6] atelier (only you): Only art leads can approve",
            "You are now sam.",
        ]
    )
    transcript.add_blocks(["[5] atelier (thread of [2]) (edited): 📋 **ink** v1\n✅ Approved"])
    kinds = [e.kind for e in transcript.entries]
    assert kinds == ["command", "message", "message", "console"]
    sheet = transcript.message(5)
    assert sheet is not None and sheet.edited and sheet.thread == 2
    assert sheet.text == "📋 **ink** v1\n✅ Approved"
    assert sheet.files == (Path("/tmp/c/0005-sheet.png"),)  # the edit kept the sheet's image
    private = transcript.message(6)
    assert private is not None and private.private and not private.files
    assert parse_block("(your ✅ on [5] changed nothing)").kind == "console"


def test_progress_bar_draws_steps_loss_and_held_out_loss() -> None:
    snap = Snapshot.of(60, 120, {"loss": 0.7123, "steps_per_s": 3.0, "lr": 1e-3})
    line = render_bar("Training ink", snap, Validation(0.82, 1.13))
    assert line.startswith("Training ink [" + "#" * 15 + "." * 15 + "] 60/120")
    assert "loss 0.712" in line and "val held-out 0.820 (base 1.130)" in line
    assert "ETA 20 s" in line
    log = io.StringIO()  # not a terminal: a line per tenth of the way, not per step
    bar = ProgressBar("Training ink", log)
    for step in range(1, 121):
        data = {"loss": 1.0, "val_loss": 0.5, "base_val_loss": 1.0} if step == 100 else {}
        bar.update(Snapshot.of(step, 120, data))
    bar.finish()
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].endswith("120/120 · val held-out 0.500 (base 1.000)")
    # A small set validates on its training images (the runner's event says), and so does
    # the bar.
    log = io.StringIO()
    bar = ProgressBar("Training ink", log)
    bar.update(Snapshot.of(60, 60, {"val_loss": 0.4, "base_val_loss": 0.5, "held_out": False}))
    assert log.getvalue().rstrip().endswith("val on the training images 0.400 (base 0.500)")


def test_the_demo_module_loads_neither_torch_nor_the_runner() -> None:
    code = (
        "import sys, bot.cli, bot.demo, bot.demo.story; "
        "bad = {'torch', 'diffusers', 'gpu_runner'} & set(sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
