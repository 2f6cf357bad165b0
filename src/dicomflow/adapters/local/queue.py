"""The local queue: Cloud Tasks' semantics on one machine.

Tasks live in the SQLite state file (table `tasks`) until a handler acknowledges them, so a `kill -9`
loses nothing: the next run finds them again. A pool of worker *processes* runs them (dcm2niix and header
parsing use whole cores). Like Cloud Tasks: a 2xx answer deletes the task; anything else — including a
worker process dying mid-task — schedules the next attempt after the queue's backoff, and after the last
attempt the task is dropped (the convert handler has already handed the series to the dead-letter queue
by then; see services/convert_series.py). Creating a task whose id exists, or ran or was dropped within
the last hour (Cloud Tasks' de-duplication window), is a no-op. Worker processes die with the process that
started them, even when it is killed by SIGKILL (dicomflow/lifeline.py).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue as queue_module
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomflow.adapters.local.sqlite import SqliteDatabase
from dicomflow.domain.retry import RetryPolicy
from dicomflow.lifeline import die_with_parent
from dicomflow.ports import Attempt, QueueName, Task

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL,
    leased INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    last_status INTEGER
);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (leased, not_before);
CREATE TABLE IF NOT EXISTS task_tombstones (
    task_id TEXT PRIMARY KEY,
    released_at REAL NOT NULL
);
"""

# Cloud Tasks keeps a task's name blocked for about an hour after the task ran or was deleted (GCP_FACTS
# §4, "De-dup"); the local queue does the same, so code that would re-create a finished task by name
# behaves here as it would in the cloud.
DEDUP_WINDOW_SECONDS = 3600.0


class SqliteTaskQueue:
    """The TaskQueue port, backed by a table in the local state file."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._db = SqliteDatabase(path, SCHEMA)

    def close(self) -> None:
        self._db.close()

    def enqueue(self, tasks: Sequence[Task]) -> None:
        now = self._clock()
        with self._db.tx() as db:
            db.execute("DELETE FROM task_tombstones WHERE released_at < ?", (now - DEDUP_WINDOW_SECONDS,))
            blocked = {
                row[0]
                for task in tasks
                for row in db.execute("SELECT task_id FROM task_tombstones WHERE task_id = ?", (task.task_id,))
            }
            db.executemany(
                "INSERT OR IGNORE INTO tasks (task_id, queue, payload, not_before, created_at) VALUES (?, ?, ?, ?, ?)",
                [
                    (t.task_id, t.queue.value, json.dumps(dict(t.payload)), now + t.delay_seconds, now)
                    for t in tasks
                    if t.task_id not in blocked
                ],
            )

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        row = self._db.conn().execute("SELECT 1 FROM tasks WHERE task_id = ? AND queue = ?", (task_id, queue.value))
        return row.fetchone() is not None

    # --- used by the runner ----------------------------------------------------------------------------

    def release_all_leases(self) -> int:
        """At start-up: tasks leased by a previous run (which is gone) become deliverable again."""
        with self._db.tx() as db:
            return db.execute("UPDATE tasks SET leased = 0 WHERE leased = 1").rowcount

    def lease_due(self, limit: int) -> list[LeasedTask]:
        now = self._clock()
        with self._db.tx() as db:
            rows = db.execute(
                "SELECT task_id, queue, payload, retry_count FROM tasks WHERE leased = 0 AND not_before <= ? "
                "ORDER BY not_before, created_at LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany("UPDATE tasks SET leased = 1 WHERE task_id = ?", [(r[0],) for r in rows])
        return [LeasedTask(r[0], QueueName(r[1]), json.loads(r[2]), int(r[3])) for r in rows]

    def release(self, task_ids: Sequence[str]) -> None:
        """Leased tasks the runner did not deliver after all: deliverable again, no attempt counted."""
        with self._db.tx() as db:
            db.executemany("UPDATE tasks SET leased = 0 WHERE task_id = ?", [(t,) for t in task_ids])

    def ack(self, task_id: str) -> None:
        """The task is done (2xx) or dropped after its last attempt: gone, its name blocked for a while."""
        with self._db.tx() as db:
            db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
            db.execute("INSERT OR REPLACE INTO task_tombstones VALUES (?, ?)", (task_id, self._clock()))

    def settle(self, task: LeasedTask, status: int, policy: RetryPolicy) -> str:
        """Cloud Tasks' answer to one attempt: 2xx ends the task; anything else schedules the next attempt
        after the policy's backoff, or drops the task silently after its last attempt. Returns what
        happened: "acked", "retried" or "dropped"."""
        if 200 <= status < 300:
            self.ack(task.task_id)
            return "acked"
        if policy.is_last_attempt(task.retry_count):
            log.warning(
                "task %s dropped after %d attempts (last status %d)", task.task_id, task.retry_count + 1, status
            )
            self.ack(task.task_id)
            return "dropped"
        self.retry(task.task_id, policy.backoff(task.retry_count), status)
        return "retried"

    def retry(self, task_id: str, delay: float, status: int) -> None:
        with self._db.tx() as db:
            db.execute(
                "UPDATE tasks SET leased = 0, retry_count = retry_count + 1, not_before = ?, last_status = ? "
                "WHERE task_id = ?",
                (self._clock() + delay, status, task_id),
            )

    def next_due(self) -> float | None:
        row = self._db.conn().execute("SELECT MIN(not_before) FROM tasks WHERE leased = 0").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def pending(self) -> int:
        return int(self._db.conn().execute("SELECT COUNT(*) FROM tasks").fetchone()[0])


@dataclass(frozen=True, slots=True)
class LeasedTask:
    task_id: str
    queue: QueueName
    payload: dict[str, Any]
    retry_count: int


# --- worker processes ----------------------------------------------------------------------------------

Delivery = tuple[QueueName, dict[str, Any], Attempt]
TaskRunner = Callable[[Sequence[Delivery]], list[int]]
"""Runs one task, or a group of small convert tasks at once, in a worker process and returns the HTTP-like
status of each (2xx = done), in order."""
Grouper = Callable[[Sequence["LeasedTask"], int], list[list["LeasedTask"]]]
"""grouper(leased tasks, worker processes) -> every leased task, in the groups to deliver together, in
queue order (most groups have one task; local_runtime.py says which convert tasks are grouped)."""

_worker_runner: TaskRunner | None = None


def _init_worker(factory: Callable[[Any], TaskRunner], factory_arg: Any, parent_pid: int) -> None:
    global _worker_runner  # noqa: PLW0603 - one runner per worker process, built once at process start
    # A worker never outlives the run that started it, even one killed by SIGKILL (issue 12): nobody would
    # collect its results, and the next run must be alone with the state.
    die_with_parent(parent_pid)
    _worker_runner = factory(factory_arg)


def _warm_up() -> int:
    return 0


def _run_in_worker(deliveries: Sequence[Delivery]) -> list[int]:
    if _worker_runner is None:  # pragma: no cover - the initializer always runs first
        raise RuntimeError("worker process not initialised")
    return _worker_runner(deliveries)


@dataclass
class RunStats:
    delivered: int = 0
    acked: int = 0
    retried: int = 0
    dropped: int = 0
    worker_crashes: int = 0


class LocalRunner:
    """Delivers due tasks to a pool of worker processes until the queue is empty."""

    def __init__(
        self,
        tasks: SqliteTaskQueue,
        *,
        workers: int,
        policies: Mapping[QueueName, RetryPolicy],
        runner_factory: Callable[[Any], TaskRunner],
        factory_arg: Any,
        on_idle_tick: Callable[[], None] | None = None,
        on_crash: Callable[[], object] | None = None,
        poll_seconds: float = 0.2,
        grouper: Grouper | None = None,
        lease_factor: int = 1,
    ) -> None:
        self._tasks = tasks
        self._workers = max(1, workers)
        self._policies = policies
        self._factory = runner_factory
        self._factory_arg = factory_arg
        self.on_idle_tick = on_idle_tick
        self._on_crash = on_crash
        self._poll = poll_seconds
        self._grouper = grouper
        self._lease_factor = max(1, lease_factor)  # tasks leased per free worker, for the grouper to group
        self._stop = threading.Event()
        self._started: ProcessPoolExecutor | None = None
        self.stats = RunStats()

    def start(self) -> None:
        """Boot the worker processes now (they take a few hundred milliseconds), before `run`."""
        if self._started is None:
            self._started = self._pool()

    def close(self) -> None:
        """Stop worker processes started by `start` when `run` is never called (e.g. an error)."""
        if self._started is not None:
            self._started.shutdown(wait=True, cancel_futures=True)
            self._started = None

    def stop(self) -> None:
        self._stop.set()

    def _pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the parent may run threads (progress display), and forking those is unsafe.
        pool = ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self._factory, self._factory_arg, os.getpid()),
        )
        # The executor starts processes one at a time, as tasks arrive; start them all now so the
        # first fan-out (expansion chunks) does not wait for interpreters to boot.
        for _ in range(self._workers):
            pool.submit(_warm_up)
        return pool

    def run(self) -> RunStats:
        self._tasks.release_all_leases()
        pool, self._started = self._started or self._pool(), None
        inflight: dict[Future[list[int]], list[LeasedTask]] = {}
        try:
            while not self._stop.is_set():
                self._fill(pool, inflight)
                if not inflight:
                    due = self._tasks.next_due()
                    if due is None:
                        break  # nothing queued, nothing running: done
                    time.sleep(min(max(due - time.time(), 0.01), self._poll))
                else:
                    done, _ = wait(inflight, timeout=self._poll, return_when=FIRST_COMPLETED)
                    if self._collect(done, inflight):
                        pool = self._replace_broken_pool(pool, inflight)
                if self.on_idle_tick:
                    self.on_idle_tick()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return self.stats

    def _fill(self, pool: ProcessPoolExecutor, inflight: dict[Future[list[int]], list[LeasedTask]]) -> None:
        free = self._workers - len(inflight)
        if free <= 0:
            return
        leased = self._tasks.lease_due(free * (self._lease_factor if self._grouper else 1))
        groups = self._grouper(leased, self._workers) if self._grouper and len(leased) > 1 else [[t] for t in leased]
        # One group per free worker process; the rest goes back to the queue, no attempt counted.
        self._tasks.release([t.task_id for group in groups[free:] for t in group])
        for group in groups[:free]:
            deliveries = [
                (t.queue, t.payload, Attempt(retry_count=t.retry_count, task_id=t.task_id, queue=t.queue.value))
                for t in group
            ]
            inflight[pool.submit(_run_in_worker, deliveries)] = group
            self.stats.delivered += len(group)

    def _collect(self, done: set[Future[list[int]]], inflight: dict[Future[list[int]], list[LeasedTask]]) -> bool:
        """Settle finished tasks; True if the pool broke (a worker process died)."""
        broken = False
        for future in done:
            group = inflight.pop(future)
            try:
                statuses = future.result()
            except BrokenProcessPool:
                broken = True
                statuses = [599] * len(group)  # like a connection dropped by a crashed server: retried
                self.stats.worker_crashes += len(group)
            except Exception:
                log.exception("task %s raised instead of answering", group[0].task_id)
                statuses = [500] * len(group)
            for task, status in zip(group, statuses, strict=True):
                self._settle(task, status)
        return broken

    def _replace_broken_pool(
        self, pool: ProcessPoolExecutor, inflight: dict[Future[list[int]], list[LeasedTask]]
    ) -> ProcessPoolExecutor:
        # Every task of a broken pool is lost with it: count each as a failed attempt.
        for future, group in list(inflight.items()):
            inflight.pop(future)
            for task in group:
                self.stats.worker_crashes += 1
                self._settle(task, 599)
        pool.shutdown(wait=True, cancel_futures=True)
        if self._on_crash:
            # No worker of the broken pool is alive: release the series they held.
            self._on_crash()
        return self._pool()

    def _settle(self, task: LeasedTask, status: int) -> None:
        outcome = self._tasks.settle(task, status, self._policies[task.queue])
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)


def drain(progress_queue: Any, handle: Callable[[Any], None]) -> None:
    """Deliver every progress message currently queued by worker processes."""
    while True:
        try:
            message = progress_queue.get_nowait()
        except (queue_module.Empty, EOFError, OSError):
            return
        handle(message)
