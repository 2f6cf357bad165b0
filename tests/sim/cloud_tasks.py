"""A model of Cloud Tasks with the semantics dicomflow depends on, behind the TaskQueue port.

gcloud-tasks-emulator speaks the wire protocol but has none of these (GCP_FACTS gotcha 15), so the cloud
path is tested against this model, inside the simulation (tests/sim/kernel.py), and the model itself is
held to the TaskQueue contract suite (tests/contracts/test_task_queue.py). What it models, with sources:

- Named tasks (GCP_FACTS §4 "De-dup"): creating a task whose name exists, or whose task ran or was deleted
  within the de-duplication window (~1 h; up to 24 h or 9 days), fails with ALREADY_EXISTS. The port
  treats that as success, so `enqueue` skips it; `created` and `rejected` count both.
- Dispatch (`types/task.py` dispatch_deadline): an attempt that has not answered within the task's
  dispatch deadline (HTTP default 10 min, allowed 15 s to 30 min) counts as failed (DEADLINE_EXCEEDED)
  and is retried, while the handler may still be running: its late answer is ignored.
- Retries (`types/queue.py` RetryConfig): any non-2xx answer or no answer is retried after min_backoff,
  doubled max_doublings times, then growing linearly, capped at max_backoff (RetryPolicy.backoff);
  max_attempts counts the first attempt; after the last one the task is dropped silently (its name stays
  blocked for the window). max_retry_duration is unlimited, as infra/ configures it.
- Rate limits (`types/queue.py` RateLimits): at most max_concurrent_dispatches attempts in flight, and
  dispatches spaced by 1 / max_dispatches_per_second.
- At-least-once delivery: with `duplicate_rate`, an attempt is delivered a second time, concurrently; the
  duplicate's answer does not decide the task's fate (Cloud Tasks settles a task on one response).
- Headers: X-CloudTasks-TaskRetryCount is the number of earlier attempts, including attempts that never
  reached the handler (a target answering 429/503 while scaling, or unreachable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicomflow.domain.retry import RetryPolicy
from dicomflow.ports import Attempt, QueueName, Task
from tests.sim.kernel import Sim, SimEvent

DEFAULT_DISPATCH_DEADLINE = 600.0  # HTTP targets: 10 minutes unless the task sets one (GCP_FACTS gotcha 23)
MIN_DISPATCH_DEADLINE, MAX_DISPATCH_DEADLINE = 15.0, 1800.0
DEDUP_WINDOW = 3600.0
NO_ANSWER = 0  # the connection dropped: the handler crashed, or the target was unreachable

Target = Callable[[QueueName, dict[str, Any], Attempt], int]
"""Delivers one attempt over "HTTP" and returns the status code (NO_ANSWER if it never answers)."""


@dataclass(frozen=True)
class QueueConfig:
    policy: RetryPolicy
    dispatch_deadline: float = DEFAULT_DISPATCH_DEADLINE
    max_concurrent: int = 1000
    max_rate: float = 500.0

    def __post_init__(self) -> None:
        if not MIN_DISPATCH_DEADLINE <= self.dispatch_deadline <= MAX_DISPATCH_DEADLINE:
            raise ValueError("Cloud Tasks allows dispatch deadlines between 15 s and 30 min")


@dataclass
class _Task:
    task: Task
    seq: int
    due: float
    attempts: int = 0  # attempts made so far (= X-CloudTasks-TaskRetryCount of the next one)
    in_flight: bool = False


@dataclass
class Record:
    """One attempt as Cloud Tasks saw it (what its task-activity logs would show)."""

    queue: QueueName
    task_id: str
    retry_count: int
    started: float
    status: int | None = None  # None: still waiting; 504 stands for DEADLINE_EXCEEDED
    duplicate: bool = False


@dataclass
class _Queue:
    name: QueueName
    config: QueueConfig
    tasks: dict[str, _Task] = field(default_factory=dict)
    in_flight: int = 0
    next_dispatch: float = 0.0


class CloudTasksModel:
    def __init__(
        self,
        sim: Sim,
        configs: dict[QueueName, QueueConfig],
        target: Target,
        *,
        dedup_window: float = DEDUP_WINDOW,
        duplicate_rate: float = 0.0,
        deadlines: dict[QueueName, float] | None = None,
    ) -> None:
        self.sim = sim
        self._queues = {name: _Queue(name, config) for name, config in configs.items()}
        self._target = target
        self._dedup_window = dedup_window
        self.duplicate_rate = duplicate_rate
        # What the enqueuing adapter sets on every task (CloudTasksQueue._request); unset: the default.
        self._deadlines = dict(deadlines or {})
        self._tombstones: dict[str, float] = {}
        self._seq = 0
        self._wake = SimEvent(sim)
        self.created = 0
        self.rejected = 0
        self.dropped: list[Task] = []
        self.log: list[Record] = []
        self._dispatcher = sim.spawn("cloud-tasks", self._dispatch_loop)

    # --- the TaskQueue port -----------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            self.create(task)

    def create(self, task: Task) -> bool:
        """CreateTask: False when the name is taken (ALREADY_EXISTS), which the port calls success."""
        queue = self._queues[task.queue]
        blocked_until = self._tombstones.get(task.task_id)
        if task.task_id in queue.tasks or (blocked_until is not None and blocked_until > self.sim.now):
            self.rejected += 1
            return False
        self._seq += 1
        queue.tasks[task.task_id] = _Task(task, self._seq, self.sim.now + task.delay_seconds)
        self.created += 1
        self._wake.set()
        return True

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        """GetTask: a task exists until it succeeds or is dropped."""
        return task_id in self._queues[queue].tasks

    # --- inspection ---------------------------------------------------------------------------------------

    def pending(self, queue: QueueName | None = None) -> int:
        return sum(len(q.tasks) for name, q in self._queues.items() if queue in (None, name))

    def in_flight(self) -> int:
        return sum(q.in_flight for q in self._queues.values())

    # --- dispatch -------------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            soonest: float | None = None
            for queue in self._queues.values():
                for entry in sorted(queue.tasks.values(), key=lambda t: (t.due, t.seq)):
                    if entry.in_flight:
                        continue
                    if entry.due > self.sim.now:
                        soonest = entry.due if soonest is None else min(soonest, entry.due)
                        break
                    if queue.in_flight >= queue.config.max_concurrent:
                        break  # woken when an attempt finishes
                    if queue.next_dispatch > self.sim.now:
                        soonest = queue.next_dispatch if soonest is None else min(soonest, queue.next_dispatch)
                        break
                    self._start(queue, entry)
            timeout = None if soonest is None else max(0.0, soonest - self.sim.now)
            self._wake.wait(timeout)

    def _start(self, queue: _Queue, entry: _Task) -> None:
        entry.in_flight = True
        queue.in_flight += 1
        queue.next_dispatch = self.sim.now + 1.0 / queue.config.max_rate
        deadline = self._deadlines.get(queue.name, DEFAULT_DISPATCH_DEADLINE)
        self.sim.spawn(f"attempt:{entry.task.task_id}#{entry.attempts}", self._attempt, queue, entry, deadline)

    def _attempt(self, queue: _Queue, entry: _Task, deadline: float) -> None:
        task = entry.task
        attempt = Attempt(retry_count=entry.attempts, task_id=task.task_id, queue=task.queue.value, deadline_at=None)
        record = Record(task.queue, task.task_id, entry.attempts, self.sim.now)
        self.log.append(record)
        answered = SimEvent(self.sim)
        box: dict[str, int] = {}

        def deliver(into: dict[str, int], done: SimEvent | None) -> None:
            status = NO_ANSWER
            try:
                status = self._target(task.queue, dict(task.payload), attempt)
            finally:  # a crashed handler answers nothing: the connection drops
                into["status"] = status
                if done is not None:
                    done.set()

        self.sim.spawn(f"handler:{task.task_id}#{entry.attempts}", deliver, box, answered)
        if self.duplicate_rate and self.sim.rng.random() < self.duplicate_rate:
            self.log.append(Record(task.queue, task.task_id, entry.attempts, self.sim.now, duplicate=True))
            self.sim.spawn(f"duplicate:{task.task_id}#{entry.attempts}", deliver, {}, None)
        answered.wait(deadline)
        status = box.get("status", 504) if answered.is_set else 504  # DEADLINE_EXCEEDED: it may still run
        record.status = status
        queue.in_flight -= 1
        entry.in_flight = False
        entry.attempts += 1
        if 200 <= status < 300:
            self._finish(queue, entry)
        elif entry.attempts >= queue.config.policy.max_attempts:
            self.dropped.append(task)  # silently: Cloud Tasks has no dead-letter queue
            self._finish(queue, entry)
        else:
            entry.due = self.sim.now + queue.config.policy.backoff(entry.attempts - 1)
        self._wake.set()

    def _finish(self, queue: _Queue, entry: _Task) -> None:
        del queue.tasks[entry.task.task_id]
        self._tombstones[entry.task.task_id] = self.sim.now + self._dedup_window
