"""The lifeline alone: a process group it guards — grandchildren included, like the JVM the Firestore
emulator's wrapper starts — dies when the guarding process is killed with SIGKILL, and a group released
by its owner is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.processes import MARKER_VARIABLE, kill_marked, marked, new_marker, wait_until_gone

pytestmark = pytest.mark.integration

PARENT = """
import subprocess, sys, time
from dicomflow.lifeline import Lifeline
lifeline = Lifeline(grace=1.0)
group = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300; wait"], start_new_session=True)
lifeline.watch(group.pid)
if sys.argv[1] == "release":
    lifeline.release(group.pid)
print("ready", flush=True)
time.sleep(300)
"""


@pytest.fixture
def marker() -> Iterator[str]:
    value = new_marker()
    yield value
    kill_marked(value)


def _sleeps(marker: str) -> list[int]:
    return [pid for pid, command in marked(marker).items() if command == "sleep 300"]


def _start(marker: str, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, MARKER_VARIABLE: marker}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    ready = parent.stdout.readline().strip()
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while len(_sleeps(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # bash starts its two sleeps on its own time
    if ready != "ready" or len(_sleeps(marker)) != 2:
        parent.kill()
        parent.wait()
        pytest.fail(f"the guarded group did not start: {marked(marker)}")
    return parent


def test_a_guarded_group_and_its_grandchildren_die_with_their_sigkilled_parent(marker: str) -> None:
    parent = _start(marker, "watch")  # the group's leader has two children of its own: the "JVM"
    parent.kill()
    parent.wait()
    assert wait_until_gone(marker, timeout=5) == {}


def test_a_released_group_is_left_alone(marker: str) -> None:
    parent = _start(marker, "release")
    parent.kill()
    parent.wait()
    time.sleep(2)  # longer than the watchdog needs to act on end of file
    assert len(_sleeps(marker)) == 2, marked(marker)
