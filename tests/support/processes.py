"""Finding the processes a test started, by a marker in their environment (names alone would also find
other people's emulators and functions on a shared machine)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from pathlib import Path

MARKER_VARIABLE = "DFTEST_PROCESS_MARKER"


def new_marker() -> str:
    return secrets.token_hex(8)


def marked(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries the marker (children inherit
    it; zombies have no environment left and are not counted)."""
    wanted = f"{MARKER_VARIABLE}={marker}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if wanted in environ.split(b"\0"):
            found[int(entry.name)] = command
    return found


def wait_until_gone(marker: str, timeout: float) -> dict[int, str]:
    """The marked processes still alive after `timeout` seconds (empty as soon as none is left)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = marked(marker)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def kill_marked(marker: str) -> None:
    """Clean up after a failed test: SIGKILL whatever carries the marker (only processes this test started)."""
    for pid in marked(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
