"""The simulation kernel: one seeded scheduler that owns time and every interleaving.

In the spirit of FoundationDB's sim2 and TigerBeetle's VOPR: every simulated process (a worker handling a
request, a queue's dispatcher, a heartbeat, the reconciler, a client) is a greenlet; it runs until it
reaches a *yield point* (every port call, every sleep), and the scheduler then picks the next runnable
process with its seeded random generator. Nothing runs concurrently for real, so a run is a pure function
of its seed: a failing seed replays exactly.

Time is simulated: `sleep` moves a process onto the timer heap, and the clock jumps to the next timer when
nothing is runnable, so hours of retries and backoffs cost microseconds.

A process can be killed (a crashed instance, an OOM kill): `Crash` is raised at its next yield point and
its children (e.g. its lease heartbeat) die with it. `Crash` derives from BaseException so that the code
under test, which rightly catches Exception to record unexpected errors, cannot swallow a crash.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import greenlet

START = 1_800_000_000.0  # a fixed, realistic Unix time: runs never depend on the real clock


class Crash(BaseException):
    """The simulated process dies at this point: no answer, no further side effects."""


@dataclass(eq=False)
class Proc:
    name: str
    glet: greenlet.greenlet
    parent: Proc | None = None
    children: list[Proc] = field(default_factory=list)
    killed: bool = False
    done: bool = False
    wake: int = 0  # bumped on every block: stale timer entries are ignored

    def __repr__(self) -> str:
        return f"<{self.name}{' killed' if self.killed else ''}>"


class SimEvent:
    """A flag processes can wait on, with a timeout (like threading.Event, in simulated time)."""

    def __init__(self, sim: Sim) -> None:
        self._sim = sim
        self.is_set = False
        self._waiters: list[Proc] = []

    def set(self) -> None:
        self.is_set = True
        waiters, self._waiters = self._waiters, []
        for proc in waiters:
            self._sim._make_ready(proc)

    def clear(self) -> None:
        self.is_set = False

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set:
            return True
        proc = self._sim.current()
        self._waiters.append(proc)
        self._sim._block(proc, timeout)
        if proc in self._waiters:
            self._waiters.remove(proc)
        return self.is_set


class Sim:
    def __init__(self, seed: int, *, start: float = START) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = start
        self.start = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, Proc, int]] = []
        self._ready: list[Proc] = []
        self._current: Proc | None = None
        self._main = greenlet.getcurrent()
        self.errors: list[tuple[str, BaseException]] = []
        self.steps = 0
        self.ids = random.Random(seed ^ 0x5EED)

    # --- for the code under test -------------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    def new_id(self, nbytes: int) -> str:
        """Random ids (batch ids, lease owners) from the seed, so a replay names everything the same."""
        return self.ids.getrandbits(nbytes * 8).to_bytes(nbytes, "big").hex()

    # --- processes ----------------------------------------------------------------------------------

    def current(self) -> Proc:
        if self._current is None:
            raise RuntimeError("not inside a simulated process")
        return self._current

    def in_process(self) -> bool:
        return self._current is not None

    def spawn(self, name: str, fn: Callable[..., Any], *args: Any, child: bool = False) -> Proc:
        """Start a process (runnable now). A `child` dies when the process that spawned it dies."""
        parent = self._current if child else None
        proc = Proc(name=name, glet=greenlet.greenlet(lambda: None), parent=parent)

        def body() -> None:
            try:
                fn(*args)
            except Crash:
                pass
            except Exception as exc:
                self.errors.append((proc.name, exc))
            finally:
                proc.done = True

        proc.glet = greenlet.greenlet(body, parent=self._main)
        if parent is not None:
            parent.children.append(proc)
        self._ready.append(proc)
        return proc

    def sleep(self, seconds: float) -> None:
        self._block(self.current(), max(0.0, seconds))

    def yield_now(self) -> None:
        """Let any other runnable process go first (a yield point without time passing)."""
        self._block(self.current(), 0.0)

    def kill(self, proc: Proc) -> None:
        """Kill a process and its children: each raises Crash at its next yield point."""
        for victim in [proc, *self._descendants(proc)]:
            if not victim.done and not victim.killed:
                victim.killed = True
                self._make_ready(victim)

    def crash_here(self) -> None:
        """The calling process dies now (with its children)."""
        proc = self.current()
        self.kill(proc)
        raise Crash

    def _descendants(self, proc: Proc) -> list[Proc]:
        found: list[Proc] = []
        for child in proc.children:
            found += [child, *self._descendants(child)]
        return found

    def _block(self, proc: Proc, timeout: float | None) -> None:
        if proc.killed:
            raise Crash
        proc.wake += 1
        if timeout is not None:
            if timeout <= 0:
                self._ready.append(proc)
            else:
                heapq.heappush(self._timers, (self.now + timeout, next(self._seq), proc, proc.wake))
        self._main.switch()
        if proc.killed:
            raise Crash

    def _make_ready(self, proc: Proc) -> None:
        if proc.done or proc in self._ready:
            return
        proc.wake += 1  # its timer entry, if any, is now stale
        self._ready.append(proc)

    # --- the scheduler --------------------------------------------------------------------------------

    def run(
        self, until: float | None = None, stop: Callable[[], bool] | None = None, max_steps: int = 5_000_000
    ) -> None:
        """Run processes until nothing is left to do, simulated time passes `until`, or `stop()`."""
        while self.steps < max_steps:
            if stop is not None and stop():
                return
            if self._ready:
                proc = self._ready.pop(self.rng.randrange(len(self._ready)))
                if proc.done:
                    continue
                self.steps += 1
                self._current = proc
                try:
                    proc.glet.switch()
                finally:
                    self._current = None
                continue
            if not self._timers:
                if until is not None:
                    self.now = max(self.now, until)  # nothing to do until then: time still passes
                return
            when, _, proc, wake = self._timers[0]
            if until is not None and when > until:
                self.now = max(self.now, until)
                return
            heapq.heappop(self._timers)
            if proc.done or wake != proc.wake:
                continue
            self.now = max(self.now, when)
            self._ready.append(proc)
        raise RuntimeError(f"simulation did not settle within {max_steps} steps")

    def idle(self) -> bool:
        return not self._ready and not any(not p.done and w == p.wake for _, _, p, w in self._timers)
