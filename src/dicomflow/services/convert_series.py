"""Converting one series: claim it, download, run dcm2niix, publish, record — exactly once in effect.

What happens on each kind of delivery (DESIGN.md §4 invariants 1 to 4):
- first delivery: the item is claimed with a lease (a transaction on its record) and converted;
- a duplicate while the first attempt runs (e.g. Cloud Tasks re-dispatching after the 30-minute
  deadline): the live lease makes it a no-op, answered 2xx;
- a duplicate after the item finished: a no-op, answered 2xx;
- a transient failure: the item goes to `retrying` and the edge answers 5xx so the queue retries it,
  except on the queue's last attempt, where the series is handed to the dead-letter queue and the edge
  answers 2xx (Cloud Tasks has no DLQ of its own: it would silently drop the task);
- a permanent failure: handed to the dead-letter queue at once, answered 2xx.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicomflow.domain import model
from dicomflow.domain.conversion import ConversionVerdict, check_input_count, classify
from dicomflow.domain.failures import DicomflowError, Failure, InvalidInput, SeriesTooLarge
from dicomflow.domain.model import Batch, BatchStatus, ClaimOutcome, Item, OutputFile, Timings
from dicomflow.domain.retry import Verdict, decide
from dicomflow.events import Event
from dicomflow.ports import Attempt, QueueName, Task
from dicomflow.services.context import Context, event
from dicomflow.services.progress import maybe_complete

# A series needs its DICOM files and dcm2niix's output on disk at once; on Cloud Run the disk is RAM
# (GCP_FACTS gotcha 18). NIfTI is about the size of the uncompressed pixel data, so budget the input
# twice over plus the converter's own working memory.
MEMORY_FACTOR = 2.5
MEMORY_OVERHEAD_MB = 256
CANCELLED = "the batch was cancelled before this series was converted"


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"  # already finished: nothing to do
    BUSY = "busy"  # another attempt holds the lease: nothing to do
    RETRY = "retry"  # transient failure: the edge answers 5xx
    DEAD_LETTERED = "dead_lettered"  # handed to the dead-letter queue: the edge answers 2xx

    @property
    def ack(self) -> bool:
        return self is not Outcome.RETRY


@dataclass(frozen=True, slots=True)
class ConvertPayload:
    batch_id: str
    item_id: str
    generation: int = 0

    @classmethod
    def parse(cls, payload: object) -> ConvertPayload:
        if not isinstance(payload, dict):
            raise InvalidInput("task body must be a JSON object", field="body")
        batch_id, item_id = payload.get("batch_id"), payload.get("item_id")
        generation = payload.get("generation", 0)
        if not isinstance(batch_id, str) or not batch_id:
            raise InvalidInput("batch_id must be a non-empty string", field="batch_id")
        if not isinstance(item_id, str) or not item_id:
            raise InvalidInput("item_id must be a non-empty string", field="item_id")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise InvalidInput("generation must be a non-negative integer", field="generation")
        return cls(batch_id, item_id, generation)


@dataclass(frozen=True, slots=True)
class ConvertResult:
    outcome: Outcome
    item: Item
    failure: Failure | None = None


def dead_letter_task(item: Item, failure: Failure) -> Task:
    return Task(
        QueueName.DEAD_LETTER,
        f"dlq-{item.batch_id}-{item.item_id}-g{item.generation}",
        {
            "batch_id": item.batch_id,
            "item_id": item.item_id,
            "generation": item.generation,
            "failure": failure.to_dict(),
        },
    )


def memory_needed_mb(item: Item) -> int:
    return int(item.bytes_total * MEMORY_FACTOR / (1024 * 1024)) + MEMORY_OVERHEAD_MB


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def convert_series(ctx: Context, payload: ConvertPayload, attempt: Attempt) -> ConvertResult:
    batch = ctx.store.get_batch(payload.batch_id, counted=False)  # only its status and request
    if batch.status is BatchStatus.CANCELLED:
        item, changed = ctx.store.update_item(
            payload.batch_id, payload.item_id, lambda i: model.cancel_item(i, ctx.clock(), CANCELLED)
        )
        if changed:
            maybe_complete(ctx, batch.batch_id)
        return ConvertResult(Outcome.SKIPPED if changed else Outcome.DUPLICATE, item)

    owner = worker_id()
    lease = ctx.settings.lease_seconds
    item, claimed = ctx.store.update_item(
        payload.batch_id, payload.item_id, lambda i: model.claim(i, ctx.clock(), lease, owner)
    )
    if not claimed:
        decision = model.claim_decision(item, ctx.clock())
        event(
            Event.DUPLICATE_DELIVERY,
            f"series not converted again: {decision.value}",
            batch_id=item.batch_id,
            item_id=item.item_id,
            state=item.state.value,
            retry_count=attempt.retry_count,
        )
        return ConvertResult(Outcome.BUSY if decision is ClaimOutcome.BUSY else Outcome.DUPLICATE, item)

    try:
        return _convert_claimed(ctx, batch, item)
    except DicomflowError as exc:
        return _failed(ctx, item, exc.to_failure(), attempt, owner)
    except Exception as exc:  # a bug must not lose the series: record it and let the queue retry
        logging.getLogger(__name__).exception("unexpected error while converting a series")
        failure = Failure(
            code="internal_error",
            reason="dicomflow hit an unexpected error while converting this series; it will be retried. "
            "If it keeps failing, report it with the batch id.",
            permanent=False,
            detail=type(exc).__name__,
        )
        return _failed(ctx, item, failure, attempt, owner)


def _convert_claimed(ctx: Context, batch: Batch, item: Item) -> ConvertResult:
    budget = ctx.settings.memory_budget_mb
    if budget and memory_needed_mb(item) > budget:
        raise SeriesTooLarge(
            f"this series ({item.file_count} files, {item.bytes_total / 2**20:.0f} MiB) needs about "
            f"{memory_needed_mb(item)} MiB of worker memory, but the worker has {budget} MiB. Deploy the worker "
            "with more memory (infra variable worker_memory) or convert this series locally with "
            "`dicomflow convert`."
        )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.work_dir, prefix=f"series-{item.item_id[:12]}-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        input_dir = ctx.source_for(batch.sources[0]).fetch(
            item.files, work / "in", lambda d, t: ctx.progress(item.batch_id, item.item_id, "download", d, t)
        )
        downloaded = time.monotonic()
        ctx.progress(item.batch_id, item.item_id, "convert", 0, 1)
        run = ctx.converter.convert(input_dir, work / "out", item.output_stem, batch.options)
        converted = time.monotonic()
        classified = classify(run.exit_code, len(run.outputs), run.console)
        if classified.verdict is ConversionVerdict.NOTHING_TO_CONVERT:
            return _finish(ctx, item, skip_reason=classified.skip_reason, warnings=classified.warnings)
        warnings = classified.warnings + check_input_count(run.console, item.file_count)
        # Downloaded inputs are no longer needed: free the space before uploading (on Cloud Run it is
        # memory). Only our own scratch folder is removed, never a source folder used in place.
        shutil.rmtree(work / "in", ignore_errors=True)
        outputs = ctx.sink_for(batch.destination).publish(
            batch.destination,
            item.rel_dir,
            run.outputs,
            owner_key=item.item_id,
            progress=lambda d, t: ctx.progress(item.batch_id, item.item_id, "upload", d, t),
        )
        uploaded = time.monotonic()
    timings = Timings(downloaded - started, converted - downloaded, uploaded - converted)
    return _finish(ctx, item, outputs=outputs, timings=timings, warnings=warnings)


def _finish(
    ctx: Context,
    item: Item,
    *,
    outputs: tuple[OutputFile, ...] = (),
    timings: Timings | None = None,
    warnings: tuple[str, ...] = (),
    skip_reason: str = "",
) -> ConvertResult:
    now = ctx.clock()
    if skip_reason:
        stored, changed = ctx.store.update_item(
            item.batch_id, item.item_id, lambda i: model.skip(i, now, skip_reason, warnings)
        )
        outcome, name = Outcome.SKIPPED, Event.SERIES_SKIPPED
    else:
        stored, changed = ctx.store.update_item(
            item.batch_id,
            item.item_id,
            lambda i: model.succeed(i, now, outputs, timings or Timings(), warnings),
        )
        outcome, name = Outcome.SUCCEEDED, Event.SERIES_SUCCEEDED
    if not changed:
        return ConvertResult(Outcome.DUPLICATE, stored)
    ctx.progress(item.batch_id, item.item_id, outcome.value, 1, 1)
    event(
        name,
        f"series {outcome.value}",
        batch_id=item.batch_id,
        item_id=item.item_id,
        modality=item.modality,
        files=item.file_count,
        bytes_in=item.bytes_total,
        bytes_out=sum(o.size for o in outputs),
        outputs=len(outputs),
        warnings=len(warnings),
        attempts=stored.attempts,
        data=(timings or Timings()).to_dict(),
    )
    maybe_complete(ctx, item.batch_id)
    return ConvertResult(outcome, stored)


def _failed(ctx: Context, item: Item, failure: Failure, attempt: Attempt, owner: str) -> ConvertResult:
    # The item's own attempt count also covers tasks re-enqueued by the reconciler, which restart
    # Cloud Tasks' retry counter at 0.
    retry_count = max(attempt.retry_count, item.attempts - 1)
    verdict = decide(failure, retry_count, ctx.settings.retry_policy)
    now = ctx.clock()
    if verdict is Verdict.RETRY:
        stored, _ = ctx.store.update_item(
            item.batch_id, item.item_id, lambda i: model.retry_later(i, now, failure, owner)
        )
        event(
            Event.SERIES_ATTEMPT_FAILED,
            f"series attempt failed, will retry: {failure.reason}",
            severity=logging.WARNING,
            batch_id=item.batch_id,
            item_id=item.item_id,
            code=failure.code,
            attempt=item.attempts,
            retry_count=attempt.retry_count,
        )
        ctx.progress(item.batch_id, item.item_id, "retry", 1, 1)
        return ConvertResult(Outcome.RETRY, stored, failure)
    stored, _ = ctx.store.update_item(item.batch_id, item.item_id, lambda i: model.note_failure(i, now, failure))
    # If this enqueue fails the exception propagates (5xx). On a last attempt Cloud Tasks then drops the
    # task, but the item stays `running` with our lease, and the reconciler dead-letters it when the
    # lease expires: the series is never lost.
    ctx.queue.enqueue([dead_letter_task(stored, failure)])
    event(
        Event.SERIES_HANDED_TO_DLQ,
        f"series handed to the dead-letter queue: {failure.reason}",
        severity=logging.WARNING,
        batch_id=item.batch_id,
        item_id=item.item_id,
        code=failure.code,
        permanent=failure.permanent,
        attempt=item.attempts,
    )
    ctx.progress(item.batch_id, item.item_id, "dead_lettered", 1, 1)
    return ConvertResult(Outcome.DEAD_LETTERED, stored, failure)
