"""Child processes that cannot outlive the dicomflow process that started them, even one killed by SIGKILL
(issue 12: `kill -9` of `dicomflow convert` left its workers running for good; stopping `dicomflow dev`
impatiently left emulators and functions behind).

Two mechanisms, one per kind of child:
- worker processes of the local runner call `die_with_parent` when they start: on Linux the kernel sends
  them SIGKILL when their parent dies (prctl PR_SET_PDEATHSIG, see prctl(2)); elsewhere a thread polls the
  parent's pid. A parent that died before the call is noticed at once (the pid changed).
- the dev stack's components run in process groups of their own (the Firestore emulator's wrapper starts a
  JVM in its group, which outlives its wrapper). A `Lifeline` is a small watchdog process, in a session of
  its own so that no terminal signal reaches it, that reads the groups to guard from a pipe. Only the
  parent holds the pipe's other end, so when the parent dies — however it dies — the watchdog reads
  end-of-file and stops every group still registered: SIGTERM, then SIGKILL after a grace period.
  PR_SET_PDEATHSIG would not reach the JVM (the signal is not inherited across fork), and it fires when
  the *thread* that started a child ends, which a lifeline does not depend on.

`python -m dicomflow.lifeline GRACE` is the watchdog itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.05


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Make the calling process die when `parent_pid` (its parent when it was started) dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:  # pragma: no cover - not Linux

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the signal was armed


# --- process groups ----------------------------------------------------------------------------------------


def _live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies (a zombie is dead, whoever has to reap it)."""
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - not Linux: any member, zombies included
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _signal_groups(pgids: Iterable[int], sig: int) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def stop_groups(pgids: Iterable[int], grace: float, reap: Iterable[subprocess.Popen[bytes]] = ()) -> list[int]:
    """SIGTERM every group at once, wait up to `grace` seconds for all of their processes to end, SIGKILL
    what is left. `reap`: our own children among them (waited for, so they do not stay zombies). Returns
    the groups that still had live processes after SIGKILL (none, unless the kernel is stuck)."""
    groups = sorted(set(pgids))
    children = list(reap)
    _signal_groups(groups, signal.SIGTERM)
    _wait_groups(groups, children, time.monotonic() + grace)
    alive = [g for g in groups if _live_members(g)]
    if alive:
        _signal_groups(alive, signal.SIGKILL)
        _wait_groups(alive, children, time.monotonic() + 2.0)
    return [g for g in groups if _live_members(g)]


def _wait_groups(groups: list[int], children: list[subprocess.Popen[bytes]], deadline: float) -> None:
    while True:
        for child in children:
            child.poll()
        if not any(_live_members(g) for g in groups) or time.monotonic() >= deadline:
            return
        time.sleep(POLL_SECONDS)


class Lifeline:
    """The watchdog of a set of process groups: they are stopped when this process dies or `close`s."""

    def __init__(self, grace: float = 5.0) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "dicomflow.lifeline", str(grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # no terminal signal (Ctrl-C to the foreground group) reaches it
        )
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _send(self, line: str) -> None:
        pipe = self._process.stdin
        if pipe is None:
            return
        with self._lock, contextlib.suppress(BrokenPipeError, ValueError):
            pipe.write(line.encode())
            pipe.flush()

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def release(self, pgid: int) -> None:
        """The group was stopped by its owner: never signal that id again (it may be reused)."""
        self._send(f"-{pgid}\n")

    def close(self, timeout: float = 10.0) -> None:
        """End the watch: the watchdog stops whatever is still registered, then exits."""
        pipe = self._process.stdin
        if pipe is not None:
            with self._lock, contextlib.suppress(OSError):
                pipe.close()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def watchdog(commands: IO[bytes], grace: float) -> list[int]:
    """Read `+PGID` / `-PGID` lines until end of file, then stop the groups still registered."""
    groups: set[int] = set()
    for raw in commands:
        line = raw.strip()
        if len(line) > 1 and line[1:].isdigit():
            pgid = int(line[1:])
            if line.startswith(b"+"):
                groups.add(pgid)
            elif line.startswith(b"-"):
                groups.discard(pgid)
    return stop_groups(groups, grace)


def main(argv: list[str]) -> int:
    # Ignore what a terminal or a parent's group could send; end of file on stdin is the only way out.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    grace = float(argv[1]) if len(argv) > 1 else 5.0
    return 1 if watchdog(sys.stdin.buffer, grace) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
