"""The Cloud Tasks adapter's own rules, with a scripted client (the emulator cannot fail on demand)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from google.api_core import exceptions as gexc

from dicomflow.adapters.cloud_tasks import CREATE_ATTEMPTS, CloudTasksQueue
from dicomflow.domain.failures import ServiceUnavailable
from dicomflow.ports import QueueName, Task

pytestmark = pytest.mark.unit


class ScriptedClient:
    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = list(failures or [])
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def queue_path(self, project: str, location: str, queue: str) -> str:
        return f"projects/{project}/locations/{location}/queues/{queue}"

    def create_task(self, parent: str, task: dict[str, Any], timeout: float) -> None:
        with self.lock:
            self.calls.append({"parent": parent, **task})
            if self.failures:
                raise self.failures.pop(0)


def adapter(client: ScriptedClient) -> CloudTasksQueue:
    return CloudTasksQueue(
        client, project="p", location="l", queues={q: q.value for q in QueueName},
        targets={q: f"https://{q.value}.example/" for q in QueueName},
        service_account="tasks@p.iam.gserviceaccount.com",
        dispatch_deadline_seconds={QueueName.CONVERT: 1800}, sleep=lambda _s: None,
    )  # fmt: skip


def test_task_request_carries_json_oidc_deadline_and_its_name() -> None:
    client = ScriptedClient()
    adapter(client).enqueue([Task(QueueName.CONVERT, "convert-b-i-g0", {"batch_id": "b", "item_id": "i"})])
    (call,) = client.calls
    assert call["name"] == "projects/p/locations/l/queues/convert/tasks/convert-b-i-g0"
    http = call["http_request"]
    assert http["headers"] == {"Content-Type": "application/json"}  # Cloud Tasks does not set it itself
    assert json.loads(http["body"]) == {"batch_id": "b", "item_id": "i"}
    assert http["oidc_token"] == {"service_account_email": "tasks@p.iam.gserviceaccount.com",
                                  "audience": "https://convert.example/"}  # fmt: skip
    assert call["dispatch_deadline"].seconds == 1800


def test_already_exists_is_success_and_transient_errors_are_retried() -> None:
    client = ScriptedClient([gexc.ServiceUnavailable("x"), gexc.DeadlineExceeded("y"), gexc.AlreadyExists("z")])
    queue = adapter(client)
    queue.enqueue([Task(QueueName.EXPAND, "expand-b-list", {"batch_id": "b", "step": "list"})])
    assert len(client.calls) == 3  # two retries, then "already exists": done, no error


def test_a_queue_that_stays_unavailable_fails_the_enqueue_transiently() -> None:
    client = ScriptedClient([gexc.ServiceUnavailable("down")] * CREATE_ATTEMPTS)
    with pytest.raises(ServiceUnavailable):
        adapter(client).enqueue([Task(QueueName.EXPAND, "expand-b-list", {"batch_id": "b"})])


def test_permission_errors_are_not_retried_here_but_explained() -> None:
    client = ScriptedClient([gexc.PermissionDenied("no enqueuer role")])
    with pytest.raises(ServiceUnavailable, match=r"roles/cloudtasks\.enqueuer"):
        adapter(client).enqueue([Task(QueueName.EXPAND, "expand-b-list", {"batch_id": "b"})])
    assert len(client.calls) == 1


def test_many_tasks_are_created_in_parallel_and_each_once() -> None:
    client = ScriptedClient()
    tasks = [Task(QueueName.CONVERT, f"convert-b-{n:04d}-g0", {"n": n}) for n in range(200)]
    queue = adapter(client)
    queue.enqueue(tasks)
    assert sorted(c["name"].rsplit("/", 1)[1] for c in client.calls) == sorted(t.task_id for t in tasks)
    assert queue.created == 200
