"""Per-sequence state kept by a service, keyed by the orchestrator's sequence id, with a cap and a TTL.

Sessions end when the orchestrator releases them; one whose client vanished expires after `ttl_s` idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cast_core.errors import InvalidArgument, NotFound, ResourceExhausted

State = TypeVar("State")


@dataclass
class _Entry(Generic[State]):
    state: State
    last_used: float


@dataclass
class SessionStore(Generic[State]):
    max_sessions: int
    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    _entries: dict[str, _Entry[State]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sequence_id: str) -> bool:
        return sequence_id in self._entries

    def create(self, sequence_id: str, state: State) -> State:
        if not sequence_id:
            raise InvalidArgument("must not be empty", "sequence_id")
        if sequence_id in self._entries:
            raise InvalidArgument(f"sequence {sequence_id!r} already exists", "sequence_id")
        if len(self._entries) >= self.max_sessions:
            self.expire()
        if len(self._entries) >= self.max_sessions:
            raise ResourceExhausted(f"{self.max_sessions} live sequences: no room for another", "sequence_id")
        self._entries[sequence_id] = _Entry(state, self.clock())
        return state

    def get(self, sequence_id: str) -> State:
        entry = self._entries.get(sequence_id)
        if entry is None:
            raise NotFound(f"unknown sequence {sequence_id!r} (never created, released or expired)", "sequence_id")
        entry.last_used = self.clock()
        return entry.state

    def release(self, sequence_ids) -> int:
        """Drop the given sequences; unknown ids are ignored (release is idempotent). Returns how many were live."""
        return sum(self._entries.pop(s, None) is not None for s in sequence_ids)

    def expire(self) -> list[str]:
        """Drop sequences idle for longer than the TTL; return their ids."""
        cutoff = self.clock() - self.ttl_s
        stale = [s for s, e in self._entries.items() if e.last_used < cutoff]
        for s in stale:
            del self._entries[s]
        return stale
