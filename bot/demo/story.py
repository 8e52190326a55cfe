"""`atelier demo`: the whole story on the built-in `toy-sd15`, driven through the console.

Create a style with a trigger word, add 12 reference images (toy-world scenes with striped
shapes) and caption them, an art lead approves the review sheet with ✅, train (a progress
bar on stderr), generate 4 images with the trigger word and a base-vs-style comparison,
measure the style with the toy world's metrics on held-out prompts (with the trigger, and
with the LoRA on but no trigger, so a leak would show), export the LoRA; then write an HTML
report.

Run again on the same data directory, it keeps what is there: the style and its approved
dataset are reused, and each run trains a new model version and writes a fresh report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from sqlalchemy import func, select

from bot.console import CONSOLE_TEAM, ConsoleSession, open_console
from bot.core.review import review_key
from bot.core.teams import find_style, find_team
from bot.demo import collect
from bot.demo.progress import ProgressBar, Snapshot
from bot.demo.references import Reference, held_out_prompts, write_references
from bot.demo.report import (
    REAL_WEIGHTS_HELP,
    TOY_NOTE,
    DemoReport,
    Measurement,
    ReportFile,
    write_report,
)
from bot.demo.runner_process import RunnerProcess
from bot.demo.scoring import Tally, panels
from bot.demo.transcript import Entry, Transcript
from storage.datasets import images_of, latest_approved, latest_version
from storage.models import DatasetStatus, Job, JobStatus
from storage.queue import JobView
from storage.settings import Settings, load_settings
from toyworld.scenes import Scene

STYLE = "stripes"
TRIGGER = "zxstripes"
BASE_MODEL = "toy-sd15"
REFERENCE_COUNT = 12
# toy-sd15's training defaults (gpu_runner/jobs/train.py) show the stripes in 83% of 30
# held-out prompts after 50 steps (bench/style.py: 83% at 100 too): 60 keep the demo under a
# minute on 2 cores.
DEFAULT_STEPS = 60
SHOWCASE = held_out_prompts(1)[0]
# The trigger goes last: toy-sd15 saw made-up words only at the end of its captions, and
# with CLIP's causal attention the words after one would read differently (with the first
# weights colour fell from 90% to 30%).
PROMPT = f"{SHOWCASE.caption}, {TRIGGER}"
IMAGE_OPTIONS = "seed=7"  # toy-sd15's own size (64 px), steps, sampler and CFG
# Held-out prompts scored with and without the trigger; 2 seeds each.
MEASURE_PROMPTS = 6
MEASURE_OPTIONS = "seed=100 count=2"
LEAD = "you"
TEAMMATE = "sam"


class DemoError(Exception):
    """A step of the demo did not do what it should; the message says which and why."""


@dataclass(frozen=True)
class DemoOptions:
    data_dir: Path
    steps: int = DEFAULT_STEPS
    job_timeout_s: float = 900.0


@dataclass(frozen=True)
class DemoResult:
    report: Path
    wall_s: float
    model_version: int
    lora_files: list[Path]
    reused: list[str] = field(default_factory=list)
    runner_pid: int | None = None
    measurement: Measurement | None = None


def demo_settings(data_dir: Path) -> Settings:
    """The embedded default in the demo's own folder: SQLite, the toy model, the CPU."""
    data_dir = data_dir.resolve()
    return load_settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{(data_dir / 'atelier.db').as_posix()}",
        auto_migrate=True,
        device="cpu",
        default_base_model=BASE_MODEL,
    )


def runner_environment(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    # The tiny model gains nothing from more threads, and on a busy 2-core machine torch's
    # spinning OpenMP threads made training 10x slower (26 s vs 4 min measured): one thread.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(
        ATELIER_DATA_DIR=str(settings.data_dir),
        ATELIER_DATABASE_URL=settings.database_url,
        ATELIER_AUTO_MIGRATE="true",
        ATELIER_DEVICE="cpu",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONUNBUFFERED="1",
    )
    return env


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


class Demo:
    def __init__(self, options: DemoOptions, out: TextIO, err: TextIO) -> None:
        self.options = options
        self.data_dir = options.data_dir.resolve()
        self.out = out
        self.err = err
        self.settings = demo_settings(self.data_dir)
        self.transcript = Transcript()
        self.reused: list[str] = []
        self.who = LEAD
        self.session: ConsoleSession | None = None
        self.runner: RunnerProcess | None = None

    # -- the story -------------------------------------------------------------------------

    def run(self) -> DemoResult:
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._print(
            f"Atelier demo in {self.data_dir} (SQLite, built-in {BASE_MODEL}, CPU).\n"
            f"Note: {TOY_NOTE}"
        )
        session = open_console(self.settings, out_dir=self.data_dir / "console")
        session.base_dir = self.data_dir / "references"
        self.session = session
        self._cancel_leftovers()
        self.runner = RunnerProcess(runner_environment(self.settings), self.data_dir / "runner.log")
        try:
            # First: its imports (about 9 s) run while the references are drawn and approved.
            self.runner.start()
            self._print(f"Started the runner as its own process (pid {self.runner.pid}).")
            refs = write_references(session.base_dir, REFERENCE_COUNT)
            self._style()
            self._dataset(refs)
            train_job, train_s = self._train()
            # All queued before any is drawn, so the runner batches them into a few calls.
            jobs, queued_at = self._generate()
            scenes, with_trigger, without = self._queue_measurements()
            self._show_generations(jobs, queued_at)
            measurement = self._measure(scenes, with_trigger, without)
            export = self._export()
        except BaseException:
            self._cancel_active()
            self.runner.stop_timeout_s = 5.0
            raise
        finally:
            self.runner.stop()
        self._print(f"Stopped the runner (pid {self.runner.pid}).")
        return self._finish(started, train_job, train_s, jobs, measurement, export)

    def _style(self) -> None:
        if self._style_exists():
            self._reuse(f"style {STYLE} (trigger {TRIGGER})")
            return
        self._note("A teammate creates a style with a made-up trigger word.")
        self._say(f"/style create {STYLE} {TRIGGER} style {BASE_MODEL}")
        if not self._style_exists():
            raise DemoError(f"creating the style failed: {self._last_text()}")

    def _dataset(self, refs: list[Reference]) -> None:
        approved = self._approved_images()
        if approved is not None:
            version, count = approved
            self._reuse(f"approved dataset v{version} ({count} images)")
            return
        self._note(
            f"They add {len(refs)} reference images (made by the demo): toy-world shapes "
            "filled with diagonal stripes."
        )
        self._say(f"/style add {STYLE} " + " ".join(ref.name for ref in refs))
        self._note("They caption each image with what it shows, and the trigger word.")
        for number, ref in enumerate(refs, start=1):
            self._say(f"/style caption {STYLE} {number} {ref.caption}, {TRIGGER}")
        self._note("They ask for a review: Atelier posts a contact sheet and one card per image.")
        self._say(f"/style review {STYLE}")
        sheet = self._review_sheet_number()
        self._note("A teammate without the art-lead role reacts: nothing changes.")
        self._say(f"as {TEAMMATE}")
        self._say(f"react {sheet} ✅")
        self._note("The art lead approves the dataset with ✅ on the review sheet.")
        self._say(f"as {LEAD} lead")
        self._say(f"react {sheet} ✅")
        if self._approved_images() is None:
            raise DemoError(f"approving the dataset failed: {self._last_text()}")

    def _train(self) -> tuple[int, float]:
        self._note(f"Train a LoRA on the approved images ({self.options.steps} steps on the CPU).")
        job_id = self._one_new_job(f"/style train {STYLE} steps={self.options.steps}")
        started = time.monotonic()
        bar = ProgressBar(f"Training {STYLE}", self.err)
        blocks = self._wait([job_id], bar)
        bar.finish()
        for entry in self._latest_versions(self.transcript.add_blocks(blocks)):
            self._print(_block_text(entry))
        self._check_succeeded([job_id], "training")
        seconds = time.monotonic() - started
        self._print(f"(Training took {_duration(seconds)}.)")
        return job_id, seconds

    def _generate(self) -> tuple[list[int], float]:
        self._note("Anyone can now generate with the trigger word; every result carries its seed.")
        jobs = [self._one_new_job(f"/imagine {PROMPT} {IMAGE_OPTIONS} count=4", wait=False)]
        self._note("The same seed with and without the style, side by side.")
        jobs.append(self._one_new_job(f"/imagine {PROMPT} {IMAGE_OPTIONS} compare=yes", wait=False))
        return jobs, time.monotonic()

    def _show_generations(self, jobs: list[int], queued_at: float) -> None:
        self._print("Waiting for the runner to draw them…")
        self._show(self._wait(jobs, None))
        self._check_succeeded(jobs, "generating images")
        self._print(f"(Generating took {_duration(time.monotonic() - queued_at)}.)")

    def _queue_measurements(self) -> tuple[list[Scene], list[int], list[int]]:
        """Held-out prompts with the trigger (compare: base and style on the same seeds) and
        with the LoRA on but no trigger word, 2 seeds each."""
        scenes = held_out_prompts(MEASURE_PROMPTS)
        self._note(
            f"Measure the style on {len(scenes)} prompts no reference shows: with the trigger "
            "(base and style side by side), and with the LoRA on but no trigger word."
        )
        with_trigger = [
            self._one_new_job(
                f"/imagine {scene.caption}, {TRIGGER} {MEASURE_OPTIONS} compare=yes", wait=False
            )
            for scene in scenes
        ]
        without = [
            self._one_new_job(
                f"/imagine <lora:{TRIGGER}:1> {scene.caption} {MEASURE_OPTIONS}", wait=False
            )
            for scene in scenes
        ]
        return scenes, with_trigger, without

    def _measure(
        self, scenes: list[Scene], with_trigger: list[int], without: list[int]
    ) -> Measurement:
        """The queued measurements' images, scored with the toy world's metrics."""
        jobs = with_trigger + without
        self._show(self._wait(jobs, None))
        self._check_succeeded(jobs, "measuring the style")
        services = self._session().core.services
        base, styled, leak = Tally.empty(), Tally.empty(), Tally.empty()
        for scene, job in zip(scenes, with_trigger, strict=True):
            for image in collect.generation(services.db, services.blobs, job).images:
                halves = panels(image.data)
                base.add(halves["base"], scene, "stripes")
                styled.add(halves["style"], scene, "stripes")
        for scene, job in zip(scenes, without, strict=True):
            for image in collect.generation(services.db, services.blobs, job).images:
                leak.add(panels(image.data)["style"], scene, "stripes")
        measurement = Measurement(
            prompts=[s.caption for s in scenes],
            base=base.summary(),
            with_trigger=styled.summary(),
            without_trigger=leak.summary(),
        )
        self._print(measurement.text())
        return measurement

    def _export(self) -> Entry:
        self._note("Download the LoRA for ComfyUI, A1111/Forge or InvokeAI.")
        entries = self._say(f"/style export {STYLE}")
        export = next((e for e in entries if e.kind == "message" and e.files), None)
        if export is None:
            raise DemoError(f"exporting the LoRA failed: {self._last_text()}")
        return export

    def _finish(
        self,
        started: float,
        train_job: int,
        train_s: float,
        jobs: list[int],
        measurement: Measurement,
        export: Entry,
    ) -> DemoResult:
        session = self._session()
        db, blobs = session.core.services.db, session.core.services.blobs
        training = collect.training(db, blobs, train_job, train_s)
        generations = [collect.generation(db, blobs, job) for job in jobs]
        exports = collect.exports(export)
        wall = time.monotonic() - started
        report = DemoReport(
            data_dir=self.data_dir,
            wall_s=wall,
            reused=self.reused,
            transcript=self.transcript.entries,
            training=training,
            generations=generations,
            exports=exports,
            measurement=measurement,
        )
        path = write_report(report, self.data_dir / "report")
        loras = [path.parent / "lora" / f.name for f in exports]
        self._summary(path, loras, exports, wall)
        return DemoResult(
            report=path,
            wall_s=wall,
            model_version=training.version,
            lora_files=loras,
            reused=list(self.reused),
            runner_pid=self.runner.pid if self.runner else None,
            measurement=measurement,
        )

    def _summary(
        self, path: Path, loras: list[Path], exports: list[ReportFile], wall: float
    ) -> None:
        lines = ["", f"Report: {path}", "Exported LoRA files (copied next to the report):"]
        lines += [f"  {p}  ({f.note.split(':')[0]})" for p, f in zip(loras, exports, strict=True)]
        lines += [
            "",
            f"About the model: {TOY_NOTE}",
            REAL_WEIGHTS_HELP.replace("`", ""),
            f"Demo wall time: {_duration(wall)}.",
        ]
        self._print("\n".join(lines))

    # -- talking to the console ------------------------------------------------------------

    def _session(self) -> ConsoleSession:
        assert self.session is not None
        return self.session

    def _say(self, line: str) -> list[Entry]:
        self._print(f"{self.who}> {line}")
        if not line.startswith("as "):  # switching user is the console's, not the chat's
            self.transcript.command(self.who, line)
        blocks = self._session().run_line(line)
        if line.startswith("as "):
            self.who = line.split()[1]
        return self._show(blocks)

    def _show(self, blocks: list[str]) -> list[Entry]:
        for block in blocks:
            self._print(block)
        return self.transcript.add_blocks(blocks)

    def _note(self, text: str) -> None:
        self.transcript.note(text)
        self._print(f"\n# {text}")

    def _reuse(self, what: str) -> None:
        self.reused.append(what)
        self._note(f"Reusing the {what} from an earlier run.")

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _last_text(self) -> str:
        last = self.transcript.entries[-1] if self.transcript.entries else None
        return last.text.split("\n")[0] if last else "no reply"

    # -- the database ----------------------------------------------------------------------

    def _team_id(self) -> int | None:
        with self._session().core.services.db.session() as s:
            team = find_team(s, CONSOLE_TEAM)
            return team.id if team else None

    def _style_exists(self) -> bool:
        team_id = self._team_id()
        if team_id is None:
            return False
        with self._session().core.services.db.session() as s:
            return find_style(s, team_id, STYLE) is not None

    def _approved_images(self) -> tuple[int, int] | None:
        """(version, image count) of the style's latest approved dataset."""
        team_id = self._team_id()
        with self._session().core.services.db.session() as s:
            style = find_style(s, team_id, STYLE) if team_id is not None else None
            dataset = latest_approved(s, style.id) if style else None
            if dataset is None:
                return None
            return dataset.version, len(images_of(s, dataset.id))

    def _review_sheet_number(self) -> str:
        """The console number of the review sheet (reactions name the message they are on)."""
        services = self._session().core.services
        team_id = self._team_id()
        with services.db.session() as s:
            style = find_style(s, team_id, STYLE) if team_id is not None else None
            dataset = latest_version(s, style.id) if style else None
            in_review = dataset is not None and dataset.status == DatasetStatus.IN_REVIEW
            dataset_id = dataset.id if dataset else None
        posted = services.outbox.get(review_key(dataset_id)) if dataset_id else None
        if not in_review or posted is None or not posted.platform_message_id:
            raise DemoError(f"posting the review sheet failed: {self._last_text()}")
        return posted.platform_message_id

    def _max_job_id(self) -> int:
        with self._session().core.services.db.session() as s:
            return int(s.scalar(select(func.max(Job.id))) or 0)

    def _one_new_job(self, line: str, *, wait: bool = True) -> int:
        before = self._max_job_id()
        self._say(line)
        team_id = self._team_id()
        with self._session().core.services.db.session() as s:
            ids = list(s.scalars(select(Job.id).where(Job.id > before, Job.team_id == team_id)))
        if len(ids) != 1:
            raise DemoError(f"`{line}` queued no job: {self._last_text()}")
        return ids[0]

    def _cancel_leftovers(self) -> None:
        """Jobs an interrupted earlier run left behind would hold up this one: cancel them.

        A job whose runner was killed stays "running" until its lease expires (the queue's
        lease time, 30 s by default); then the queue marks it canceled.
        """
        queue = self._session().core.services.queue
        leftovers = self._active_jobs()
        for job in leftovers:
            queue.cancel(job.id)
            self._note(f"Canceled job #{job.id} ({job.kind}) left over from an interrupted run.")
        if not leftovers:
            return
        deadline = time.monotonic() + queue.lease_seconds + 10
        told = False
        while True:
            queue.recover_expired()
            active = self._active_jobs()
            if not active:
                return
            if time.monotonic() > deadline:
                numbers = ", ".join(f"#{job.id}" for job in active)
                raise DemoError(
                    f"job(s) {numbers} in {self.data_dir} are still held by a runner; is "
                    "another `atelier demo` using this folder? Stop it, or pass another "
                    "--data-dir."
                )
            if not told:
                self._print("Waiting for the interrupted job's lease to run out (under a minute)…")
                told = True
            time.sleep(2.0)  # leases are tens of seconds; no need to poll faster

    def _cancel_active(self) -> None:
        if self.session is None:
            return
        # The demo is already failing or interrupted: best effort, the runner stops next.
        with contextlib.suppress(Exception):
            for job in self._active_jobs():
                self.session.core.services.queue.cancel(job.id)

    def _active_jobs(self) -> list[JobView]:
        team_id = self._team_id()
        if team_id is None:
            return []
        queue = self._session().core.services.queue
        return queue.list_jobs(team_id=team_id, statuses=(JobStatus.QUEUED, JobStatus.RUNNING))

    # -- waiting for the runner ------------------------------------------------------------

    def _wait(self, job_ids: list[int], bar: ProgressBar | None) -> list[str]:
        """Deliver messages until the jobs finish; feed the bar from the first job's events."""
        session = self._session()
        queue = session.core.services.queue
        runner = self.runner
        assert runner is not None
        deadline = time.monotonic() + self.options.job_timeout_s
        blocks: list[str] = []
        seen = 0
        while True:
            blocks += session.deliver()
            if bar is not None:
                for event in queue.progress(job_ids[0], after_id=seen):
                    seen = event.id
                    if event.step is not None and event.total:
                        bar.update(Snapshot.of(event.step, event.total, event.data))
            if all(queue.get(j).status.is_final for j in job_ids):
                break
            if not runner.alive():
                raise DemoError(
                    f"the runner stopped (exit code {runner.exit_code()}); the end of "
                    f"{runner.log_path}:\n{runner.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"job(s) {', '.join(map(str, job_ids))} did not finish in "
                    f"{self.options.job_timeout_s:.0f} s; see {runner.log_path}"
                )
            time.sleep(0.5)  # the runner writes progress a few times a second
        return blocks + session.deliver()

    def _check_succeeded(self, job_ids: list[int], what: str) -> None:
        queue = self._session().core.services.queue
        for job_id in job_ids:
            job = queue.get(job_id)
            if job.status != JobStatus.SUCCEEDED:
                tail = self.runner.log_tail() if self.runner else ""
                raise DemoError(
                    f"{what} failed (job #{job_id} {job.status}): {job.error or 'no error'}"
                    + (f"\nThe runner's log ends with:\n{tail}" if tail else "")
                )

    @staticmethod
    def _latest_versions(entries: list[Entry]) -> list[Entry]:
        """One entry per message number (its last version), in first-seen order."""
        latest: dict[object, Entry] = {}
        for i, entry in enumerate(entries):
            key: object = entry.number if entry.number is not None else ("console", i)
            latest[key] = entry
        return list(latest.values())


def _block_text(entry: Entry) -> str:
    if entry.kind != "message":
        return entry.text
    where = f" (thread of [{entry.thread}])" if entry.thread is not None else ""
    tag = " (edited)" if entry.edited else ""
    lines = [f"[{entry.number}] atelier{where}{tag}: {entry.text}"]
    lines += [f"    📎 {path}" for path in entry.files]
    return "\n".join(lines)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the demo the way Ctrl-C does (so the runner is stopped too), and Ctrl-C
    works even where the demo was started with SIGINT ignored (a background job of a
    non-interactive shell, e.g. a CI step), where Python installs no handler of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def run_demo(
    options: DemoOptions, *, out: TextIO | None = None, err: TextIO | None = None
) -> DemoResult:
    """Run the whole story; raises DemoError (one clear message) when a step fails."""
    with _sigterm_as_interrupt():
        return Demo(options, out or sys.stdout, err or sys.stderr).run()


def main(settings: Settings, *, data_dir: Path | None = None, steps: int | None = None) -> int:
    """`atelier demo`: exit 0 with the report's path printed, 1 on a failed step, 130 on ^C."""
    options = DemoOptions(
        data_dir=data_dir or settings.data_dir / "demo", steps=steps or DEFAULT_STEPS
    )
    try:
        run_demo(options)
    except DemoError as exc:
        print(f"The demo stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nDemo interrupted; the runner was stopped.", file=sys.stderr)
        return 130
    return 0
