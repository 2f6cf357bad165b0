"""The real emulators for the emulator and e2e tiers, started once per test session.

Locally, a missing emulator skips its tests with the reason; in CI (CI=true) it fails them
(tests/conftest.py `require`).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dicomflow import devstack
from dicomflow.adapters.firestore_store import FirestoreStateStore
from dicomflow.lifeline import Lifeline
from tests.conftest import require
from tests.support.stores import Clock

_FIRESTORE: dict[str, object] = {}


def firestore_host() -> str:
    """host:port of the session's Firestore emulator (started on first use, stopped at exit)."""
    if "host" not in _FIRESTORE:
        require(devstack.firestore_emulator_available(), "the Firestore emulator (gcloud + Java) is not installed")
        log_dir = Path(tempfile.mkdtemp(prefix="dicomflow-emulators-"))
        # The emulator (and its JVM) dies with this test session, even one killed with SIGKILL.
        lifeline = Lifeline()
        managed, host = devstack.start_firestore(log_dir, lifeline=lifeline)
        _FIRESTORE.update(host=host, managed=managed, lifeline=lifeline)
        os.environ["FIRESTORE_EMULATOR_HOST"] = host
    return str(_FIRESTORE["host"])


def stop_all() -> None:
    managed = _FIRESTORE.pop("managed", None)
    if isinstance(managed, devstack.Managed):
        managed.stop()
    lifeline = _FIRESTORE.pop("lifeline", None)
    if isinstance(lifeline, Lifeline):
        lifeline.close()
    _FIRESTORE.clear()


def unique_project() -> str:
    """A project id of our own: the emulator keeps projects apart, so tests never see each other's data."""
    return f"test-{secrets.token_hex(6)}"


def firestore_store(clock: Clock) -> Iterator[FirestoreStateStore]:
    firestore_host()
    store = FirestoreStateStore.connect(unique_project(), "(default)", clock)
    yield store
    store.close()


def tasks_emulator_python() -> str:
    python = os.environ.get("DICOMFLOW_TASKS_EMULATOR_PYTHON", str(devstack.REPO / ".venv-tasks" / "bin" / "python"))
    require(Path(python).exists(), f"gcloud-tasks-emulator is not installed ({python}); run make tools")
    return python
