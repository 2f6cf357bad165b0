"""Faults at every port call: an error before the side effect, an error *after* it (the write landed, the
answer was lost: Firestore's DeadlineExceeded, a dropped connection), and a crash of the whole instance
before or after it. Every port call is also a yield point with a small simulated latency, so the
scheduler can interleave other processes between any two steps of a handler.

A fault plan is random (seeded: the simulation's generator) while faults are on, plus scripted rules
for the named regression scenarios. Every injected fault is recorded, so a failing seed prints its
fault schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicomflow.domain.failures import ServiceUnavailable
from dicomflow.ports import QueueName, Task
from tests.sim.kernel import Sim

KINDS = ("error_before", "error_after", "crash_before", "crash_after")


@dataclass(frozen=True)
class Injected:
    time: float
    process: str
    call: str
    kind: str

    def __str__(self) -> str:
        return f"t+{self.time:9.1f}s {self.kind:<12} {self.call:<34} in {self.process}"


@dataclass
class Rule:
    """A scripted fault: `kind` on calls whose name starts with `call`, in processes whose name starts
    with `process`, between `after` and `before` (sim seconds since start), at most `times` times."""

    call: str
    kind: str
    process: str = ""
    after: float = 0.0
    before: float = float("inf")
    times: int = 1
    skip: int = 0  # let this many matching calls through first
    contains: str = ""  # ...and whose process name contains this (e.g. a generation: "-g0-")

    def matches(self, call: str, process: str, elapsed: float) -> bool:
        return (
            self.times > 0
            and call.startswith(self.call)
            and process.startswith(self.process)
            and self.contains in process
            and self.after <= elapsed < self.before
        )


@dataclass
class FaultPlan:
    sim: Sim
    rate: float = 0.0  # probability of a random fault per port call while faults are on
    until: float = 0.0  # faults are on until this simulated time
    rules: list[Rule] = field(default_factory=list)
    crashable: Callable[[str], bool] = lambda process: process.startswith(("handler:", "duplicate:", "api:", "cron:"))
    injected: list[Injected] = field(default_factory=list)

    def on(self) -> bool:
        return self.sim.now < self.until

    def decide(self, call: str) -> str | None:
        process = self.sim.current().name if self.sim.in_process() else "main"
        elapsed = self.sim.now - self.sim.start
        for rule in self.rules:
            if rule.matches(call, process, elapsed):
                if rule.skip:
                    rule.skip -= 1
                    continue
                rule.times -= 1
                return self._record(call, process, rule.kind)
        if not self.on() or self.sim.rng.random() >= self.rate:
            return None
        kinds = KINDS if self.crashable(process) else KINDS[:2]
        return self._record(call, process, self.sim.rng.choice(kinds))

    def _record(self, call: str, process: str, kind: str) -> str:
        self.injected.append(Injected(self.sim.now - self.sim.start, process, call, kind))
        return kind

    def around(self, call: str, operation: Callable[[], Any], *, latency: float = 0.005) -> Any:
        """Run one port call as a yield point, with the fault the plan decides."""
        if self.sim.in_process():
            self.sim.sleep(self.sim.rng.uniform(0.0, latency))
        kind = self.decide(call)
        if kind and kind.startswith("delay:"):
            self.sim.sleep(float(kind.split(":", 1)[1]))  # a stalled call (GC pause, slow network)
        if kind == "crash_before":
            self.crash()
        if kind == "error_before":
            raise ServiceUnavailable(f"injected: {call} failed before its effect")
        result = operation()
        if kind == "error_after":
            raise ServiceUnavailable(f"injected: {call} took effect but its answer was lost")
        if kind == "crash_after":
            self.crash()
        return result

    def crash(self) -> None:
        """The instance dies: the outermost process of the current one, with everything it started."""
        proc = self.sim.current()
        while proc.parent is not None:
            proc = proc.parent
        self.sim.kill(proc)
        self.sim.crash_here()

    def schedule(self) -> str:
        return "\n".join(str(f) for f in self.injected) or "(no faults injected)"


class Faulty:
    """Wraps any port: every public method becomes a fault-injected yield point named `<port>.<method>`."""

    def __init__(self, inner: Any, plan: FaultPlan, port: str, *, latency: float = 0.005) -> None:
        self._inner = inner
        self._plan = plan
        self._port = port
        self._latency = latency

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._plan.around(f"{self._port}.{name}", lambda: attribute(*args, **kwargs), latency=self._latency)

        return call


class FaultyQueue:
    """Cloud Tasks as the CloudTasksQueue adapter sees it: creates run in parallel, so a failed enqueue of
    several tasks may have created some of them (before or after the error)."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner = inner
        self._plan = plan

    def enqueue(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            return
        sim = self._plan.sim
        sim.sleep(sim.rng.uniform(0.0, 0.02))
        kind = self._plan.decide("queue.enqueue")
        if kind in ("error_before", "crash_before"):
            done = sim.rng.randrange(len(tasks))  # the ones that went through before the failure
            self._inner.enqueue(tasks[:done])
            if kind == "crash_before":
                self._plan.crash()
            raise ServiceUnavailable("injected: Cloud Tasks refused some creates")
        self._inner.enqueue(tasks)
        if kind == "error_after":
            raise ServiceUnavailable("injected: the creates landed but the answer was lost")
        if kind == "crash_after":
            self._plan.crash()

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        return self._plan.around("queue.exists", lambda: self._inner.exists(queue, task_id))
