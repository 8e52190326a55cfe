"""The console adapter: Atelier's chat commands in a terminal, no workspace needed.

    /style create ink inkstyle
    /style add ink ./a.png ./b.jpg        local files as attachments
    /style review ink
    react 4 ✅                            react to message number 4
    reply 2 ./c.png                       post an image in the thread of message 2
    press 9 vary                          press a button under result message 9
    /style train ink
    /imagine a harbour at dawn, inkstyle seed=7
    /imagine the same, redder file=./start.png strength=0.5    image-to-image
    wait                                  deliver results until the team's jobs are done
    as sam                                act as another (non-lead) user; `as you lead` back

Every message printed gets a number; attached images are saved to a folder. Outbox
messages (review sheets, progress, results) are delivered for platform "console" by the
same OutboxDeliverer the chat bots use, with a sender that prints. The demo drives this
through `ConsoleSession.run_line`.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from sqlalchemy import select

from bot.commands import (
    Actor,
    Command,
    FileTooLarge,
    IncomingFile,
    OutgoingFile,
    Press,
    Reaction,
    Reply,
    TeamRef,
)
from bot.core import CommandCore, CorePolicy
from bot.core.auth import CONSOLE_LEAD_ROLE
from bot.core.parsing import split_words
from bot.core.teams import find_team
from bot.delivery import OutboxDeliverer
from storage.blobs import BlobStore
from storage.db import Database
from storage.ingest import safe_display_name
from storage.models import JobStatus, OutboxMessage
from storage.outbox import Outbox, OutboxItem
from storage.queue import JobQueue
from storage.result_buttons import ACTION_WORDS, ButtonId
from storage.settings import Settings

PLATFORM = "console"
# A local file attached to /imagine (image-to-image) or /style import.
_FILE_OPTION = re.compile(r"(?:^|\s)file=(\S+)")
CONSOLE_TEAM = TeamRef(PLATFORM, "local", "Console")
CONSOLE_CHANNEL = "console"
DEFAULT_USER = Actor("you", "you", frozenset({CONSOLE_LEAD_ROLE}))

_HELP = """Console commands (besides the slash commands below):
  react N EMOJI      react to message N (✅ approve, ❌ reject/drop, 🔁 reroll)
  reply N FILE...    post images in the thread of message N
  press N ACTION [IMAGE] [prompt=...]
                     press a button under result N: reroll, vary (subtle), strong,
                     upscale, edit (with prompt= and negative=), delete
  as NAME [lead]     act as another user (with `lead`: an art lead)
  deliver            print messages waiting in the outbox
  wait [SECONDS]     deliver until the team's jobs finish (default 600 s)
  help, quit"""

_EMOJI_WORDS = {
    "approve": "✅",
    "check": "✅",
    ":white_check_mark:": "✅",
    "reject": "❌",
    "x": "❌",
    ":x:": "❌",
    "drop": "❌",
    "reroll": "🔁",
    ":repeat:": "🔁",
}


class MessageCounter:
    """Numbers every printed message; the number is the console's message id.

    With a `state_file` the last number is kept on disk, so numbers (and the names of
    saved files) are not reused after a restart.
    """

    def __init__(self, start: int = 1, state_file: Path | None = None) -> None:
        self.state_file = state_file
        if state_file is not None and state_file.is_file():
            text = state_file.read_text().strip()
            start = max(start, int(text) + 1) if text.isdigit() else start
        self._next = start
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            number = self._next
            self._next += 1
            if self.state_file is not None:
                self.state_file.parent.mkdir(parents=True, exist_ok=True)
                self.state_file.write_text(str(number))
            return number


def console_counter(db: Database, out_dir: Path) -> MessageCounter:
    """Numbers that continue from earlier sessions on this database and folder."""
    return MessageCounter(first_free_number(db), Path(out_dir) / ".last-message-number")


def first_free_number(db: Database) -> int:
    """One past the highest console message id in the outbox (numbers survive restarts)."""
    with db.session() as s:
        ids = s.scalars(
            select(OutboxMessage.platform_message_id).where(
                OutboxMessage.platform == PLATFORM,
                OutboxMessage.platform_message_id.is_not(None),
            )
        )
        numbers = [int(i) for i in ids if i is not None and i.isdigit()]
    return max(numbers, default=0) + 1


class ConsoleSender:
    """A MessageSender that renders messages as text and saves their files to a folder."""

    def __init__(self, out_dir: Path, counter: MessageCounter | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.counter = counter or MessageCounter()
        self._pending: list[str] = []
        self._lock = threading.Lock()

    def post(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> str:
        number = self.counter.next()
        self._emit(render(number, item.text, files_saved(self.out_dir, number, files), item))
        return str(number)

    def edit(self, item: OutboxItem, files: Sequence[OutgoingFile]) -> None:
        number = int(item.platform_message_id or 0)
        saved = files_saved(self.out_dir, number, files)
        self._emit(render(number, item.text, saved, item, edited=True))

    def _emit(self, text: str) -> None:
        with self._lock:
            self._pending.append(text)

    def drain(self) -> list[str]:
        """What was posted or edited since the last call."""
        with self._lock:
            out, self._pending = self._pending, []
        return out


def files_saved(out_dir: Path, number: int, files: Sequence[OutgoingFile]) -> list[Path]:
    saved: list[Path] = []
    for file in files:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{number:04d}-{safe_display_name(file.filename).replace(' ', '_')}"
        path.write_bytes(file.data)
        saved.append(path)
    return saved


def render(
    number: int,
    text: str,
    saved: Sequence[Path],
    item: OutboxItem | None = None,
    *,
    edited: bool = False,
    private: bool = False,
) -> str:
    where = ""
    if item is not None and item.thread:
        where = f" (thread of [{item.thread}])"
    tags = " (edited)" if edited else " (only you)" if private else ""
    lines = [f"[{number}] atelier{where}{tags}: {text}"]
    lines += [f"    📎 {path}" for path in saved]
    rows = item.extra.get("buttons") if item is not None else None
    if isinstance(rows, list):
        for row in rows:
            lines.append("    " + " ".join(f"[{b['label']}]" for b in row))
        lines.append(f"    (press {number} ACTION: {', '.join(ACTION_WORDS)})")
    return "\n".join(lines)


def local_file(path: Path) -> IncomingFile:
    """A local file as an attachment, read only up to the core's limit."""

    def read(limit: int) -> bytes:
        with path.open("rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FileTooLarge(f"{path.name} is over {limit} bytes")
        return data

    return IncomingFile(filename=path.name, read=read, size=path.stat().st_size)


class ConsoleSession:
    """One person (or a script) at the console. `run_line` returns what was printed."""

    def __init__(
        self,
        core: CommandCore,
        deliverer: OutboxDeliverer,
        out_dir: Path,
        *,
        team: TeamRef = CONSOLE_TEAM,
        channel: str = CONSOLE_CHANNEL,
        user: Actor = DEFAULT_USER,
        base_dir: Path | None = None,
    ) -> None:
        self.core = core
        self.deliverer = deliverer
        self.out_dir = Path(out_dir)
        self.team = team
        self.channel = channel
        self.user = user
        self.base_dir = base_dir or Path.cwd()  # relative file paths start here
        sender = deliverer.sender
        self.counter = sender.counter if isinstance(sender, ConsoleSender) else MessageCounter()
        self.lock = threading.Lock()  # one line (or background delivery) at a time
        self.finished = False

    # -- one line ------------------------------------------------------------------------

    def run_line(self, line: str) -> list[str]:
        with self.lock:
            out = self._dispatch(line.strip())
            return out + self._deliver()

    def deliver(self) -> list[str]:
        with self.lock:
            return self._deliver()

    def _dispatch(self, line: str) -> list[str]:
        if not line or line.startswith("#"):
            return []
        if line.startswith("/"):
            return self._slash(line[1:])
        word, _, rest = line.partition(" ")
        word = word.lower()
        if word == "react":
            return self._react(rest)
        if word == "reply":
            return self._reply_in_thread(rest)
        if word == "as":
            return self._switch_user(rest)
        if word == "press":
            return self._press(rest)
        if word == "wait":
            return self._wait(rest)
        if word == "deliver":
            return []
        if word in ("help", "?"):
            return [_HELP + "\n" + self._replies([Reply(self._help())])[0]]
        if word in ("quit", "exit"):
            self.finished = True
            return []
        return [f"Unknown console command '{word}'; type help."]

    def _help(self) -> str:
        parsed = self.core.text_parser("/style", "help")
        replies = self.core.handle(self._command(parsed.name, dict(parsed.args)))
        return replies[0].text if replies else ""

    def _slash(self, text: str) -> list[str]:
        slash, _, rest = text.partition(" ")
        files: list[IncomingFile] = []
        if slash.lower() == "style" and rest.split(" ", 1)[0].lower() == "add":
            words = split_words(rest)[1:]
            name = words.pop(0) if words and not self._is_path(words[0]) else ""
            try:
                files = [local_file(self._path(w)) for w in words]
            except FileNotFoundError as missing:
                return [f"No such file: {missing.filename}"]
            rest = f"add {name}" if name else "add"
        elif slash.lower() in ("imagine", "style"):
            # `/imagine a cat file=./start.png`, `/style import ink inkstyle file=./ink.safetensors`
            match = _FILE_OPTION.search(rest)
            if match:
                try:
                    files = [local_file(self._path(match.group(1)))]
                except FileNotFoundError as missing:
                    return [f"No such file: {missing.filename}"]
                rest = (rest[: match.start()] + rest[match.end() :]).strip()
        parsed = self.core.text_parser("/" + slash, rest)
        command = self._command(parsed.name, dict(parsed.args), files=files)
        return self._replies(self.core.handle(command))

    def _react(self, rest: str) -> list[str]:
        parts = rest.split()
        if len(parts) != 2 or not parts[0].lstrip("[").rstrip("]").isdigit():
            return ["Usage: react N EMOJI, e.g. react 4 ✅"]
        number = parts[0].lstrip("[").rstrip("]")
        emoji = _EMOJI_WORDS.get(parts[1].lower(), parts[1])
        reaction = Reaction(
            event_id=_event_id(),
            team=self.team,
            channel=self.channel,
            message_id=number,
            emoji=emoji,
            user=self.user,
        )
        replies = self.core.handle_reaction(reaction)
        return self._replies(replies) or [f"(your {emoji} on [{number}] changed nothing)"]

    def _press(self, rest: str) -> list[str]:
        words = split_words(rest)
        usage = "Usage: press N ACTION [IMAGE] [prompt=...], e.g. press 9 vary"
        if len(words) < 2 or not words[0].strip("[]").isdigit():
            return [usage]
        number = words[0].strip("[]")
        action = ACTION_WORDS.get(words[1].lower())
        if action is None:
            return [f"Unknown button '{words[1]}'; use one of {', '.join(ACTION_WORDS)}."]
        values = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        positions = [w for w in words[2:] if "=" not in w]
        image = int(positions[0]) if positions and positions[0].isdigit() else 1
        item = self.core.services.outbox.find_posted(PLATFORM, number)
        generation = item.extra.get("generation_id") if item is not None else None
        if not isinstance(generation, int):
            return [f"[{number}] is not a result with buttons."]
        press = Press(
            event_id=_event_id(),
            team=self.team,
            channel=self.channel,
            user=self.user,
            button=ButtonId(action, generation, image).encode(),
            values=values,
        )
        replies = self.core.handle_press(press)
        out: list[str] = []
        for reply in replies:
            if reply.form is not None:
                fields = "; ".join(f"{f.name}={f.value!r}" for f in reply.form.fields)
                out.append(
                    f"{reply.form.title}: {fields}\nSend them back with "
                    f'`press {number} edit prompt="..." negative="..."`.'
                )
        return out + self._replies(r for r in replies if r.form is None)

    def _reply_in_thread(self, rest: str) -> list[str]:
        words = split_words(rest)
        if len(words) < 2 or not words[0].isdigit():
            return ["Usage: reply N FILE..., e.g. reply 2 ./c.png"]
        try:
            files = [local_file(self._path(w)) for w in words[1:]]
        except FileNotFoundError as missing:
            return [f"No such file: {missing.filename}"]
        command = self._command("style add", {}, thread=words[0], files=files)
        replies = self.core.handle(command)
        return self._replies(replies) or [f"([{words[0]}] is not a style's thread)"]

    def _switch_user(self, rest: str) -> list[str]:
        words = rest.split()
        if not words:
            return [f"You are {self.user.user_id}; usage: as NAME [lead]"]
        roles = frozenset({CONSOLE_LEAD_ROLE}) if "lead" in words[1:] else frozenset()
        self.user = Actor(words[0], words[0], roles)
        return [f"You are now {words[0]}" + (" (art lead)" if roles else "") + "."]

    def _wait(self, rest: str) -> list[str]:
        try:
            timeout = float(rest) if rest.strip() else 600.0
        except ValueError:
            return ["Usage: wait [SECONDS]"]
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            out += self._deliver()
            if not self._busy() or time.monotonic() >= deadline:
                break
            time.sleep(0.5)  # a person (or the demo) is waiting for a runner here
        out += self._deliver()
        return out

    def _busy(self) -> bool:
        services = self.core.services
        with services.db.session() as s:
            team = find_team(s, self.team)
            team_id = team.id if team else None
        if team_id is None:
            return False
        active = services.queue.list_jobs(
            team_id=team_id, statuses=(JobStatus.QUEUED, JobStatus.RUNNING), limit=1
        )
        return bool(active) or bool(services.outbox.due(PLATFORM, limit=1))

    # -- helpers -------------------------------------------------------------------------

    def _command(
        self,
        name: str,
        args: dict[str, str],
        *,
        thread: str | None = None,
        files: Sequence[IncomingFile] = (),
    ) -> Command:
        return Command(
            event_id=_event_id(),
            team=self.team,
            channel=self.channel,
            user=self.user,
            name=name,
            args=args,
            thread=thread,
            attachments=tuple(files),
        )

    def _replies(self, replies: Iterable[Reply]) -> list[str]:
        out: list[str] = []
        for reply in replies:
            number = self.counter.next()
            saved = files_saved(self.out_dir, number, reply.files)
            out.append(render(number, reply.text, saved, private=reply.private))
        return out

    def _deliver(self) -> list[str]:
        self.deliverer.deliver_due()
        sender = self.deliverer.sender
        return sender.drain() if isinstance(sender, ConsoleSender) else []

    def _path(self, word: str) -> Path:
        path = Path(word).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        if not path.is_file():
            raise FileNotFoundError(2, "No such file", word)
        return path

    def _is_path(self, word: str) -> bool:
        return "/" in word or "\\" in word or (self.base_dir / word).is_file()

    # -- loops ---------------------------------------------------------------------------

    def run(self, lines: Iterable[str], out: TextIO, *, echo: bool = True) -> None:
        """Scripted use: run each line, printing it (when `echo`) and what it printed."""
        for line in lines:
            if echo and line.strip():
                print(f"> {line.rstrip()}", file=out)
            for block in self.run_line(line):
                print(block, file=out)
            out.flush()
            if self.finished:
                break


def _event_id() -> str:
    return f"console-{uuid.uuid4().hex}"


def open_console(settings: Settings, *, out_dir: Path | None = None) -> ConsoleSession:
    """Everything the console needs, from settings (migrating the database if allowed)."""
    db = Database(settings.database_url)
    db.prepare(auto_migrate=settings.auto_migrate)
    blobs = BlobStore(settings.blob_dir, settings.max_blob_bytes)
    queue, outbox = JobQueue(db), Outbox(db)
    # One local person (or the demo script): the chat rate limit would only get in the way.
    policy = CorePolicy(rate_limit_commands=10_000)
    core = CommandCore(db, blobs, settings, queue, outbox, policy=policy)
    folder = out_dir or settings.data_dir / "console"
    sender = ConsoleSender(folder, console_counter(db, folder))
    return ConsoleSession(core, OutboxDeliverer(outbox, blobs, sender, PLATFORM), folder)


def main(settings: Settings, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """`atelier bot console`: interactive at a terminal, scripted when stdin is a file/pipe."""
    from bot.scheduler import start_scheduler  # APScheduler only for the long-running loop

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    session = open_console(settings)
    services = session.core.services
    if not stdin.isatty():
        session.run(stdin, stdout)
        return 0
    print(f"Atelier console. Images are saved to {session.out_dir}. Type help.", file=stdout)
    scheduler = start_scheduler(deliverers=[], queue=services.queue, blobs=services.blobs)
    stop = threading.Event()

    def background_delivery() -> None:
        while not stop.wait(2.0):
            for block in session.deliver():
                print("\n" + block, file=stdout, flush=True)

    threading.Thread(target=background_delivery, daemon=True).start()
    try:
        while not session.finished:
            try:
                line = input("atelier> ")
            except EOFError:
                break
            for block in session.run_line(line):
                print(block, file=stdout)
    except KeyboardInterrupt:
        print(file=stdout)
    finally:
        stop.set()
        scheduler.shutdown(wait=False)
    return 0
