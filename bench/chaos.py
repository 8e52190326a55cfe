"""Chaos soak: random jobs, runners SIGKILLed at random failpoints, a delivery process killed
while messages wait; afterwards every job must have ended exactly once and every message
must have been posted exactly once.

Each round enqueues a random mix (tiny generations, some with LoRAs trained in earlier
rounds, short trainings, now and then a request that must fail with a clear message),
starts 1-2 runners with a random failpoint (or none) and lets them die or finish. The
leases of dead runners are expired (what 30 s of silence would do) and runners without
failpoints run until the queue is empty. Meanwhile a separate delivery process (the bot's
`OutboxDeliverer` with a sender that records every post and edit to a file) is SIGKILLed at
a random moment while messages are pending, and restarted.

    .venv/bin/python bench/chaos.py [--rounds 5] [--seed N] [--postgres URL] [--max-seconds 900]
                                    [--platform plain|nonce|lookup] [--latency-ms 50] [--keep]

Exits non-zero when anything was duplicated or lost. SQLite by default; with `--postgres`
a throwaway database is made on that server and dropped afterwards. `--platform` picks how
a post in doubt (the deliverer died after the platform took a message but before recording
it) is met: lookup (default) gives the recording sender the optional `find_posted`; nonce
makes the platform drop a repeated post like Discord; plain posts it again, which is what a
sender without `find_posted` on a platform without a nonce (SlackSender, ConsoleSender) gets.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Keep bench/ off the import path: bench/queue.py would shadow the stdlib module.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # shared test helpers

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from PIL import Image, ImageDraw
from runner_seed import approved_style
from sqlalchemy import func, select, update
from throwaway_db import throwaway_postgres

from bot.commands import OutgoingFile
from bot.delivery import OutboxDeliverer
from storage.blobs import BlobStore
from storage.db import Database
from storage.job_payloads import (
    AdapterChoice,
    GeneratePayload,
    JobKind,
    Priority,
    ReplyTarget,
    TrainPayload,
    batch_key,
    result_key,
)
from storage.models import (
    DatasetVersion,
    Generation,
    Job,
    JobStatus,
    ModelVersion,
    OutboxMessage,
    OutboxStatus,
    Style,
    Team,
    TrainingRun,
    utcnow,
)
from storage.outbox import Outbox, OutboxItem
from storage.queue import JobQueue, JobView
from storage.work_signal import open_work_signal

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "console"
# Failpoint -> the range its count is drawn from (a runner that never gets that far ends
# normally, which is one of the outcomes a round should see too).
FAILPOINTS: dict[str, tuple[int, int]] = {
    "after_claim": (1, 3),
    "mid_training": (2, 12),
    "before_checkpoint": (1, 2),
    "after_checkpoint": (1, 2),
    "mid_generation": (1, 8),
    "before_outputs": (1, 4),
    "after_outputs": (1, 4),
}
TRAINING_FAILPOINTS = ("mid_training", "before_checkpoint", "after_checkpoint")
ANY_JOB_FAILPOINTS = ("after_claim", "mid_generation", "before_outputs", "after_outputs")
REQUESTERS = ("ana", "ben", "chen", "dara")
STYLES = (("ink", "inkstyle"), ("moss", "mossstyle"))
RUNNER_TIMEOUT_S = 300.0  # one runner process, start to exit; beyond it something hangs


# --- the bot side: a delivery process that records what it sends -----------------------


class RecordingSender:
    """A chat platform that keeps a log: one JSON line per accepted post or edit.

    A line is written and flushed the moment the platform accepts the message, halfway
    through the call, so a SIGKILL after that leaves it in the log as a real post would stay
    visible in the channel. This base one has no `find_posted` and its platform posts
    whatever it is sent (like SlackSender and ConsoleSender today).
    """

    def __init__(self, log: Path, latency_s: float) -> None:
        self._log = log
        self._latency_s = latency_s
        self._posted: dict[str, str] = {}  # outbox key -> message id, as the channel shows
        if log.exists():
            for entry in map(json.loads, log.read_text(encoding="utf-8").splitlines()):
                if entry["op"] == "post":
                    self._posted.setdefault(entry["key"], entry["message"])
        self._file = log.open("a", encoding="utf-8")

    def post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str:
        message_id = uuid.uuid4().hex[:12]
        self._record("post", item, message_id)
        self._posted.setdefault(item.key, message_id)
        return message_id

    def edit(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> None:
        self._record("edit", item, item.platform_message_id or "")

    def _record(self, op: str, item: OutboxItem, message_id: str) -> None:
        # The platform takes the message halfway through the round trip: a crash in the
        # second half leaves it posted while the bot never heard back.
        time.sleep(self._latency_s / 2)
        line = {"op": op, "key": item.key, "revision": item.revision, "message": message_id}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        time.sleep(self._latency_s / 2)


class NonceRecordingSender(RecordingSender):
    """Discord with the nonce DiscordSender sends per outbox key (enforce_nonce): a repeated
    post returns the earlier message instead of posting again."""

    def post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str:
        if item.key in self._posted:
            self._record("absorbed", item, self._posted[item.key])
            return self._posted[item.key]
        return super().post(item, files)


class LookupRecordingSender(RecordingSender):
    """A sender with `find_posted`: asks the platform whether a post in doubt went out
    (what Slack could do by tagging posts with the outbox key in message metadata)."""

    def find_posted(self, item: OutboxItem) -> str | None:
        found = self._posted.get(item.key)
        if found is not None:
            self._file.write(json.dumps({"op": "found", "key": item.key}) + "\n")
            self._file.flush()
        return found


SENDERS: dict[str, type[RecordingSender]] = {
    "plain": RecordingSender,
    "nonce": NonceRecordingSender,
    "lookup": LookupRecordingSender,
}


def deliverer_main(
    log: Path, database_url: str, data_dir: Path, latency_s: float, platform: str
) -> int:
    """Deliver due outbox messages until SIGTERM (or SIGKILL, which is the point)."""
    stop = False

    def request_stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    db = Database(database_url)
    deliverer = OutboxDeliverer(
        Outbox(db),
        BlobStore(data_dir / "blobs", 2_000_000_000),
        SENDERS[platform](log, latency_s),
        PLATFORM,
    )
    wake = open_work_signal(db)
    try:
        while not stop:
            if deliverer.deliver_due() == 0:
                wake.wait(0.2)
    finally:
        wake.close()
        db.dispose()
    return 0


# --- the soak --------------------------------------------------------------------------


@dataclass
class RunnerProc:
    worker: str
    failpoint: str | None
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)

    @property
    def killed(self) -> bool:
        return self.proc.returncode == -signal.SIGKILL


@dataclass
class Expectation:
    job_id: int
    kind: str
    round: int
    must_fail: bool = False
    training_run_id: int | None = None
    # A training a runner died on: the checkpoint step on record then, and whether its
    # model version was already published.
    crashed: str | None = None  # the failpoint of the runner that died on it
    checkpoint_at_crash: int | None = None
    published_at_crash: bool = False


@dataclass
class Tally:
    rounds_run: int = 0
    rounds_survived: int = 0
    runners_started: int = 0
    runners_killed: int = 0
    deliverer_kills: int = 0
    pending_at_kills: list[int] = field(default_factory=list)
    leases_expired: int = 0
    failpoints_fired: Counter[str] = field(default_factory=Counter)


class Soak:
    def __init__(self, args: argparse.Namespace, data_dir: Path, database_url: str) -> None:
        self.args = args
        self.rng = random.Random(args.seed)  # the plan: jobs, runners, failpoints
        # Draws made a timing-dependent number of times, kept apart so that one seed gives
        # the same plan: delivery kills and the clean runners of a drain.
        self.timing_rng = random.Random(args.seed + 1)
        self.data_dir = data_dir
        self.database_url = database_url
        self.db = Database(database_url)
        self.queue = JobQueue(self.db)
        self.blobs = BlobStore(data_dir / "blobs", 2_000_000_000)
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.sent_log = data_dir / "sent.jsonl"
        self.expected: list[Expectation] = []
        self.tally = Tally()
        self.deadline = time.monotonic() + args.max_seconds
        self.deliverer: subprocess.Popen[bytes] | None = None
        self.deliverer_restart_at: float | None = None
        self.kill_deliverer_at: float | None = None
        self.team_id = 0
        self.styles: list[tuple[int, str, str]] = []  # (style id, name, trigger)

    # -- set-up ---------------------------------------------------------------------------

    def seed(self) -> None:
        """A team with two styles whose 12-image datasets are approved."""
        with self.db.session(write=True) as s:
            team = Team(platform=PLATFORM, external_id="chaos")
            s.add(team)
            s.flush()
            self.team_id = team.id
        stores = SimpleNamespace(db=self.db, blobs=self.blobs, queue=self.queue)
        for number, (name, trigger) in enumerate(STYLES):
            references = [
                (Image.open(io.BytesIO(_reference_png(number * 100 + n))), f"study {n}")
                for n in range(1, 13)
            ]
            style_id = approved_style(
                stores, references, name=name, trigger=trigger, team_id=self.team_id
            )
            self.styles.append((style_id, name, trigger))

    # -- enqueueing -----------------------------------------------------------------------

    def enqueue_round(self, round_no: int) -> list[Expectation]:
        rng = self.rng
        jobs: list[Expectation] = []
        trained = self._trained_versions()
        for _ in range(rng.randint(4, 12)):
            jobs.append(self._enqueue_generation(round_no, trained))
        for _ in range(rng.choice((0, 1, 1, 2))):
            style_id, _name, _trigger = rng.choice(self.styles)
            jobs.append(self._enqueue_training(round_no, style_id, rng.randint(6, 14)))
        if rng.random() < 0.4:  # a request the runner must refuse with a clear message
            payload = self._payload(prompt="word " * 120, steps=2)
            jobs.append(self._add_generation(round_no, payload, must_fail=True))
        self.expected += jobs
        return jobs

    def _payload(self, **overrides: Any) -> GeneratePayload:
        requester = self.rng.choice(REQUESTERS)
        reply = ReplyTarget(
            platform=PLATFORM, channel="c", team_id=self.team_id, requester=requester
        )
        settings: dict[str, Any] = {
            "prompt": "a harbour at dawn",
            "base_model": "tiny-sd15",
            "steps": self.rng.randint(2, 4),
            "cfg": self.rng.choice((5.0, 7.0)),
            "width": 64,
            "height": 64,
            "seed": self.rng.randrange(2**32),
            "count": 2 if self.rng.random() < 0.2 else 1,
            **overrides,
        }
        return GeneratePayload(reply=reply, **settings)

    def _enqueue_generation(
        self, round_no: int, trained: list[tuple[int, str, str]]
    ) -> Expectation:
        if trained and self.rng.random() < 0.4:
            version_id, name, trigger = self.rng.choice(trained)
            payload = self._payload(
                prompt=f"{trigger}, a lighthouse",
                adapters=[AdapterChoice(model_version_id=version_id, name=name, trigger=trigger)],
                compare=self.rng.random() < 0.3,
            )
        else:
            payload = self._payload(prompt=f"a harbour at dawn, {self.rng.randrange(1000)}")
        return self._add_generation(round_no, payload)

    def _add_generation(
        self, round_no: int, payload: GeneratePayload, *, must_fail: bool = False
    ) -> Expectation:
        job = self.queue.enqueue(
            JobKind.GENERATE,
            payload.model_dump(),
            requester=payload.reply.requester,
            priority=Priority.GENERATE,
            base_model=payload.base_model,
            batch_key=batch_key(payload),
        )
        return Expectation(job.id, JobKind.GENERATE, round_no, must_fail=must_fail)

    def _enqueue_training(self, round_no: int, style_id: int, steps: int) -> Expectation:
        with self.db.session(write=True) as s:
            dataset = s.scalar(select(DatasetVersion).where(DatasetVersion.style_id == style_id))
            assert dataset is not None
            run = TrainingRun(
                style_id=style_id,
                dataset_version_id=dataset.id,
                method="lora",
                params={"steps": steps, "checkpoint_every": 4},
                requested_by="ana",
            )
            s.add(run)
            s.flush()
            reply = ReplyTarget(
                platform=PLATFORM, channel="c", team_id=self.team_id, requester="ana"
            )
            payload = TrainPayload(training_run_id=run.id, reply=reply)
            job = self.queue.enqueue(
                JobKind.TRAIN,
                payload.model_dump(),
                requester="ana",
                priority=Priority.TRAIN,
                base_model="tiny-sd15",
                session=s,
            )
            run.job_id = job.id
            return Expectation(job.id, JobKind.TRAIN, round_no, training_run_id=run.id)

    def _trained_versions(self) -> list[tuple[int, str, str]]:
        with self.db.session() as s:
            rows = s.execute(
                select(ModelVersion.id, Style.name, Style.trigger).join(
                    Style, ModelVersion.style_id == Style.id
                )
            ).all()
        return [(row[0], row[1], row[2]) for row in rows]

    # -- processes ------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "ATELIER_DATA_DIR": str(self.data_dir),
            "ATELIER_DATABASE_URL": self.database_url,
            "ATELIER_DEVICE": self.args.device,
            "ATELIER_BASE_MODELS": "{}",
            "OMP_NUM_THREADS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
        env.pop("ATELIER_FAILPOINTS", None)
        return env

    def start_runner(self, worker: str, failpoint: str | None) -> RunnerProc:
        env = self._env()
        if failpoint:
            env["ATELIER_FAILPOINTS"] = failpoint
        with (self.logs / f"{worker}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gpu_runner", "--until-idle", "--id", worker],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.tally.runners_started += 1
        return RunnerProc(worker, failpoint, proc)

    def start_deliverer(self) -> None:
        with (self.logs / "deliverer.log").open("ab") as out:
            self.deliverer = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--deliverer",
                    str(self.sent_log),
                    "--database-url",
                    self.database_url,
                    "--data-dir",
                    str(self.data_dir),
                    "--latency-ms",
                    str(self.args.latency_ms),
                    "--platform",
                    self.args.platform,
                ],
                env=self._env(),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.deliverer_restart_at = None

    def _deliverer_chores(self) -> None:
        """Kill the delivery process at its planned moment (once messages are pending) and
        bring it back a moment later."""
        now = time.monotonic()
        if self.deliverer_restart_at is not None and now >= self.deliverer_restart_at:
            self.start_deliverer()
        if self.kill_deliverer_at is None or now < self.kill_deliverer_at:
            return
        if self.deliverer is None or self.deliverer.poll() is not None:
            return
        pending = self.pending_messages()
        if pending == 0:
            return  # wait for a moment when something is in flight
        self.deliverer.kill()
        self.deliverer.wait()
        self.tally.deliverer_kills += 1
        self.tally.pending_at_kills.append(pending)
        self.kill_deliverer_at = None
        self.deliverer_restart_at = now + self.timing_rng.uniform(0.0, 1.5)

    def pending_messages(self) -> int:
        with self.db.session() as s:
            count = s.scalar(
                select(func.count(OutboxMessage.id)).where(
                    OutboxMessage.status == OutboxStatus.PENDING
                )
            )
        return int(count or 0)

    def wait_for(self, runners: list[RunnerProc]) -> None:
        while True:
            self._deliverer_chores()
            now = time.monotonic()
            for runner in runners:
                if runner.proc.poll() is None and (
                    now - runner.started > RUNNER_TIMEOUT_S or now > self.deadline
                ):
                    print(f"  {runner.worker} ran too long; killing it", flush=True)
                    runner.proc.kill()
                    runner.proc.wait()
            if all(runner.proc.poll() is not None for runner in runners):
                break
            time.sleep(0.05)
        for runner in runners:
            if runner.killed and runner.failpoint:
                self.tally.runners_killed += 1
                self.tally.failpoints_fired[runner.failpoint.partition(":")[0]] += 1
            elif runner.proc.returncode != 0:
                log = (self.logs / f"{runner.worker}.log").read_text(errors="replace")
                print(f"  {runner.worker} exited {runner.proc.returncode}:\n{log[-2000:]}")

    def expire_leases(self, owners: Sequence[str]) -> int:
        """What a dead runner's silence does after lease_seconds, done now."""
        if not owners:
            return 0
        with self.db.session(write=True) as s:
            expired = s.execute(
                update(Job)
                .where(Job.status == JobStatus.RUNNING, Job.lease_owner.in_(list(owners)))
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            ).rowcount
        self.queue.recover_expired()
        self.tally.leases_expired += int(expired or 0)
        return int(expired or 0)

    # -- rounds ---------------------------------------------------------------------------

    def run_round(self, round_no: int) -> bool:
        rng = self.rng
        jobs = self.enqueue_round(round_no)
        kinds = Counter(("refused " if j.must_fail else "") + j.kind for j in jobs)
        self.kill_deliverer_at = time.monotonic() + self.timing_rng.uniform(0.5, 6.0)
        runners = []
        training = any(job.kind == JobKind.TRAIN for job in jobs)
        for n in range(rng.randint(1, 2)):
            failpoint = None
            if rng.random() < 0.9:
                # Trainings run after the round's generations: aim half the crashes at them.
                aim_training = training and rng.random() < 0.5
                name = rng.choice(TRAINING_FAILPOINTS if aim_training else ANY_JOB_FAILPOINTS)
                low, high = FAILPOINTS[name]
                failpoint = f"{name}:{rng.randint(low, high)}"
            runners.append(self.start_runner(f"r{round_no}-{n}", failpoint))
        self.wait_for(runners)
        dead = {r.worker: r.failpoint or "" for r in runners if r.killed}
        self.note_crashed_trainings(jobs, dead)
        expired = self.expire_leases(list(dead))
        fates = ", ".join(
            f"{r.worker}[{r.failpoint or 'no failpoint'}] "
            + ("killed" if r.killed else f"exited {r.proc.returncode}")
            for r in runners
        )
        drained_by = self.drain(round_no)
        ok = self.round_ok(jobs)
        print(
            f"round {round_no}: {sum(kinds.values())} jobs ({dict(kinds)}); {fates}; "
            f"{expired} lease(s) expired; drained by {drained_by} clean runner(s); "
            f"{'ok' if ok else 'NOT OK'}",
            flush=True,
        )
        return ok

    def note_crashed_trainings(self, jobs: list[Expectation], dead: dict[str, str]) -> None:
        for expectation in jobs:
            if expectation.kind != JobKind.TRAIN:
                continue
            with self.db.session() as s:
                job = s.get(Job, expectation.job_id)
                run = s.get(TrainingRun, expectation.training_run_id)
                published = s.scalar(
                    select(func.count(ModelVersion.id)).where(
                        ModelVersion.training_run_id == expectation.training_run_id
                    )
                )
            if job is None or run is None or job.lease_owner not in dead:
                continue
            expectation.crashed = dead[job.lease_owner]
            expectation.checkpoint_at_crash = run.last_checkpoint_step
            expectation.published_at_crash = bool(published)

    def drain(self, round_no: int) -> int:
        """Clean runners until no job is left; returns how many it took."""
        started = 0
        while time.monotonic() < self.deadline:
            with self.db.session() as s:
                open_jobs = list(
                    s.scalars(
                        select(Job).where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
                    )
                )
            if not open_jobs:
                return started
            # No runner is alive here: a running job's owner died, so its lease goes.
            owners = {j.lease_owner for j in open_jobs if j.status == JobStatus.RUNNING}
            self.expire_leases([o for o in owners if o])
            later = [j.run_after for j in open_jobs if j.status == JobStatus.QUEUED]
            if later and min(later) > utcnow():  # a retry's backoff: wait it out
                wait_s = (min(later) - utcnow()).total_seconds()
                time.sleep(min(max(wait_s, 0.0), 30.0))
            count = self.timing_rng.randint(1, 2)
            runners = [
                self.start_runner(f"r{round_no}-clean{started + n}", None) for n in range(count)
            ]
            started += count
            self.wait_for(runners)
        return started

    def round_ok(self, jobs: list[Expectation]) -> bool:
        with self.db.session() as s:
            rows = {
                j.id: j for j in s.scalars(select(Job).where(Job.id.in_([e.job_id for e in jobs])))
            }
        return all(
            rows[e.job_id].status == (JobStatus.FAILED if e.must_fail else JobStatus.SUCCEEDED)
            for e in jobs
        )

    def soak(self) -> None:
        self.seed()
        self.start_deliverer()
        for round_no in range(1, self.args.rounds + 1):
            if time.monotonic() >= self.deadline:
                print(f"time is up after {round_no - 1} rounds", flush=True)
                break
            self.tally.rounds_run += 1
            if self.run_round(round_no):
                self.tally.rounds_survived += 1
        self.finish_delivery()

    def finish_delivery(self) -> None:
        """Let the (restarted) deliverer send what is left, then stop it."""
        self.kill_deliverer_at = None
        give_up = time.monotonic() + 120.0
        while time.monotonic() < give_up:
            self._deliverer_chores()
            if self.deliverer_restart_at is None and self.pending_messages() == 0:
                break
            time.sleep(0.1)
        if self.deliverer is not None and self.deliverer.poll() is None:
            self.deliverer.send_signal(signal.SIGTERM)
            try:
                self.deliverer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.deliverer.kill()
                self.deliverer.wait()

    # -- the verdict ----------------------------------------------------------------------

    def report(self) -> int:
        with self.db.session() as s:
            jobs = {j.id: JobView.of(j) for j in s.scalars(select(Job))}
            generations = Counter(s.scalars(select(Generation.job_id)))
            versions = Counter(s.scalars(select(ModelVersion.training_run_id)))
            messages = {m.key: m for m in s.scalars(select(OutboxMessage))}
        sent = [json.loads(line) for line in self.sent_log.read_text().splitlines() if line]
        posts = Counter(entry["key"] for entry in sent if entry["op"] == "post")
        absorbed = sum(1 for entry in sent if entry["op"] in ("absorbed", "found"))
        # The content the channel shows: what was posted or edited in. (A post a nonce
        # dropped shows the earlier post's content, not the one sent.)
        shown_revision: dict[str, int] = {}
        for entry in sent:
            if entry["op"] in ("post", "edit"):
                key = entry["key"]
                shown_revision[key] = max(shown_revision.get(key, 0), entry["revision"])

        completed = sum(1 for e in self.expected if jobs[e.job_id].status == JobStatus.SUCCEEDED)
        refused = sum(
            1 for e in self.expected if e.must_fail and jobs[e.job_id].status == JobStatus.FAILED
        )
        retried = sum(1 for e in self.expected if jobs[e.job_id].attempts > 1)
        crashed = [e for e in self.expected if e.crashed and not e.published_at_crash]
        resumed_from = {
            e.job_id: (jobs[e.job_id].result or {}).get("resumed_from") for e in crashed
        }
        # The step on record is set after a checkpoint is saved: resuming from it or later is
        # right; starting over although one was on record is not.
        checkpoint_ignored = [
            e.job_id
            for e in crashed
            if e.checkpoint_at_crash and (resumed_from[e.job_id] or 0) < e.checkpoint_at_crash
        ]
        dup_generations = sum(1 for count in generations.values() if count > 1)
        dup_versions = sum(1 for count in versions.values() if count > 1)
        dup_results = sum(
            1 for e in self.expected if (m := messages.get(result_key(e.job_id))) and m.revision > 1
        )
        dup_posts = {key: count for key, count in posts.items() if count > 1}
        dup_result_posts = sum(1 for key in dup_posts if key.endswith(":result"))
        not_final = [e.job_id for e in self.expected if not jobs[e.job_id].status.is_final]
        wrong_outcome = [
            e.job_id
            for e in self.expected
            if jobs[e.job_id].status.is_final
            and jobs[e.job_id].status != (JobStatus.FAILED if e.must_fail else JobStatus.SUCCEEDED)
        ]
        missing_versions = [
            e.job_id
            for e in self.expected
            if e.kind == JobKind.TRAIN and not e.must_fail and versions[e.training_run_id] == 0
        ]
        missing_generations = [
            e.job_id
            for e in self.expected
            if e.kind == JobKind.GENERATE and not e.must_fail and generations[e.job_id] == 0
        ]
        never_posted = [e.job_id for e in self.expected if posts[result_key(e.job_id)] == 0]
        undelivered = [key for key, m in messages.items() if m.status != OutboxStatus.DELIVERED]
        stale = [key for key, m in messages.items() if shown_revision.get(key, 0) < m.revision]
        temp_left = self.blobs.remove_stale_temp(older_than_s=0)
        torn = _torn_blobs(self.blobs.root)

        duplicates = dup_generations + dup_versions + dup_results + len(dup_posts)
        losses = (
            len(not_final)
            + len(wrong_outcome)
            + len(missing_versions)
            + len(missing_generations)
            + len(never_posted)
            + len(undelivered)
            + len(stale)
        )
        t = self.tally
        print()
        print(
            f"rounds survived     {t.rounds_survived}/{t.rounds_run} (asked for {self.args.rounds})"
        )
        print(
            f"jobs completed      {completed} succeeded + {refused} refused as they should be, "
            f"of {len(self.expected)}; {retried} needed another try"
        )
        print(
            f"crashes             {t.runners_killed} runner SIGKILLs of {t.runners_started} "
            f"runners ({', '.join(f'{k} {v}' for k, v in sorted(t.failpoints_fired.items()))}); "
            f"{t.leases_expired} leases expired"
        )
        print(
            f"                    {t.deliverer_kills} delivery SIGKILLs, with "
            f"{t.pending_at_kills} messages pending"
        )
        print(
            f"trainings crashed   {len(crashed)} before publishing; checkpoint on record -> "
            "resumed from: "
            + (
                ", ".join(
                    f"[{e.crashed}] {e.checkpoint_at_crash} -> {resumed_from[e.job_id]}"
                    for e in crashed
                )
                or "-"
            )
            + f"; started over despite a checkpoint: {len(checkpoint_ignored)}"
        )
        print(
            f"duplicates          {duplicates}: generation rows {dup_generations}, model versions "
            f"{dup_versions}, results written twice {dup_results}, messages posted twice "
            f"{len(dup_posts)} (results {dup_result_posts})"
        )
        if dup_posts:
            print(f"                    posted twice: {sorted(dup_posts)[:10]}")
        if self.args.platform != "plain":
            print(f"                    posts in doubt caught ({self.args.platform}): {absorbed}")
        print(
            f"losses              {losses}: jobs not final {len(not_final)}, wrong outcome "
            f"{len(wrong_outcome)}, no model version {len(missing_versions)}, no generation "
            f"{len(missing_generations)}, results never posted {len(never_posted)}, messages "
            f"undelivered {len(undelivered)}, edits never shown {len(stale)}"
        )
        for label, items in (
            ("not final", not_final),
            ("wrong outcome", wrong_outcome),
            ("never posted", never_posted),
            ("undelivered", undelivered),
            ("stale", stale),
        ):
            if items:
                print(f"                    {label}: {items[:10]}")
        print(
            f"blobs               {len(torn)} half-written; {temp_left} temp files left by "
            "crashes (removed by the clean-up)"
        )
        failed = (
            duplicates or losses or torn or checkpoint_ignored or t.rounds_survived < t.rounds_run
        )
        return 1 if failed else 0


def _reference_png(seed: int) -> bytes:
    """A 64 px reference image: coloured stripes and a disc, different for each seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    stripe = tuple(rng.randrange(256) for _ in range(3))
    for x in range(0, 64, rng.choice((8, 12, 16))):
        draw.rectangle((x, 0, x + 3, 63), fill=stripe)
    cx, cy, r = rng.randrange(16, 48), rng.randrange(16, 48), rng.randrange(6, 14)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _torn_blobs(root: Path) -> list[Path]:
    """Stored blobs whose bytes do not hash to their name (a half-written file)."""
    torn = []
    for path in root.rglob("*"):
        stored = path.is_file() and path.parent.name != "tmp" and len(path.name) == 64
        if stored and hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            torn.append(path)
    return torn


@contextmanager
def database(postgres_url: str | None, data_dir: Path) -> Iterator[str]:
    """A fresh migrated database: SQLite in the data folder, or a throwaway PostgreSQL one."""
    if not postgres_url:
        url = f"sqlite:///{data_dir / 'atelier.db'}"
        Database(url).upgrade()
        yield url
        return
    with throwaway_postgres(postgres_url, "atelier_chaos") as url:
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--postgres", metavar="URL", help="run on this PostgreSQL server")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop by then")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="the recording platform's response time"
    )
    parser.add_argument(
        "--platform",
        choices=sorted(SENDERS),
        default="lookup",
        help="how a post in doubt after a delivery crash is met: lookup (found by the sender's "
        "find_posted, the default), nonce (dropped by the platform, as Discord does for "
        "DiscordSender's nonce) or plain (posted again, as with SlackSender and ConsoleSender, "
        "which have no find_posted)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data folder and logs")
    # The delivery process this script starts (and kills) runs this same file:
    parser.add_argument("--deliverer", metavar="LOG", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.deliverer:
        return deliverer_main(
            Path(args.deliverer),
            args.database_url,
            Path(args.data_dir),
            args.latency_ms / 1000,
            args.platform,
        )
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    data_dir = Path(tempfile.mkdtemp(prefix="atelier-chaos-"))
    backend = "postgresql" if args.postgres else "sqlite"
    print(f"chaos soak: {args.rounds} rounds, seed {args.seed}, {backend}, data in {data_dir}")
    started = time.monotonic()
    try:
        with database(args.postgres, data_dir) as url:
            soak = Soak(args, data_dir, url)
            try:
                soak.soak()
            finally:
                for proc in (soak.deliverer,):
                    if proc is not None and proc.poll() is None:
                        proc.kill()
            code = soak.report()
            soak.db.dispose()
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    print(f"took {time.monotonic() - started:.0f} s; {'PASS' if code == 0 else 'FAIL'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
