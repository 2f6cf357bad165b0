"""Cloud Tasks behind the TaskQueue port.

What the real service needs that a naive client forgets (GCP_FACTS §4 and gotchas 10, 12, 14, 15):
- task ids may not contain dots: ours are hashes (see domain/model.py `Item.task_id`);
- `create_task` has no retry of its own: we retry unavailable/deadline errors with jittered backoff
  and treat AlreadyExists as success (a retried create, or a duplicate enqueue, is not an error);
- Cloud Tasks does not set Content-Type: every task carries `application/json`;
- HTTP targets are authenticated with an OIDC token of the tasks service account, audience = target;
- a big batch is enqueued by a bounded pool of threads (10,000 creates at ~20 ms each would take
  minutes one by one).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import tasks_v2
from google.protobuf import duration_pb2, timestamp_pb2

from dicomflow.config import Settings
from dicomflow.domain.failures import ConfigError, ServiceUnavailable
from dicomflow.ports import QueueName, Task

_RETRYABLE = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
    gexc.Aborted,
)
MAX_PARALLEL_CREATES = 32
CREATE_ATTEMPTS = 6


class CloudTasksQueue:
    def __init__(
        self,
        client: Any,
        *,
        project: str,
        location: str,
        queues: Mapping[QueueName, str],
        targets: Mapping[QueueName, str],
        service_account: str = "",
        dispatch_deadline_seconds: Mapping[QueueName, int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._paths = {name: client.queue_path(project, location, queue_id) for name, queue_id in queues.items()}
        self._targets = dict(targets)
        self._service_account = service_account
        self._deadlines = dict(dispatch_deadline_seconds or {})
        self._sleep = sleep
        self._lock = threading.Lock()
        self.created = 0  # tasks created by this adapter (benchmarks and tests read it)

    @classmethod
    def from_settings(cls, settings: Settings) -> CloudTasksQueue:
        if not settings.project or not settings.region:
            raise ConfigError("cloud mode needs DICOMFLOW_PROJECT and DICOMFLOW_REGION for Cloud Tasks")
        if settings.tasks_emulator_host:
            import grpc  # noqa: PLC0415 - only the dev stack and tests use the emulator
            from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport  # noqa: PLC0415

            channel = grpc.insecure_channel(settings.tasks_emulator_host)
            client = tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
        else:
            client = tasks_v2.CloudTasksClient()
        targets = {
            QueueName.CONVERT: settings.worker_url,
            QueueName.EXPAND: settings.expand_url,
            QueueName.DEAD_LETTER: settings.dead_letter_url,
            QueueName.CHANGES: settings.changes_url,
        }
        return cls(
            client,
            project=settings.project,
            location=settings.region,
            queues={
                QueueName.CONVERT: settings.queue_convert,
                QueueName.EXPAND: settings.queue_expand,
                QueueName.DEAD_LETTER: settings.queue_dead_letter,
                QueueName.CHANGES: settings.queue_changes,
            },
            targets=targets,
            service_account=settings.tasks_service_account,
            # Every task carries its handler's timeout as deadline; unset, Cloud Tasks gives 10 minutes and
            # re-dispatches a handler still running (GCP_FACTS gotcha 23).
            dispatch_deadline_seconds={
                QueueName.CONVERT: settings.dispatch_deadline_seconds,
                QueueName.EXPAND: settings.expand_dispatch_deadline_seconds,
                QueueName.DEAD_LETTER: settings.dead_letter_dispatch_deadline_seconds,
                QueueName.CHANGES: settings.changes_dispatch_deadline_seconds,
            },
        )

    def enqueue(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            return
        if len(tasks) == 1:
            self._create(tasks[0])
            return
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CREATES, len(tasks))) as pool:
            # list() surfaces the first failure; the others finish or fail on their own.
            list(pool.map(self._create, tasks))

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        """GetTask: a task exists until it succeeds or is dropped. The emulator does not implement GetTask
        (GCP_FACTS gotcha 15); then, or on any other error, the answer is "cannot tell"."""
        try:
            self._client.get_task(name=f"{self._paths[queue]}/tasks/{task_id}", timeout=20.0)
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError:
            return None
        return True

    def _request(self, task: Task) -> dict[str, Any]:
        target = self._targets.get(task.queue, "")
        if not target:
            raise ConfigError(f"no target URL configured for the {task.queue.value} queue")
        http: dict[str, Any] = {
            "http_method": tasks_v2.HttpMethod.POST,
            "url": target,
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps(dict(task.payload), separators=(",", ":")).encode(),
        }
        if self._service_account:
            http["oidc_token"] = {"service_account_email": self._service_account, "audience": target}
        request: dict[str, Any] = {"name": f"{self._paths[task.queue]}/tasks/{task.task_id}", "http_request": http}
        deadline = self._deadlines.get(task.queue)
        if deadline:
            request["dispatch_deadline"] = duration_pb2.Duration(seconds=deadline)
        if task.delay_seconds > 0:
            when = timestamp_pb2.Timestamp()
            when.FromDatetime(datetime.now(tz=UTC) + timedelta(seconds=task.delay_seconds))
            request["schedule_time"] = when
        return request

    def _create(self, task: Task) -> None:
        request = self._request(task)
        for attempt in range(CREATE_ATTEMPTS):
            try:
                self._client.create_task(parent=self._paths[task.queue], task=request, timeout=20.0)
            except gexc.AlreadyExists:
                return  # created by an earlier attempt, or an intended duplicate: either way it exists
            except _RETRYABLE as exc:
                if attempt == CREATE_ATTEMPTS - 1:
                    raise ServiceUnavailable(
                        f"Cloud Tasks did not accept a task after {CREATE_ATTEMPTS} attempts ({type(exc).__name__})"
                    ) from exc
                self._sleep(random.uniform(0, min(8.0, 0.25 * 2**attempt)))  # noqa: S311 - jitter, not crypto
            except gexc.GoogleAPICallError as exc:
                # Not retried here (PermissionDenied, NotFound queue, ...): a deployment problem an operator
                # must fix. Transient for the caller, so its own task is retried once IAM is corrected.
                raise ServiceUnavailable(
                    f"Cloud Tasks refused a task for the {task.queue.value} queue ({type(exc).__name__}: "
                    f"{exc.message}); check that the queue exists and that this service account has "
                    "roles/cloudtasks.enqueuer and iam.serviceAccountUser on the tasks service account"
                ) from exc
            else:
                with self._lock:
                    self.created += 1
                return
