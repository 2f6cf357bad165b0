"""Hand-written test doubles for ports, and a synchronous driver for whole batches.

`InlineQueue` is the TaskQueue fake: tasks run in this process, in order, with Cloud Tasks' rules —
a 2xx answer ends a task, anything else is retried until the queue's last attempt, then dropped. It
can also deliver every task twice, to prove that duplicates change nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomflow.domain.retry import CONTROL_POLICY, RetryPolicy
from dicomflow.domain.series import ConversionOptions
from dicomflow.ports import Attempt, ConverterRun, QueueName, Task
from dicomflow.services.context import Context
from dicomflow.services.submit import BatchRequest, submit
from dicomflow.services.tasks import TaskResponse, handle_task


@dataclass
class Delivery:
    task: Task
    retry_count: int
    status: int


@dataclass
class InlineQueue:
    duplicate_every_task: bool = False
    pending: deque[tuple[Task, int]] = field(default_factory=deque)
    seen_ids: set[str] = field(default_factory=set)
    log: list[Delivery] = field(default_factory=list)
    dropped: list[Task] = field(default_factory=list)

    def enqueue(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            if task.task_id in self.seen_ids and not self.duplicate_every_task:
                continue  # like Cloud Tasks: a name is not used twice
            self.seen_ids.add(task.task_id)
            self.pending.append((task, 0))
            if self.duplicate_every_task:
                self.pending.append((task, 0))

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        return any(t.task_id == task_id and t.queue is queue for t, _ in self.pending)

    def drain(
        self,
        ctx: Context,
        policies: dict[QueueName, RetryPolicy] | None = None,
        handler: Callable[[Context, QueueName, object, Attempt], TaskResponse] = handle_task,
        max_deliveries: int = 100_000,
    ) -> list[Delivery]:
        """Deliver until nothing is left (retries are immediate: the fake does not wait for backoff)."""
        policies = policies or {}
        delivered: list[Delivery] = []
        while self.pending and len(delivered) < max_deliveries:
            task, retry_count = self.pending.popleft()
            response = handler(
                ctx, task.queue, dict(task.payload), Attempt(retry_count, task.task_id, task.queue.value)
            )
            record = Delivery(task, retry_count, response.status)
            delivered.append(record)
            self.log.append(record)
            if response.ack:
                continue
            policy = policies.get(
                task.queue, ctx.settings.retry_policy if task.queue is QueueName.CONVERT else CONTROL_POLICY
            )
            if policy.is_last_attempt(retry_count):
                self.dropped.append(task)
            else:
                self.pending.append((task, retry_count + 1))
        return delivered


def run_batch(
    ctx: Context, source: str, destination: str, *, force: bool = False, options: ConversionOptions | None = None
) -> str:
    """Submit a local batch and run it to the end with the context's InlineQueue; returns the batch id."""
    from dicomflow.domain.locations import parse_location

    request = BatchRequest(
        sources=(parse_location(source, field="source", absolute_path=str(Path(source).resolve())),),
        destination=parse_location(destination, field="destination", absolute_path=str(Path(destination).resolve())),
        options=options or ConversionOptions(),
        force=force,
    )
    batch = submit(ctx, request).batch
    queue = ctx.queue
    if not isinstance(queue, InlineQueue):
        raise TypeError("run_batch needs a context built with an InlineQueue")
    queue.drain(ctx)
    return batch.batch_id


@dataclass
class ScriptedConverter:
    """Wraps the real converter and fails on purpose: `plan` maps an output stem to a list of exit codes
    to return on successive calls (then the real conversion runs)."""

    real: object
    plan: dict[str, list[int]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return str(getattr(self.real, "version"))  # noqa: B009 - `real` is typed loosely on purpose

    def convert(
        self,
        input_dir: Path,
        output_dir: Path,
        stem: str,
        options: ConversionOptions,
        *,
        timeout_seconds: float | None = None,
    ) -> ConverterRun:
        self.calls.append(stem)
        scripted = self.plan.get(stem)
        if scripted:
            code = scripted.pop(0)
            output_dir.mkdir(parents=True, exist_ok=True)
            return ConverterRun(exit_code=code, outputs=(), console=f"scripted exit {code}", seconds=0.0)
        run: ConverterRun = self.real.convert(  # type: ignore[attr-defined]
            input_dir, output_dir, stem, options, timeout_seconds=timeout_seconds
        )
        return run
