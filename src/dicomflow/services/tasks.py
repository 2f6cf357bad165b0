"""One entry for every queued task, whoever delivers it: the local queue runner or an HTTP edge
receiving a Cloud Tasks request. The answer is an HTTP status, because that is what a queue understands:
2xx = done (never deliver again), anything else = deliver again later (until the last attempt)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dicomflow.domain.failures import DicomflowError, InvalidInput, NotFound
from dicomflow.events import Event
from dicomflow.ports import Attempt, QueueName
from dicomflow.services.batches import sweep_cancelled
from dicomflow.services.context import Context, event
from dicomflow.services.convert_series import ConvertPayload, convert_series
from dicomflow.services.dead_letter import DeadLetterPayload, record_dead_letter, redrive
from dicomflow.services.drive_changes import handle_changes_task
from dicomflow.services.expand import ExpandPayload, handle_expand
from dicomflow.services.finish import finish_batch


@dataclass(frozen=True, slots=True)
class TaskResponse:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    error: DicomflowError | None = None

    @property
    def ack(self) -> bool:
        return 200 <= self.status < 300


def handle_task(ctx: Context, queue: QueueName, payload: object, attempt: Attempt) -> TaskResponse:
    try:
        return _dispatch(ctx, queue, payload, attempt)
    except InvalidInput as exc:
        event(
            Event.TASK_REJECTED,
            f"task body rejected: {exc.reason}",
            severity=logging.ERROR,
            queue=queue.value,
            field=exc.field,
            task_id=attempt.task_id,
        )
        return TaskResponse(400, error=exc)
    except NotFound as exc:
        event(Event.TASK_REJECTED, f"task refers to nothing: {exc.reason}", severity=logging.ERROR,
              queue=queue.value, task_id=attempt.task_id)  # fmt: skip
        return TaskResponse(404, error=exc)
    except DicomflowError as exc:
        if exc.permanent:
            raise  # a handler bug: permanent errors are handled inside each use case
        logging.getLogger(__name__).warning("task failed, will be retried: %s", exc.reason)
        return TaskResponse(503, error=exc)


def _dispatch(ctx: Context, queue: QueueName, payload: object, attempt: Attempt) -> TaskResponse:
    if queue is QueueName.CONVERT:
        result = convert_series(ctx, ConvertPayload.parse(payload), attempt)
        body: dict[str, Any] = {"outcome": result.outcome.value, "state": result.item.state.value}
        if result.failure:
            body["failure"] = result.failure.to_dict()
        return TaskResponse(200 if result.outcome.ack else 503, body)
    if queue is QueueName.EXPAND:
        # The expand function also runs the batch-maintenance steps that must not live in a 60 s API
        # request: redriving dead letters, sweeping a cancelled batch, and a final batch's finish step
        # (its report and BIDS dataset).
        step = ExpandPayload.parse(payload)
        if step.step == "redrive":
            return TaskResponse(200, {"outcome": "done", "redriven": redrive(ctx, step.batch_id)})
        if step.step == "cancel":
            return TaskResponse(200, {"outcome": "done", "skipped": sweep_cancelled(ctx, step.batch_id)})
        if step.step == "finish":
            finished = finish_batch(ctx, step.batch_id, step.completion, attempt)
            return TaskResponse(200, {"outcome": finished.outcome, "moved": finished.moved})
        handle_expand(ctx, step, attempt)
        return TaskResponse(200, {"outcome": "done"})
    if queue is QueueName.DEAD_LETTER:
        parsed = DeadLetterPayload.parse(payload)
        changed = record_dead_letter(ctx, parsed.batch_id, parsed.item_id, parsed.failure, parsed.generation)
        return TaskResponse(200, {"outcome": "dead_lettered" if changed else "duplicate"})
    if queue is QueueName.CHANGES:
        handle_changes_task(ctx, payload, attempt)
        return TaskResponse(200, {"outcome": "done"})
    raise InvalidInput(f"unknown queue {queue!r}", field="queue")  # pragma: no cover - enum is exhaustive
