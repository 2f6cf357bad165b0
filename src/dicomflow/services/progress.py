"""Batch completion and the progress view (counters, ETA, failures) shown by the API and the CLI."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from dicomflow.domain import model
from dicomflow.domain.model import Batch, BatchStatus, Counters, Item, ItemState
from dicomflow.events import Event
from dicomflow.services.context import Context, event
from dicomflow.services.task_names import finish_task


def maybe_complete(ctx: Context, batch_id: str) -> bool:
    """Mark the batch completed once every item is terminal; True when the batch is (now) final.

    Called after every terminal transition. Each caller counts *after* its own write committed, so the
    last item to finish always sees all the others: no completion can be missed, and the conditional
    batch update makes it happen once. Until then it costs one count query. A cancelled or failed batch
    (final before its last series ended) gets its finish step once nothing of it is running any more.
    """
    if ctx.store.count_active(batch_id):
        return False
    final = settle_batch(ctx, batch_id)
    if final:
        request_finish(ctx, batch_id)
    return final


def request_finish(ctx: Context, batch_id: str) -> None:
    """Owe the batch a finish step if what it ended with is new (model.request_finish), and enqueue it."""
    counters = ctx.store.counters(batch_id)
    batch, changed = ctx.store.update_batch(batch_id, lambda b: model.request_finish(b, counters, ctx.clock()))
    if changed:
        ctx.queue.enqueue([finish_task(batch)])


def enqueue_finish(ctx: Context, batch: Batch) -> None:
    """The finish step's task for the batch's last completion (a no-op when its name was used)."""
    if batch.finish_pending:
        ctx.queue.enqueue([finish_task(batch)])


def settle_batch(ctx: Context, batch_id: str) -> bool:
    """Give the batch the status its counters call for (model.settle): completed once every series is
    final, back to running when a redrive reopened series, the other completed status after a late
    success. True when the batch is final afterwards."""
    retention = ctx.settings.retention_days * 86400.0
    for _ in range(3):
        counters = ctx.store.counters(batch_id)
        change = functools.partial(_settle, counters=counters, now=ctx.clock(), retention=retention)
        batch, changed = ctx.store.update_batch(batch_id, change)
        if not changed:
            return batch.is_final
        # If this enqueue is lost (a crash right after the write), the reconciler finds the batch's finish
        # still pending and enqueues it again (reconcile.py).
        enqueue_finish(ctx, batch)
        if batch.is_final:
            event(
                Event.BATCH_COMPLETED,
                f"batch {batch.status.value}",
                severity=logging.WARNING if counters.dead_lettered else logging.INFO,
                batch_id=batch_id,
                status=batch.status.value,
                data=counters.to_dict(),
            )
        # The counters were read before the write: a redrive may have reopened series in between. Look
        # once more so a batch never stays completed while series of it run again.
        if not batch.is_final or not ctx.store.count_active(batch_id):
            return batch.is_final
    return False


def _settle(batch: Batch, *, counters: Counters, now: float, retention: float) -> Batch | None:
    return model.settle(batch, counters, now, retention)


@dataclass(frozen=True, slots=True)
class BatchView:
    batch: Batch
    counters: Counters
    eta_seconds: float | None
    failures: list[Item]
    items: list[Item]
    next_page: str


def eta(batch: Batch, counters: Counters, now: float) -> float | None:
    """Remaining time at the rate series have finished since expansion ended (None until measurable)."""
    if batch.status is not BatchStatus.RUNNING or batch.expanded_at is None:
        return None
    done = counters.succeeded + counters.dead_lettered
    elapsed = now - batch.expanded_at
    remaining = counters.series_total - counters.finished
    if remaining <= 0:
        return 0.0
    if done == 0 or elapsed <= 0:
        return None
    return remaining * elapsed / done


def batch_view(
    ctx: Context, batch_id: str, *, page_after: str = "", page_size: int = 50, failure_limit: int = 50,
    states: frozenset[ItemState] | None = None,
) -> BatchView:  # fmt: skip
    batch = ctx.store.get_batch(batch_id)
    counters = batch.counters
    failures = (
        ctx.store.list_items(batch_id, frozenset({ItemState.DEAD_LETTERED}), limit=failure_limit)
        if counters.dead_lettered
        else []
    )
    items = ctx.store.list_items(batch_id, states, after=page_after, limit=page_size + 1)
    next_page = items[page_size - 1].item_id if len(items) > page_size else ""
    return BatchView(batch, counters, eta(batch, counters, ctx.clock()), failures, items[:page_size], next_page)
