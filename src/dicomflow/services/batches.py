"""Batch-level commands: cancel."""

from __future__ import annotations

from dicomflow.domain import model
from dicomflow.domain.failures import Conflict
from dicomflow.domain.model import Batch, BatchStatus, ItemState
from dicomflow.events import Event
from dicomflow.services.context import Context, event
from dicomflow.services.outputs import finalize
from dicomflow.services.progress import maybe_complete
from dicomflow.services.task_names import cancel_task, finish_task

_WAITING = frozenset({ItemState.PENDING, ItemState.RETRYING})


def cancel_batch(ctx: Context, batch_id: str) -> Batch:
    """Stop a batch: series not yet started are skipped (so the counters still add up); series already
    converting finish. The batch is marked at once; skipping its waiting series is a task (a batch can
    hold thousands), and queued convert tasks that come first find the batch cancelled and skip theirs."""
    batch, changed = ctx.store.update_batch(batch_id, lambda b: model.cancel(b, ctx.clock()))
    if not changed and batch.status is not BatchStatus.CANCELLED:
        raise Conflict(f"batch {batch_id} is already {batch.status.value} and cannot be cancelled")
    ctx.queue.enqueue([cancel_task(batch_id)])
    if batch.finish_pending:
        ctx.queue.enqueue([finish_task(batch)])  # its report (lost with a crash here: the reconciler sends it)
    if changed:
        event(Event.BATCH_CANCELLED, "batch cancelled", batch_id=batch_id)
    return ctx.store.get_batch(batch_id)


def sweep_cancelled(ctx: Context, batch_id: str) -> int:
    """The cancel task: skip every waiting series of a cancelled batch (a retry continues where it
    stopped: skipped series are no longer waiting)."""
    batch = ctx.store.get_batch(batch_id, counted=False)
    if batch.status is not BatchStatus.CANCELLED:
        return 0
    skipped = 0
    while page := ctx.store.list_items(batch_id, _WAITING, limit=200):
        for item in page:
            _, did = finalize(ctx, batch_id, item.item_id, lambda i: model.cancel_item(i, ctx.clock()))
            skipped += int(did)
        if len(page) < 200:
            break
    maybe_complete(ctx, batch_id)  # its finish step then reports the final counts
    return skipped
