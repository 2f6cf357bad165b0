"""State stores for the contract suite: every adapter of the StateStore port, built the same way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomflow.adapters.local.sqlite_store import SqliteStateStore
from dicomflow.ports import StateStore
from tests.fakes.memory_store import MemoryStateStore


class Clock:
    """A settable clock: stores read time only through it, so tests control expiry."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


STORE_PARAMS = ["sqlite", "memory", pytest.param("firestore", marks=pytest.mark.emulator)]


def make_store(kind: str, tmp_path: Path, clock: Clock) -> Iterator[StateStore]:
    if kind == "sqlite":
        sqlite = SqliteStateStore(tmp_path / "state.sqlite", clock)
        yield sqlite
        sqlite.close()
        return
    if kind == "memory":
        yield MemoryStateStore(clock)
        return
    from tests.support.emulators import firestore_store

    yield from firestore_store(clock)
