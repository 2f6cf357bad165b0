"""The dead-letter queue's handler, and redriving dead letters after the cause is fixed."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from dicomflow.domain import model
from dicomflow.domain.failures import Conflict, Failure, InvalidInput
from dicomflow.domain.model import BatchStatus, ItemState
from dicomflow.domain.series import FileRef
from dicomflow.events import Event
from dicomflow.services.context import Context, event
from dicomflow.services.expand import convert_task
from dicomflow.services.progress import maybe_complete


@dataclass(frozen=True, slots=True)
class DeadLetterPayload:
    batch_id: str
    item_id: str
    failure: Failure

    @classmethod
    def parse(cls, payload: object) -> DeadLetterPayload:
        if not isinstance(payload, dict):
            raise InvalidInput("task body must be a JSON object", field="body")
        batch_id, item_id, failure = payload.get("batch_id"), payload.get("item_id"), payload.get("failure")
        if not isinstance(batch_id, str) or not batch_id:
            raise InvalidInput("batch_id must be a non-empty string", field="batch_id")
        if not isinstance(item_id, str) or not item_id:
            raise InvalidInput("item_id must be a non-empty string", field="item_id")
        if not isinstance(failure, dict) or not isinstance(failure.get("reason"), str) or "code" not in failure:
            raise InvalidInput("failure must be an object with code, reason and permanent", field="failure")
        return cls(
            batch_id,
            item_id,
            Failure(
                code=str(failure["code"]),
                reason=str(failure["reason"]),
                permanent=bool(failure.get("permanent", True)),
                detail=str(failure.get("detail", "")),
            ),
        )


def record_dead_letter(ctx: Context, batch_id: str, item_id: str, failure: Failure) -> bool:
    """Move the item to dead_lettered once; a duplicate delivery changes and counts nothing."""
    item, changed = ctx.store.update_item(batch_id, item_id, lambda i: model.dead_letter(i, ctx.clock(), failure))
    if changed:
        event(
            Event.SERIES_DEAD_LETTERED,
            f"series dead-lettered: {failure.reason}",
            severity=logging.ERROR,
            batch_id=batch_id,
            item_id=item_id,
            code=failure.code,
            permanent=failure.permanent,
            attempts=item.attempts,
            modality=item.modality,
            series_number=item.series_number,
        )
        maybe_complete(ctx, batch_id)
    return changed


def _redrive(item: model.Item, *, now: float, files: tuple[FileRef, ...]) -> model.Item | None:
    return model.redrive(item, now, files)


def retry_dead_letters(ctx: Context, batch_id: str) -> int:
    """Put every dead-lettered series of the batch back in the queue with a fresh attempt budget."""
    batch = ctx.store.get_batch(batch_id, counted=False)
    if batch.status in (BatchStatus.CANCELLED, BatchStatus.FAILED, BatchStatus.EXPANDING):
        raise Conflict(
            f"batch {batch_id} is {batch.status.value}; only series of a running or completed batch can be retried"
        )
    source = ctx.source_for(batch.sources[0])
    redriven = 0
    after = ""
    while True:
        page = ctx.store.list_items(batch_id, frozenset({ItemState.DEAD_LETTERED}), after=after, limit=200)
        if not page:
            break
        tasks = []
        for item in page:
            change = functools.partial(_redrive, now=ctx.clock(), files=tuple(source.refresh(item.files)))
            updated, changed = ctx.store.update_item(batch_id, item.item_id, change)
            if changed:
                tasks.append(convert_task(updated))
                redriven += 1
        ctx.queue.enqueue(tasks)
        after = page[-1].item_id
    if redriven:
        # Reopen only after the items are pending again, then re-check: if every redriven series already
        # finished in the meantime, this completes the batch again.
        ctx.store.update_batch(batch_id, lambda b: model.reopen(b, ctx.clock()))
        event(
            Event.SERIES_REDRIVEN,
            f"{redriven} dead-lettered series re-enqueued",
            batch_id=batch_id,
            count=redriven,
        )
        maybe_complete(ctx, batch_id)
    return redriven
