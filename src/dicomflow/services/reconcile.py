"""The reconciler: owns every non-final state, because Cloud Tasks drops a task silently after its last
attempt and never says so (DESIGN.md invariant 7, GCP_FACTS gotchas 12 and 21). Run every 10 minutes by
Cloud Scheduler, and at start-up by local mode.

- `running` with an expired lease: the worker died (crash, OOM kill, instance stopped) or stalled. With
  attempts left the series goes back to `retrying` with a new task; on its last attempt it is
  dead-lettered with the reason. A series *handed off* to the dead-letter queue whose hand-off task was
  lost is dead-lettered with the failure the worker recorded (never retried: it may be permanent).
- `pending` or `retrying` untouched for longer than the convert queue's whole retry window: its task may
  be gone (dropped after its last attempt while the worker was down or refused it, or never created).
  The reconciler asks the queue; if the task is still there (a long backlog) it waits another period,
  otherwise the series gets a new task. A series of a cancelled batch is skipped instead.
- `expanding` untouched for longer than the expand queue's retry window: its tasks were dropped; the
  expansion restarts in a new epoch (new task names), and the batch fails after MAX_RESTARTS.
- `running` (or completed) batches get the status their counters call for.
- a final batch whose finish step (report.html, BIDS placement: services/finish.py) is still owed after the
  expand queue's retry window gets a new finish task (its task was dropped, or never created); at local
  start-up at once, with the destination's lease freed (no other process can hold it then).

Every transition is conditional on the snapshot the reconciler read (the item's `rev`), so acting on an
old query result changes nothing (DESIGN.md invariant 8). The waiting periods are derived from the
queues' own settings, so a dev stack with short settings recovers as quickly, relative to them, as
production does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dicomflow.config import Settings
from dicomflow.domain import dataset, model
from dicomflow.domain.failures import PermanentError, WorkerInterrupted
from dicomflow.domain.model import Batch, BatchStatus, Item, ItemState
from dicomflow.domain.retry import CONTROL_POLICY, RetryPolicy
from dicomflow.events import Event
from dicomflow.ports import QueueName
from dicomflow.services.context import Context, event
from dicomflow.services.dead_letter import announce_dead_letter
from dicomflow.services.expand import fail_expansion
from dicomflow.services.outputs import finalize, retract
from dicomflow.services.progress import settle_batch
from dicomflow.services.task_names import convert_task, expand_task, finish_task

MAX_RESTARTS = 3
# Slack on top of a queue's retry window: dispatch is not instantaneous, and a task may wait behind
# others before its first attempt.
WINDOW_SLACK_SECONDS = 300.0


def retry_window(policy: RetryPolicy, dispatch_deadline: float) -> float:
    """How long a task can live in its queue once dispatching starts: every attempt may run to its
    dispatch deadline, with the backoffs in between (Cloud Tasks' RetryConfig semantics)."""
    backoffs = sum(policy.backoff(n) for n in range(policy.max_attempts - 1))
    return policy.max_attempts * dispatch_deadline + backoffs + WINDOW_SLACK_SECONDS


def convert_task_lost_after(settings: Settings) -> float:
    return retry_window(settings.retry_policy, settings.dispatch_deadline_seconds)


def expansion_stalled_after(settings: Settings) -> float:
    return retry_window(CONTROL_POLICY, settings.expand_dispatch_deadline_seconds)


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    requeued: int = 0
    dead_lettered: int = 0
    still_queued: int = 0
    cancelled: int = 0
    expansions_restarted: int = 0
    batches_settled: int = 0
    finishes_requeued: int = 0


def _interrupted() -> WorkerInterrupted:
    return WorkerInterrupted(
        "the worker stopped while converting this series (it crashed, ran out of memory or was shut down)"
    )


def _task_lost() -> WorkerInterrupted:
    return WorkerInterrupted(
        "the queue gave up on this series' task before any worker could take it (the worker was unavailable "
        "or refused it); dicomflow re-enqueued it until its attempts were used up"
    )


class _Run:
    def __init__(self, ctx: Context, *, all_leases_expired: bool) -> None:
        self.ctx = ctx
        self.now = ctx.clock()
        self.lease_horizon = float("inf") if all_leases_expired else self.now
        self.policy = ctx.settings.retry_policy
        self.batches: dict[str, Batch] = {}
        self.counts = {"requeued": 0, "dead_lettered": 0, "still_queued": 0, "cancelled": 0}

    def batch(self, batch_id: str) -> Batch:
        if batch_id not in self.batches:
            self.batches[batch_id] = self.ctx.store.get_batch(batch_id, counted=False)
        return self.batches[batch_id]

    def exhausted(self, item: Item) -> bool:
        return item.attempts >= self.policy.max_attempts

    def stale(self, item: Item) -> None:
        if item.state is ItemState.RUNNING:
            self.expired_lease(item)
        else:
            self.idle(item)

    def expired_lease(self, seen: Item) -> None:
        ctx = self.ctx
        if seen.handed_off or self.exhausted(seen):
            failure = _interrupted().to_failure()
            stored, changed = finalize(
                ctx,
                seen.batch_id,
                seen.item_id,
                lambda i: model.abandon(i, self.now, failure, seen, expired_before=self.lease_horizon),
            )
            if changed:
                self.dead(stored, "series dead-lettered by the reconciler: its attempt ended without a result")
            return
        failure = _interrupted().to_failure()
        stored, changed = ctx.update_item(
            seen.batch_id,
            seen.item_id,
            lambda i: model.release_orphan(i, self.now, failure, seen, expired_before=self.lease_horizon),
        )
        if changed:
            self.requeue(stored, seen)

    def idle(self, seen: Item) -> None:
        ctx = self.ctx
        if self.batch(seen.batch_id).status is BatchStatus.CANCELLED:
            _, changed = finalize(ctx, seen.batch_id, seen.item_id, lambda i: model.cancel_stale(i, self.now, seen))
            self.counts["cancelled"] += int(changed)
            return
        if ctx.queue.exists(QueueName.CONVERT, seen.task_id):
            _, changed = ctx.store.update_item(
                seen.batch_id, seen.item_id, lambda i: model.still_queued(i, self.now, seen)
            )
            self.counts["still_queued"] += int(changed)
            return
        if self.exhausted(seen):
            # Not reachable through the worker (a retrying series has attempts left), but a policy
            # lowered between deployments can leave one: dead-letter it rather than loop.
            failure = seen.failure or _task_lost().to_failure()
            stored, changed = finalize(
                ctx, seen.batch_id, seen.item_id, lambda i: model.give_up(i, self.now, failure, seen)
            )
            if changed:
                self.dead(stored, "series dead-lettered by the reconciler: its attempts are used up")
            return
        stored, changed = ctx.store.update_item(seen.batch_id, seen.item_id, lambda i: model.requeue(i, self.now, seen))
        if changed:
            self.requeue(stored, seen)

    def requeue(self, stored: Item, seen: Item) -> None:
        self.ctx.queue.enqueue([convert_task(stored)])
        self.counts["requeued"] += 1
        event(
            Event.RECONCILE_REQUEUED,
            "stale series re-enqueued",
            severity=logging.WARNING,
            batch_id=stored.batch_id,
            item_id=stored.item_id,
            state=seen.state.value,
            attempts=stored.attempts,
        )

    def dead(self, stored: Item, message: str) -> None:
        self.counts["dead_lettered"] += 1
        event(Event.RECONCILE_DEAD_LETTERED, message, severity=logging.ERROR, batch_id=stored.batch_id,
              item_id=stored.item_id)  # fmt: skip
        announce_dead_letter(self.ctx, stored)


def reconcile(ctx: Context, *, all_leases_expired: bool = False) -> ReconcileReport:
    """`all_leases_expired` is for local mode at start-up: no other process can hold a lease then."""
    run = _Run(ctx, all_leases_expired=all_leases_expired)
    idle_before = run.now - convert_task_lost_after(ctx.settings)
    for item in ctx.store.find_stale(run.lease_horizon, idle_before):
        run.stale(item)
    for item in ctx.store.find_unretracted():
        retract(ctx, item)  # a finalizer that could not remove what an unrecorded publish left

    restarted = settled = 0
    stalled_after = expansion_stalled_after(ctx.settings)
    unfinished = frozenset({BatchStatus.EXPANDING, BatchStatus.RUNNING})
    for batch in ctx.store.list_batches(limit=500, statuses=unfinished, counted=False):
        if batch.status is BatchStatus.RUNNING:
            settled += int(settle_batch(ctx, batch.batch_id))
        elif not all_leases_expired and run.now - batch.updated_at > stalled_after:
            restarted += int(_restart_expansion(ctx, batch, run.now))
    finishes = sum(_retry_finish(ctx, batch, run.now, all_leases_expired) for batch in ctx.store.find_unfinished())
    return ReconcileReport(
        requeued=run.counts["requeued"],
        dead_lettered=run.counts["dead_lettered"],
        still_queued=run.counts["still_queued"],
        cancelled=run.counts["cancelled"],
        expansions_restarted=restarted,
        batches_settled=settled,
        finishes_requeued=finishes,
    )


def _retry_finish(ctx: Context, seen: Batch, now: float, all_leases_expired: bool) -> bool:
    """A final batch whose finish step has not run: its task may be lost (dropped after its last attempt,
    or never created because its creator died). After the expand queue's whole retry window — at once
    at local start-up, when no other process can be running it — it gets a new task."""
    if not all_leases_expired and now - seen.updated_at <= expansion_stalled_after(ctx.settings):
        return False
    if all_leases_expired:
        ctx.store.update_dataset(seen.destination.key, lambda d: dataset.free(d, now))
    batch, changed = ctx.store.update_batch(seen.batch_id, lambda b: model.retry_finish(b, now, seen))
    if changed:
        ctx.queue.enqueue([finish_task(batch)])
        event(Event.RECONCILE_REQUEUED, "finish step of a final batch re-enqueued", severity=logging.WARNING,
              batch_id=batch.batch_id, completion=batch.completions)  # fmt: skip
    return changed


def _restart_expansion(ctx: Context, batch: Batch, now: float) -> bool:
    """Locally, expansion tasks persist in the queue; in the cloud one may have been dropped."""
    if batch.restarts >= MAX_RESTARTS:
        fail_expansion(
            ctx,
            batch,
            PermanentError(
                f"the source could not be read completely after {MAX_RESTARTS + 1} tries (the expansion kept "
                "failing or timing out); check that the folder is shared and readable, then submit it again"
            ),
        )
        return False
    restarted, changed = ctx.store.update_batch(
        batch.batch_id, lambda b: model.restart_expansion(b, now, batch.updated_at)
    )
    if changed:
        ctx.queue.enqueue([expand_task(restarted.batch_id, restarted.epoch)])
        event(Event.RECONCILE_REQUEUED, "stalled expansion restarted", severity=logging.WARNING,
              batch_id=batch.batch_id, epoch=restarted.epoch)  # fmt: skip
    return changed
