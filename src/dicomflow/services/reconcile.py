"""The reconciler: finds work a crash left behind and finishes it (run every 10 minutes by Cloud
Scheduler; run at start-up by local mode).

- An item `running` past its lease lost its worker (crash, OOM kill, instance stopped). With attempts
  left it goes back to `retrying` and gets a new task; on its last attempt it is dead-lettered with the
  reason — a crash on the last attempt must not lose the series (DESIGN.md invariant 4).
- An item `retrying` for much longer than the queue's longest backoff lost its task; it gets a new one.
- A batch still `expanding` long after its last update lost its expansion task; it gets a new one.
- A batch `running` whose items are all finished is completed (normally done by the last worker).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dicomflow.domain import model
from dicomflow.domain.failures import WorkerInterrupted
from dicomflow.domain.model import BatchStatus, Item, ItemState
from dicomflow.events import Event
from dicomflow.services.context import Context, event
from dicomflow.services.dead_letter import record_dead_letter
from dicomflow.services.expand import convert_task
from dicomflow.services.progress import maybe_complete
from dicomflow.services.submit import expand_task

EXPANSION_STALL_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    requeued: int = 0
    dead_lettered: int = 0
    expansions_restarted: int = 0
    batches_completed: int = 0


def _interrupted() -> WorkerInterrupted:
    return WorkerInterrupted(
        "the worker stopped while converting this series (it crashed, ran out of memory or was shut down)"
    )


def reconcile(ctx: Context, *, all_leases_expired: bool = False) -> ReconcileReport:
    """`all_leases_expired` is for local mode at start-up: no other process can hold a lease then."""
    now = ctx.clock()
    policy = ctx.settings.retry_policy
    lease_horizon = float("inf") if all_leases_expired else now
    retrying_cutoff = now - (policy.max_backoff_seconds + ctx.settings.dispatch_deadline_seconds + 600)
    requeued = dead = 0
    for item in ctx.store.find_stale(lease_horizon, retrying_cutoff):
        if _exhausted(item, policy.max_attempts):
            # A recorded failure is the real cause (a transient error, or a dead-letter hand-off whose task
            # was lost); without one, the worker died mid-attempt.
            failure = item.failure or _interrupted().to_failure()
            if record_dead_letter(ctx, item.batch_id, item.item_id, failure):
                dead += 1
                event(
                    Event.RECONCILE_DEAD_LETTERED,
                    "stale series dead-lettered after its last attempt",
                    severity=logging.ERROR,
                    batch_id=item.batch_id,
                    item_id=item.item_id,
                )
            continue
        if _requeue(ctx, item, now):
            requeued += 1

    restarted = completed = 0
    unfinished = frozenset({BatchStatus.EXPANDING, BatchStatus.RUNNING})
    for batch in ctx.store.list_batches(limit=500, statuses=unfinished, counted=False):
        if batch.status is BatchStatus.RUNNING:
            completed += int(maybe_complete(ctx, batch.batch_id))
        elif not all_leases_expired and now - batch.updated_at > EXPANSION_STALL_SECONDS:
            # Locally, expansion tasks persist in the queue; in the cloud one may have been dropped.
            # A new task id, and touching the batch so the next run waits another full period.
            ctx.store.update_batch(batch.batch_id, lambda b: _touch_batch(b, ctx.clock()))
            ctx.queue.enqueue([expand_task(batch.batch_id, suffix=f"r{int(now)}")])
            restarted += 1
    return ReconcileReport(requeued, dead, restarted, completed)


def _requeue(ctx: Context, item: Item, now: float) -> bool:
    failure = _interrupted().to_failure()
    if item.state is ItemState.RUNNING:
        updated, changed = ctx.store.update_item(
            item.batch_id, item.item_id, lambda i: model.release_orphan(i, ctx.clock(), failure)
        )
    else:
        updated, changed = ctx.store.update_item(item.batch_id, item.item_id, lambda i: _touch(i, ctx.clock()))
    if not changed:
        return False
    # A fresh task id: the old one may be blocked for reuse for up to a day.
    ctx.queue.enqueue([convert_task(updated, suffix=f"r{updated.attempts}-{int(now)}")])
    event(
        Event.RECONCILE_REQUEUED,
        "stale series re-enqueued",
        severity=logging.WARNING,
        batch_id=item.batch_id,
        item_id=item.item_id,
        state=item.state.value,
        attempts=item.attempts,
    )
    return True


def _exhausted(item: Item, max_attempts: int) -> bool:
    return item.attempts >= max_attempts


def _touch(item: Item, now: float) -> Item | None:
    if item.state is not ItemState.RETRYING:
        return None
    return model.touch(item, now)


def _touch_batch(batch: model.Batch, now: float) -> model.Batch | None:
    if batch.status is not BatchStatus.EXPANDING:
        return None
    return model.touch_batch(batch, now)
