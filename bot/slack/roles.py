"""Which of the configured lead user groups a Slack user belongs to (cached)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

log = logging.getLogger(__name__)


class GroupRoles:
    """Maps a user id to the user-group ids (from settings) that contain them.

    Membership is read with `usergroups.users.list` and kept for `ttl_seconds`, so a busy
    channel costs one API call per group per TTL, not one per command.
    """

    def __init__(
        self,
        client: WebClient,
        group_ids: Sequence[str],
        *,
        ttl_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._groups = tuple(g for g in group_ids if g)
        self._ttl = ttl_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def roles_for(self, user_id: str) -> frozenset[str]:
        return frozenset(g for g in self._groups if user_id in self._members(g))

    def _members(self, group: str) -> frozenset[str]:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(group)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        try:
            response = self._client.usergroups_users_list(usergroup=group)
            members = frozenset(str(u) for u in response.get("users") or [])
        except SlackApiError as exc:
            # Keep the last known members (or none): a lead check must not crash a command.
            log.warning(
                "Cannot read Slack user group %s (%s); give the app the usergroups:read scope "
                "and check ATELIER_SLACK_LEAD_GROUP.",
                group,
                exc.response.get("error", exc.response.status_code),
            )
            members = cached[1] if cached is not None else frozenset()
        with self._lock:
            self._cache[group] = (now, members)
        return members
