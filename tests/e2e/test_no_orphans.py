"""No orphans (issue 12): whatever dicomflow starts dies with it — the local runner's worker processes when
`dicomflow convert` is killed with SIGKILL, every dev-stack component (the Firestore emulator's JVM
included) when `dicomflow dev` is, and `make dev` stops everything within 10 s of SIGTERM even when a
second signal arrives during the shutdown. Processes are found by a marker in their environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from dicomflow import devstack, samples
from tests.conftest import require
from tests.support import emulators
from tests.support.cli import wait_for_succeeded
from tests.support.processes import MARKER_VARIABLE, kill_marked, marked, new_marker, wait_until_gone

pytestmark = pytest.mark.e2e

DICOMFLOW = str(Path(sys.executable).parent / "dicomflow")
STARTUP_SECONDS = 240


@pytest.fixture
def marker() -> Iterator[str]:
    value = new_marker()
    yield value
    kill_marked(value)  # a failed test leaves nothing behind either


def test_sigkill_of_convert_takes_its_worker_processes_with_it(tmp_path: Path, marker: str) -> None:
    samples.make_bench_archive(tmp_path / "dicom", series=16, slices=24, rows=96, cols=96, seed=5)
    out = tmp_path / "nifti"
    env = {**os.environ, "HOME": str(tmp_path), MARKER_VARIABLE: marker}
    proc = subprocess.Popen([DICOMFLOW, "convert", str(tmp_path / "dicom"), str(out), "--workers", "2", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_succeeded(proc, out / ".dicomflow" / "state.sqlite", at_least=2)
    assert proc.poll() is None, "the run finished before it could be killed; make the archive larger"
    workers = [pid for pid in marked(marker) if pid != proc.pid]
    assert len(workers) >= 2, f"the worker processes were not found: {marked(marker)}"

    proc.kill()  # SIGKILL to the CLI alone, not to its process group: nothing else is told
    proc.wait()
    survivors = wait_until_gone(marker, timeout=10)
    assert survivors == {}, f"still running after the CLI was killed: {survivors}"


class Started:
    """A `dicomflow dev` (directly or through make) that printed "ready", with the thread reading it."""

    def __init__(self, proc: subprocess.Popen[str], reader: threading.Thread) -> None:
        self.proc = proc
        self.reader = reader

    def close(self, timeout: float = 10) -> None:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _start_and_wait_ready(args: list[str], env: dict[str, str], cwd: Path | None = None) -> Started:
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.append(line)
            if line.startswith("ready"):
                ready.set()

    assert proc.stdout is not None
    reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
    reader.start()
    started = Started(proc, reader)
    deadline = time.monotonic() + STARTUP_SECONDS
    while not ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            started.close()
            pytest.fail("the dev stack did not start:\n" + "".join(lines[-40:]))
    return started


def _dev_env(tmp_path: Path, marker: str) -> dict[str, str]:
    python = emulators.tasks_emulator_python()
    require(devstack.firestore_emulator_available(), "the Firestore emulator (gcloud + Java) is missing")
    return {**os.environ, "HOME": str(tmp_path), MARKER_VARIABLE: marker, "DICOMFLOW_TASKS_EMULATOR_PYTHON": python}


def test_sigkill_of_dicomflow_dev_stops_every_component_and_the_emulator_jvm(tmp_path: Path, marker: str) -> None:
    env = _dev_env(tmp_path, marker)
    dev = _start_and_wait_ready([DICOMFLOW, "dev", "--logs", str(tmp_path / "logs")], env)
    running = marked(marker)
    assert any("java" in command for command in running.values()), f"no emulator JVM among {running}"
    assert sum("functions-framework" in command for command in running.values()) >= 5

    dev.proc.kill()
    dev.close()
    survivors = wait_until_gone(marker, timeout=10)
    assert survivors == {}, f"still running after `dicomflow dev` was killed: {survivors}"


def test_make_dev_stops_everything_within_10_s_of_sigterm_even_when_signalled_twice(
    tmp_path: Path, marker: str
) -> None:
    env = _dev_env(tmp_path, marker)
    make = _start_and_wait_ready(["make", "dev", f"DEV_ARGS=--logs {tmp_path / 'logs'}"], env, cwd=devstack.REPO)
    (dev,) = [
        pid
        for pid, command in marked(marker).items()
        if "python" in Path(command.split()[0]).name and "dicomflow dev" in command
    ]

    started = time.monotonic()
    make.proc.send_signal(signal.SIGTERM)  # make forwards it to `dicomflow dev`
    time.sleep(0.5)
    make.proc.send_signal(signal.SIGTERM)  # impatient: again, to make...
    os.kill(dev, signal.SIGTERM)  # ...and straight to `dicomflow dev`, in the middle of its shutdown
    survivors = wait_until_gone(marker, timeout=10 - (time.monotonic() - started))
    assert survivors == {}, f"still running 10 s after SIGTERM: {survivors}"
    make.close(timeout=5)
