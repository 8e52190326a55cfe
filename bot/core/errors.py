"""Exceptions the core turns into replies; never shown as tracebacks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class UserError(Exception):
    """Something the person must change; `message` is one line saying what and how."""

    def __init__(self, message: str, *, private: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.private = private


@dataclass(frozen=True)
class AuditNote:
    """What a refusal records in the audit log."""

    action: str
    object_type: str
    object_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


class Refused(UserError):
    """A refusal by policy (role, blocklist, rate limit): recorded in the audit log."""

    def __init__(self, message: str, audit: AuditNote) -> None:
        super().__init__(message, private=True)
        self.audit = audit


class DuplicateEvent(Exception):
    """The platform delivered this event before; the core does nothing the second time."""
