"""Batch-level commands: cancel."""

from __future__ import annotations

from dicomflow.domain import model
from dicomflow.domain.failures import Conflict
from dicomflow.domain.model import Batch, ItemState
from dicomflow.events import Event
from dicomflow.services.context import Context, event
from dicomflow.services.convert_series import CANCELLED

_WAITING = frozenset({ItemState.PENDING, ItemState.RETRYING})


def cancel_batch(ctx: Context, batch_id: str) -> Batch:
    """Stop a batch: series not yet started are skipped (so the counters still add up); series already
    converting finish. Tasks still queued find the batch cancelled and do nothing."""
    batch, changed = ctx.store.update_batch(batch_id, lambda b: model.cancel(b, ctx.clock()))
    if not changed:
        if batch.status.value == "cancelled":
            return ctx.store.get_batch(batch_id)
        raise Conflict(f"batch {batch_id} is already {batch.status.value} and cannot be cancelled")
    skipped = 0
    after = ""
    while page := ctx.store.list_items(batch_id, _WAITING, after=after, limit=200):
        for item in page:
            _, did = ctx.store.update_item(
                batch_id, item.item_id, lambda i: model.cancel_item(i, ctx.clock(), CANCELLED)
            )
            skipped += int(did)
        after = page[-1].item_id
    event(Event.BATCH_CANCELLED, "batch cancelled", batch_id=batch_id, skipped=skipped)
    return ctx.store.get_batch(batch_id)
