"""The TaskQueue contract.

Two parts:
- the wire: every adapter delivers what was enqueued, to its queue, with its payload (the local SQLite
  queue, the Cloud Tasks model, and the real Cloud Tasks adapter through gcloud-tasks-emulator's gRPC
  protocol, which carries the headers handlers rely on);
- the semantics dicomflow depends on (GCP_FACTS §4): named tasks created once while the name is blocked
  (while the task exists, and for a window after it ran or was dropped); retries with the policy's
  backoff; the task dropped silently after max_attempts; `exists` telling a live task from a finished
  one; and for the model, the dispatch deadline re-dispatching a still-running attempt, concurrency and
  rate limits, and duplicate deliveries. gcloud-tasks-emulator has none of these (GCP_FACTS gotcha 15),
  so they are checked on the queues that claim them: the local queue and the model the simulation uses.
  A last test runs the same checks against a naive queue and requires each of them to fail.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dicomflow import devstack
from dicomflow.adapters.local.queue import SqliteTaskQueue
from dicomflow.domain.retry import RetryPolicy
from dicomflow.ports import Attempt, QueueName, Task
from tests.sim.cloud_tasks import CloudTasksModel, QueueConfig
from tests.sim.kernel import Sim
from tests.support.stores import Clock

pytestmark = pytest.mark.contract

POLICY = RetryPolicy(max_attempts=4, min_backoff_seconds=10, max_backoff_seconds=300, max_doublings=2)
WINDOW = 3600.0
Handler = Callable[[Task, int], int]  # (task, retry_count) -> HTTP status


@dataclass
class Delivery:
    task_id: str
    queue: str
    payload: dict[str, Any]
    retry_count: int
    time: float
    headers: dict[str, str] = field(default_factory=dict)


class Harness:
    """Enqueue through an adapter; run its deliveries to the end with a handler; observe them."""

    def enqueue(self, tasks: list[Task]) -> None:
        raise NotImplementedError

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        raise NotImplementedError

    def run(self, handler: Handler = lambda _t, _n: 200) -> list[Delivery]:
        raise NotImplementedError

    def advance(self, seconds: float) -> None:
        raise NotImplementedError


class SqliteHarness(Harness):
    """The local queue driven the way LocalRunner drives it (lease, answer, settle), on a settable clock."""

    def __init__(self, path: Path) -> None:
        self.clock = Clock(1_000_000.0)
        self.queue = SqliteTaskQueue(path, self.clock)

    def enqueue(self, tasks: list[Task]) -> None:
        self.queue.enqueue(tasks)

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        return self.queue.exists(queue, task_id)

    def run(self, handler: Handler = lambda _t, _n: 200) -> list[Delivery]:
        seen: list[Delivery] = []
        while True:
            leased = self.queue.lease_due(100)
            if not leased:
                due = self.queue.next_due()
                if due is None:
                    return seen
                self.clock.now = max(self.clock.now, due)
                continue
            for task in leased:
                seen.append(Delivery(task.task_id, task.queue.value, task.payload, task.retry_count, self.clock.now))
                status = handler(Task(task.queue, task.task_id, task.payload), task.retry_count)
                self.queue.settle(task, status, POLICY)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class ModelHarness(Harness):
    """The Cloud Tasks model in a simulation: handlers may take simulated time."""

    def __init__(
        self,
        *,
        deadline: float = 60.0,
        concurrency: int = 1000,
        rate: float = 500.0,
        duplicates: float = 0.0,
        handler_seconds: float = 0.0,
    ) -> None:
        self.sim = Sim(7)
        self.handler: Handler = lambda _t, _n: 200
        self.handler_seconds = handler_seconds
        self.seen: list[Delivery] = []
        self.running = 0
        self.most_running = 0
        config = QueueConfig(POLICY, deadline, concurrency, rate)
        self.model = CloudTasksModel(
            self.sim,
            dict.fromkeys(QueueName, config),
            self._target,
            duplicate_rate=duplicates,
            deadlines=dict.fromkeys(QueueName, deadline),
        )

    def _target(self, queue: QueueName, payload: dict[str, Any], attempt: Attempt) -> int:
        self.seen.append(Delivery(attempt.task_id, queue.value, payload, attempt.retry_count, self.sim.now))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            self.sim.sleep(self.handler_seconds)
            return self.handler(Task(queue, attempt.task_id, payload), attempt.retry_count)
        finally:
            self.running -= 1

    def enqueue(self, tasks: list[Task]) -> None:
        self.model.enqueue(tasks)

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        return self.model.exists(queue, task_id)

    def run(self, handler: Handler = lambda _t, _n: 200) -> list[Delivery]:
        self.handler = handler
        start = len(self.seen)
        self.sim.run()
        return self.seen[start:]

    def advance(self, seconds: float) -> None:
        self.sim.run(until=self.sim.now + seconds)


@pytest.fixture
def sqlite_harness(tmp_path: Path) -> Iterator[Harness]:
    harness = SqliteHarness(tmp_path / "q.sqlite")
    yield harness
    harness.queue.close()


@pytest.fixture
def model_harness() -> Harness:
    return ModelHarness()


# --- the real adapter over the emulator's wire protocol ------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    got: list[Delivery]
    lock: threading.Lock

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.lock:
            name, retries = (
                headers.get("x-cloudtasks-taskname", ""),
                int(headers.get("x-cloudtasks-taskretrycount", "0")),
            )
            self.got.append(Delivery(name, self.path.strip("/"), json.loads(body), retries, time.time(), headers))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return None


class EmulatorHarness(Harness):
    def __init__(self, enqueue: Callable[[list[Task]], None], got: list[Delivery], lock: threading.Lock) -> None:
        self._enqueue, self._got, self._lock = enqueue, got, lock

    def enqueue(self, tasks: list[Task]) -> None:
        self._enqueue(tasks)

    def run(self, handler: Handler = lambda _t, _n: 200) -> list[Delivery]:
        deadline = time.monotonic() + 20.0
        last = -1
        while time.monotonic() < deadline:
            with self._lock:
                count = len(self._got)
            if count == last and count:
                break
            last = count
            time.sleep(0.5)
        with self._lock:
            return list(self._got)


@pytest.fixture
def cloud_tasks_harness(tmp_path: Path) -> Iterator[Harness]:
    from dicomflow.adapters.cloud_tasks import CloudTasksQueue
    from dicomflow.config import load_settings
    from tests.support.emulators import tasks_emulator_python

    python = tasks_emulator_python()
    queues = {q: f"q-{q.value}" for q in QueueName}
    emulator, host = devstack.start_tasks_emulator(
        python, tmp_path / "logs", devstack.PROJECT, list(queues.values()), max_retries=0
    )
    got: list[Delivery] = []
    handler = type("Handler", (_Receiver,), {"got": got, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    settings = load_settings(
        environ={}, mode="cloud", project=devstack.PROJECT, region=devstack.REGION, tasks_emulator_host=host,
        queue_convert=queues[QueueName.CONVERT], queue_expand=queues[QueueName.EXPAND],
        queue_dead_letter=queues[QueueName.DEAD_LETTER], queue_changes=queues[QueueName.CHANGES],
        worker_url=f"{base}/convert", expand_url=f"{base}/expand", dead_letter_url=f"{base}/dead-letter",
        changes_url=f"{base}/changes", tasks_service_account="tasks@example.iam.gserviceaccount.com",
    )  # fmt: skip
    adapter = CloudTasksQueue.from_settings(settings)
    try:
        yield EmulatorHarness(adapter.enqueue, got, handler.lock)
    finally:
        server.shutdown()
        server.server_close()
        emulator.stop()


@pytest.fixture(params=["sqlite", "model", pytest.param("cloud_tasks", marks=pytest.mark.emulator)])
def wire(request: pytest.FixtureRequest) -> Harness:
    return request.getfixturevalue(f"{request.param}_harness")  # type: ignore[no-any-return]


@pytest.fixture(params=["sqlite", "model"])
def queue(request: pytest.FixtureRequest) -> Harness:
    return request.getfixturevalue(f"{request.param}_harness")  # type: ignore[no-any-return]


def _task(name: str, queue: QueueName = QueueName.EXPAND) -> Task:
    return Task(queue, name, {"batch_id": "b1", "step": "list", "name": name})


# --- the wire -----------------------------------------------------------------------------------------------


def test_every_task_is_delivered_to_its_queue_with_its_payload(wire: Harness) -> None:
    tasks = [
        Task(
            QueueName.CONVERT, f"convert-b1-{n:032x}-g0-t0", {"batch_id": "b1", "item_id": f"{n:032x}", "generation": 0}
        )
        for n in range(12)
    ] + [
        Task(QueueName.EXPAND, "expand-b1-e0-list", {"batch_id": "b1", "step": "list", "epoch": 0}),
        Task(QueueName.DEAD_LETTER, "dlq-b1-x-g0-a1", {"batch_id": "b1", "item_id": "x", "failure": {"code": "c"}}),
    ]
    wire.enqueue(tasks)
    got = wire.run()
    assert sorted(json.dumps(d.payload, sort_keys=True) for d in got) == sorted(
        json.dumps(dict(t.payload), sort_keys=True) for t in tasks
    )
    assert {d.task_id for d in got} == {t.task_id for t in tasks}
    for d in got:
        assert d.retry_count == 0
        if d.headers:  # over HTTP: what the handlers rely on
            assert d.headers["content-type"] == "application/json"
            assert d.queue in ("convert", "expand", "dead-letter")


# --- the semantics ------------------------------------------------------------------------------------------


def check_a_name_is_used_once_while_blocked(queue: Harness) -> None:
    first = _task("expand-b1-e0-group")
    queue.enqueue([first, first])
    assert queue.exists(QueueName.EXPAND, first.task_id) is True
    queue.enqueue([first])
    assert [d.task_id for d in queue.run()] == [first.task_id]  # created once, delivered once
    assert queue.exists(QueueName.EXPAND, first.task_id) is False  # it ran: gone
    queue.advance(WINDOW / 2)
    queue.enqueue([first])  # within the window after it ran: still blocked
    assert queue.run() == []
    queue.advance(WINDOW)
    queue.enqueue([first])  # the window passed: the name is free again
    assert [d.task_id for d in queue.run()] == [first.task_id]


def check_failures_are_retried_with_backoff_then_dropped_silently(queue: Harness) -> None:
    task = _task("convert-b1-aa-g0-t0", QueueName.CONVERT)
    queue.enqueue([task])
    got = queue.run(lambda _t, _n: 503)
    assert [d.retry_count for d in got] == [0, 1, 2, 3]  # max_attempts counts the first attempt
    gaps = [round(b.time - a.time) for a, b in itertools.pairwise(got)]
    assert gaps == [POLICY.backoff(n) for n in range(3)] == [10, 20, 40]
    assert queue.exists(QueueName.CONVERT, task.task_id) is False  # dropped, and nothing says so
    queue.enqueue([task])  # ...and its name stays blocked for the window
    assert queue.run() == []


def check_a_success_after_failures_ends_the_task(queue: Harness) -> None:
    task = _task("expand-b1-e0-scan-0")
    queue.enqueue([task])
    got = queue.run(lambda _t, n: 200 if n == 2 else 500)
    assert [d.retry_count for d in got] == [0, 1, 2]
    assert queue.exists(QueueName.EXPAND, task.task_id) is False


SEMANTICS = [
    check_a_name_is_used_once_while_blocked,
    check_failures_are_retried_with_backoff_then_dropped_silently,
    check_a_success_after_failures_ends_the_task,
]


@pytest.mark.parametrize("check", SEMANTICS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_semantics(queue: Harness, check: Callable[[Harness], None]) -> None:
    check(queue)


def test_a_slow_attempt_is_redispatched_at_its_deadline_while_still_running() -> None:
    # GCP_FACTS gotcha 11: at the dispatch deadline the attempt counts as failed and the task is retried,
    # whatever the handler is still doing; its late answer changes nothing.
    harness = ModelHarness(deadline=60.0, handler_seconds=100.0)
    task = _task("convert-b1-bb-g0-t0", QueueName.CONVERT)
    harness.enqueue([task])
    got = harness.run(lambda _t, _n: 200)
    assert [d.retry_count for d in got] == [0, 1, 2, 3]  # every attempt outlived its deadline
    assert got[1].time == pytest.approx(got[0].time + 60 + POLICY.backoff(0))
    assert harness.most_running >= 2  # the first attempt was still running when the second started
    assert [r.status for r in harness.model.log] == [504] * 4
    assert harness.model.dropped == [task]


def test_concurrency_and_rate_limits_hold() -> None:
    harness = ModelHarness(concurrency=2, rate=0.5, handler_seconds=10.0)
    harness.enqueue([_task(f"expand-b{n}-e0-list") for n in range(6)])
    got = harness.run()
    assert len(got) == 6
    assert harness.most_running == 2
    starts = sorted(d.time for d in got)
    assert all(b - a >= 2.0 - 1e-9 for a, b in itertools.pairwise(starts))  # 0.5 dispatches/s


def test_deliveries_are_at_least_once_duplicates_included() -> None:
    harness = ModelHarness(duplicates=1.0, handler_seconds=1.0)
    harness.enqueue([_task("expand-b1-e0-list")])
    got = harness.run()
    assert [d.task_id for d in got] == ["expand-b1-e0-list"] * 2  # the same attempt, twice
    assert harness.most_running == 2  # ...concurrently
    assert harness.model.pending() == 0


class NaiveQueue(Harness):
    """What gcloud-tasks-emulator does (GCP_FACTS gotcha 15): no name blocking, retries at once, never
    gives up. The semantic checks must all fail on it, or they prove nothing."""

    def __init__(self) -> None:
        self.now = 0.0
        self.tasks: list[tuple[Task, int]] = []

    def enqueue(self, tasks: list[Task]) -> None:
        self.tasks += [(t, 0) for t in tasks]

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        return any(t.task_id == task_id for t, _ in self.tasks)

    def run(self, handler: Handler = lambda _t, _n: 200) -> list[Delivery]:
        seen: list[Delivery] = []
        while self.tasks and len(seen) < 50:
            task, retries = self.tasks.pop(0)
            seen.append(Delivery(task.task_id, task.queue.value, dict(task.payload), retries, self.now))
            if not 200 <= handler(task, retries) < 300:
                self.tasks.append((task, retries + 1))
        return seen

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("check", SEMANTICS[:2], ids=lambda c: c.__name__.removeprefix("check_"))
def test_the_semantic_checks_fail_on_a_queue_without_the_semantics(check: Callable[[Harness], None]) -> None:
    with pytest.raises(AssertionError):
        check(NaiveQueue())
