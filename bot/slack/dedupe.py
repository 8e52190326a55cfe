"""Remember recently seen delivery ids so a Slack retry is acked and not worked twice."""

from __future__ import annotations

import threading
from collections import OrderedDict


class RecentIds:
    """A bounded, thread-safe set of ids; the oldest are forgotten first.

    This is the fast path: the core's persistent event-id guard still catches a retry
    that arrives after a restart.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, key: str) -> bool:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = None
            if len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
            return True
