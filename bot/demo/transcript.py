"""The demo's conversation as the console printed it, kept as a chat shows it.

The console prints each message as `[N] atelier (tags): text` followed by `    📎 path`
lines for its files (see bot/console.py `render`). An edit reprints message N, and a chat
shows only the latest version, so an edit replaces the earlier entry in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

_HEADER = re.compile(
    r"^\[(?P<number>\d+)\] atelier"
    r"(?: \(thread of \[(?P<thread>\d+)\]\))?"
    r"(?: \((?P<tag>edited|only you)\))?: ?"
)
_FILE = re.compile(r"^ {4}📎 (?P<path>.+)$")


@dataclass(frozen=True)
class Entry:
    """One line typed by a person, one bot message, or a narration note of the demo."""

    kind: str  # "command" | "message" | "console" | "note"
    text: str
    who: str = ""
    number: int | None = None
    thread: int | None = None
    files: tuple[Path, ...] = ()
    edited: bool = False
    private: bool = False


def parse_block(block: str) -> Entry:
    """One printed block -> an Entry (text the console prints for itself becomes "console")."""
    lines = block.split("\n")
    match = _HEADER.match(lines[0])
    if match is None:
        return Entry("console", block)
    files: list[Path] = []
    text_lines = [lines[0][match.end() :]]
    for line in lines[1:]:
        found = _FILE.match(line)
        if found:
            files.append(Path(found.group("path")))
        else:
            text_lines.append(line)
    thread = match.group("thread")
    return Entry(
        "message",
        "\n".join(text_lines).strip(),
        who="atelier",
        number=int(match.group("number")),
        thread=int(thread) if thread else None,
        files=tuple(files),
        edited=match.group("tag") == "edited",
        private=match.group("tag") == "only you",
    )


@dataclass
class Transcript:
    entries: list[Entry] = field(default_factory=list)

    def command(self, who: str, line: str) -> None:
        self.entries.append(Entry("command", line, who=who))

    def note(self, text: str) -> None:
        self.entries.append(Entry("note", text))

    def add_blocks(self, blocks: list[str]) -> list[Entry]:
        """Record printed blocks; returns them parsed, in order."""
        parsed = [parse_block(b) for b in blocks]
        for entry in parsed:
            self._add(entry)
        return parsed

    def _add(self, entry: Entry) -> None:
        if entry.kind == "message" and entry.edited:
            for i, old in enumerate(self.entries):
                if old.kind == "message" and old.number == entry.number:
                    # An edit without files keeps the files the message already shows.
                    files = entry.files or old.files
                    self.entries[i] = replace(entry, files=files, thread=old.thread)
                    return
        self.entries.append(entry)

    def messages(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "message"]

    def message(self, number: int) -> Entry | None:
        return next((e for e in self.messages() if e.number == number), None)
