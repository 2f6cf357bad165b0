"""The TaskQueue contract: the local SQLite queue and Cloud Tasks (through gcloud-tasks-emulator's gRPC
wire protocol) deliver what was enqueued, with its payload, and treat an existing task id as success."""

from __future__ import annotations

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
from dicomflow.ports import QueueName, Task

pytestmark = pytest.mark.contract


@dataclass
class Received:
    queue: str
    payload: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class Harness:
    """Enqueue through the adapter, observe what a handler receives."""

    def __init__(self, enqueue: Callable[[list[Task]], None], received: Callable[[float], list[Received]]) -> None:
        self.enqueue = enqueue
        self.received = received


@pytest.fixture
def sqlite_harness(tmp_path: Path) -> Iterator[Harness]:
    queue = SqliteTaskQueue(tmp_path / "q.sqlite")

    def received(_timeout: float) -> list[Received]:
        out = []
        while leased := queue.lease_due(100):
            for task in leased:
                out.append(Received(task.queue.value, task.payload))
                queue.ack(task.task_id)
        return out

    yield Harness(queue.enqueue, received)
    queue.close()


class _Receiver(BaseHTTPRequestHandler):
    got: list[Received]
    lock: threading.Lock

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.lock:
            self.got.append(
                Received(self.path.strip("/"), json.loads(body), {k.lower(): v for k, v in self.headers.items()})
            )
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return None


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
    got: list[Received] = []
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

    def received(timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            with handler.lock:
                count = len(got)
            if count == last and count:
                break
            last = count
            time.sleep(0.5)
        with handler.lock:
            return list(got)

    try:
        yield Harness(adapter.enqueue, received)
    finally:
        server.shutdown()
        server.server_close()
        emulator.stop()


@pytest.fixture(params=["sqlite", pytest.param("cloud_tasks", marks=pytest.mark.emulator)])
def harness(request: pytest.FixtureRequest) -> Harness:
    return request.getfixturevalue(f"{request.param}_harness")  # type: ignore[no-any-return]


def test_every_task_is_delivered_to_its_queue_with_its_payload(harness: Harness) -> None:
    tasks = [
        Task(QueueName.CONVERT, f"convert-b1-{n:032x}-g0", {"batch_id": "b1", "item_id": f"{n:032x}", "generation": 0})
        for n in range(12)
    ] + [
        Task(QueueName.EXPAND, "expand-b1-list", {"batch_id": "b1", "step": "list"}),
        Task(QueueName.DEAD_LETTER, "dlq-b1-x-g0", {"batch_id": "b1", "item_id": "x", "failure": {"code": "c"}}),
    ]
    harness.enqueue(tasks)
    got = harness.received(20.0)
    assert sorted(json.dumps(r.payload, sort_keys=True) for r in got) == sorted(
        json.dumps(dict(t.payload), sort_keys=True) for t in tasks
    )
    by_queue = {r.queue for r in got}
    assert by_queue <= {"convert", "expand", "dead-letter"}
    for r in got:
        if r.headers:  # over HTTP: what the handlers rely on
            assert r.headers["content-type"] == "application/json"
            assert r.headers["x-cloudtasks-taskretrycount"] == "0"
            assert r.headers["x-cloudtasks-taskname"].startswith(("convert-", "expand-", "dlq-"))


def test_enqueueing_an_existing_id_is_not_an_error(harness: Harness) -> None:
    task = Task(QueueName.EXPAND, "expand-b2-group", {"batch_id": "b2", "step": "group"})
    harness.enqueue([task])
    harness.enqueue([task])  # Cloud Tasks answers AlreadyExists; the emulator accepts it: both fine
    got = harness.received(10.0)
    assert {json.dumps(r.payload, sort_keys=True) for r in got} == {json.dumps(dict(task.payload), sort_keys=True)}
    assert 1 <= len(got) <= 2  # at-least-once: a duplicate delivery is allowed, a lost one is not
