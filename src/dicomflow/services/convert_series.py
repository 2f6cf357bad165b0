"""Converting one series: claim it, download, run dcm2niix, publish, record — exactly once in effect.

What happens on each kind of delivery (DESIGN.md §4 invariants 1 to 4, 7 and 8):
- first delivery: the item is claimed with a short lease for the task's generation, and converted while a
  heartbeat renews the lease; the attempt budgets its time from the request's start so that it answers
  before Cloud Tasks' dispatch deadline (GCP_FACTS gotchas 11, 25);
- a delivery while another attempt holds a live lease (a duplicate, or a re-dispatch of a stalled
  attempt): answered "retry", so the task stays alive in case that attempt fails;
- a delivery for a finished or handed-off series, or of an older generation: a no-op, answered 2xx;
- a delivery of a newer generation than the item (a redrive not recorded yet): answered "retry";
- a transient failure: the item goes to `retrying` and the edge answers 5xx so the queue retries it,
  except on the last attempt, where the series is handed to the dead-letter queue and the edge answers
  2xx (Cloud Tasks has no DLQ of its own: it would silently drop the task);
- a permanent failure: handed to the dead-letter queue at once, answered 2xx;
- an attempt whose lease was taken over while it stalled stops before publishing (fenced out); if it had
  already finished, its success is still recorded (see domain/model.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from dicomflow.config import Mode
from dicomflow.domain import model
from dicomflow.domain.conversion import ConversionVerdict, assess
from dicomflow.domain.facts import SeriesFacts
from dicomflow.domain.failures import AttemptOutOfTime, DicomflowError, Failure, InvalidInput, SeriesTooLarge
from dicomflow.domain.model import Batch, BatchStatus, Item, OutputFile, Timings
from dicomflow.domain.privacy import Identifiers, scrub_text
from dicomflow.domain.retry import Verdict, decide
from dicomflow.events import Event
from dicomflow.ports import Attempt, HeartbeatHandle, QueueName, Task
from dicomflow.services.context import Context, event
from dicomflow.services.explain import name_what_failed
from dicomflow.services.outputs import finalize, replace_earlier_outputs
from dicomflow.services.progress import maybe_complete
from dicomflow.services.staging import collect_facts, describe_images, output_dir

# A series needs its DICOM files and dcm2niix's output on disk at once; on Cloud Run the disk is RAM
# (GCP_FACTS gotcha 18). NIfTI is about the size of the uncompressed pixel data, so budget the input
# twice over plus the converter's own working memory.
MEMORY_FACTOR = 2.5
MEMORY_OVERHEAD_MB = 256


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"  # already finished, handed off, or an older generation: nothing to do
    FENCED = "fenced"  # this attempt lost its lease to a newer one, which now owns the series
    BUSY = "busy"  # another attempt holds the lease, or the redrive is not recorded yet: retry later
    RETRY = "retry"  # transient failure: the edge answers 5xx
    DEAD_LETTERED = "dead_lettered"  # handed to the dead-letter queue: the edge answers 2xx

    @property
    def ack(self) -> bool:
        return self not in (Outcome.RETRY, Outcome.BUSY)


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
    """Named per attempt: a later attempt of the same generation (after the reconciler re-enqueued a
    series whose hand-off was lost) must not find its hand-off swallowed by an earlier task's name."""
    return Task(
        QueueName.DEAD_LETTER,
        f"dlq-{item.batch_id}-{item.item_id}-g{item.generation}-a{item.attempts}",
        {
            "batch_id": item.batch_id,
            "item_id": item.item_id,
            "generation": item.generation,
            "failure": failure.to_dict(),
        },
    )


def memory_needed_mb(item: Item) -> int:
    return int(item.bytes_total * MEMORY_FACTOR / (1024 * 1024)) + MEMORY_OVERHEAD_MB


class FencedOut(Exception):
    """This attempt's lease was taken over: another attempt owns the series now."""


class _Lease:
    """The claim this attempt holds, renewed by the heartbeat and checked before anything is published."""

    def __init__(self, ctx: Context, item: Item, owner: str, generation: int) -> None:
        self._ctx = ctx
        self._item = item
        self._owner = owner
        self._generation = generation

    def renew(self) -> bool:
        ctx, item = self._ctx, self._item
        seconds = ctx.settings.lease_seconds
        _, renewed = ctx.store.update_item(
            item.batch_id,
            item.item_id,
            lambda i: model.renew(i, ctx.clock(), seconds, self._owner, self._generation),
        )
        return renewed

    def confirm(self, beating: HeartbeatHandle, publishing: tuple[OutputFile, ...] | None = None) -> None:
        """Raise FencedOut unless this attempt still holds the series, checked against the store now; with
        `publishing`, record in the same write what the attempt is about to publish."""
        ctx, item = self._ctx, self._item
        if not beating.alive:
            raise FencedOut
        _, held = ctx.store.update_item(
            item.batch_id,
            item.item_id,
            lambda i: model.renew(
                i, ctx.clock(), ctx.settings.lease_seconds, self._owner, self._generation, publishing=publishing
            ),
        )
        if not held:
            raise FencedOut


class _Budget:
    """Time left before the attempt must answer (from the request's start, not from dcm2niix's)."""

    def __init__(self, ctx: Context, attempt: Attempt) -> None:
        self._ctx = ctx
        self._until = ctx.answer_by(attempt, ctx.settings.dispatch_deadline_seconds)

    def remaining(self, phase: str) -> float | None:
        if self._until is None:
            return None
        left = self._until - self._ctx.clock()
        if left <= 0:
            raise AttemptOutOfTime(
                f"the attempt ran out of time before {phase} (the task's dispatch deadline is near); it will "
                "be retried. If this series is very large, raise the worker's dispatch_deadline_seconds."
            )
        return left


def convert_series(ctx: Context, payload: ConvertPayload, attempt: Attempt) -> ConvertResult:
    batch = ctx.store.get_batch(payload.batch_id, counted=False)  # only its status and request
    if batch.status is BatchStatus.CANCELLED:
        item, changed = finalize(ctx, payload.batch_id, payload.item_id, lambda i: model.cancel_item(i, ctx.clock()))
        if changed:
            maybe_complete(ctx, batch.batch_id)
        return ConvertResult(Outcome.SKIPPED if changed else Outcome.DUPLICATE, item)

    owner = ctx.attempt_owner()
    seconds = ctx.settings.lease_seconds
    item, claimed = ctx.store.update_item(
        payload.batch_id,
        payload.item_id,
        lambda i: model.claim(i, ctx.clock(), seconds, owner, payload.generation),
    )
    if not claimed:
        return _not_claimed(ctx, item, payload, attempt)

    lease = _Lease(ctx, item, owner, payload.generation)
    beating = ctx.heartbeat.start(lease.renew, every=max(1.0, seconds / 3))
    try:
        return _convert_claimed(ctx, batch, item, lease=lease, beating=beating, budget=_Budget(ctx, attempt))
    except FencedOut:
        event(Event.DUPLICATE_DELIVERY, "attempt stopped: another attempt owns the series now",
              batch_id=item.batch_id, item_id=item.item_id, retry_count=attempt.retry_count)  # fmt: skip
        return ConvertResult(Outcome.FENCED, item)
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
    finally:
        beating.stop()


def _not_claimed(ctx: Context, item: Item, payload: ConvertPayload, attempt: Attempt) -> ConvertResult:
    decision = model.claim_decision(item, ctx.clock(), payload.generation)
    event(
        Event.DUPLICATE_DELIVERY,
        f"series not converted again: {decision.value}",
        batch_id=item.batch_id,
        item_id=item.item_id,
        state=item.state.value,
        retry_count=attempt.retry_count,
    )
    if item.handed_off and item.failure is not None and item.generation == payload.generation:
        # The attempt that handed the series off may have died before its dead-letter task was created:
        # create it again (same name: a no-op if it exists). The reconciler is the last resort.
        ctx.queue.enqueue([dead_letter_task(item, item.failure)])
    return ConvertResult(Outcome.BUSY if decision.retry_later else Outcome.DUPLICATE, item)


def _convert_claimed(
    ctx: Context, batch: Batch, item: Item, *, lease: _Lease, beating: HeartbeatHandle, budget: _Budget
) -> ConvertResult:
    memory = ctx.settings.memory_budget_mb
    if memory and memory_needed_mb(item) > memory:
        raise SeriesTooLarge(
            f"this series ({item.file_count} files, {item.bytes_total / 2**20:.0f} MiB) needs about "
            f"{memory_needed_mb(item)} MiB of worker memory, but the worker has {memory} MiB. Deploy the worker "
            "with more memory (infra variable worker_memory) or convert this series locally with "
            "`dicomflow convert`."
        )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.work_dir, prefix=f"series-{item.item_id[:12]}-") as tmp:
        work = Path(tmp)
        started = ctx.clock()
        budget.remaining("downloading")
        input_dir = ctx.source_for(batch.sources[0]).fetch(
            item.files, work / "in", lambda d, t: ctx.progress(item.batch_id, item.item_id, "download", d, t)
        )
        downloaded = ctx.clock()
        if not beating.alive:
            raise FencedOut
        # The series' identifiers, read from its own headers: they scrub everything this attempt writes or
        # records (outputs, warnings, failure details) and are never stored (docs/privacy.md).
        identifiers = ctx.deidentifier.identifiers(input_dir)
        left = budget.remaining("converting")
        timeout = (
            ctx.settings.convert_timeout_seconds if left is None else min(left, ctx.settings.convert_timeout_seconds)
        )
        ctx.progress(item.batch_id, item.item_id, "convert", 0, 1)
        lease.confirm(beating)  # a stalled attempt that lost the series does not convert it again
        # dcm2niix writes uncompressed NIfTI: the profile scrubs header text in place, then compresses.
        uncompressed = replace(batch.options, compress=False)
        run = ctx.converter.convert(input_dir, work / "out", item.output_stem, uncompressed, timeout_seconds=timeout)
        converted = ctx.clock()
        # Every volume dcm2niix reports must be among the outputs, none overwritten (a lost volume fails the
        # series for good); missing slices keep the outputs but flag the series as incomplete.
        try:
            classified = assess(run, files=item.file_count)
        except DicomflowError as exc:
            # Scrub (dcm2niix quotes protocol names), then name the file it complained about (issue 13): the
            # file's label is the user's own path locally, a position and Drive id in the cloud.
            exc.reason, exc.detail = _scrubbed(exc.reason, identifiers), _scrubbed(exc.detail, identifiers)
            exc.args = (exc.reason,)
            name_what_failed(
                exc,
                run.console,
                input_dir,
                item.files,
                names=ctx.settings.mode is Mode.LOCAL,
                scrub=lambda text: _scrubbed(text, identifiers),
            )
            raise
        warnings = tuple(_scrubbed(w, identifiers) for w in classified.warnings)
        if classified.verdict is ConversionVerdict.NOTHING_TO_CONVERT:
            return _finish(ctx, item, skip_reason=classified.skip_reason, warnings=warnings)
        # --layout bids orders and spaces series by acquisition: read before the profile drops the times.
        acquired = ctx.deidentifier.acquisition_offset(input_dir, run.outputs) if item.layout == "bids" else None
        images = describe_images(ctx, run.outputs)  # for the report; before compression: three slices read
        # Downloaded inputs are no longer needed: free the space before uploading (on Cloud Run it is
        # memory). Only our own scratch folder is removed, never a source folder used in place.
        shutil.rmtree(work / "in", ignore_errors=True)
        shareable = ctx.deidentifier.apply(run.outputs, identifiers, compress=batch.options.compress)
        facts = collect_facts(item, images, shareable, acquired)
        budget.remaining("uploading")
        sink = ctx.sink_for(batch.destination)
        rel_dir = output_dir(item)  # BIDS: staged, then named by the batch's finish step
        # Nothing is published by an attempt that lost the series; what is published is recorded first.
        lease.confirm(beating, publishing=sink.intended(rel_dir, shareable))

        def uploading(done: int, total: int) -> None:
            if not beating.alive:
                raise FencedOut  # stop between files: the series belongs to another attempt now
            ctx.progress(item.batch_id, item.item_id, "upload", done, total)

        outputs = sink.publish(batch.destination, rel_dir, shareable, owner_key=item.item_id, progress=uploading)
        uploaded = ctx.clock()
    timings = Timings(downloaded - started, converted - downloaded, uploaded - converted)
    return _finish(ctx, item, outputs=outputs, timings=timings, warnings=warnings, incomplete=classified.incomplete,
                   facts=facts)  # fmt: skip


def _scrubbed(text: str, identifiers: Identifiers) -> str:
    return "\n".join(scrub_text(line, identifiers) for line in text.splitlines())


def _finish(
    ctx: Context,
    item: Item,
    *,
    outputs: tuple[OutputFile, ...] = (),
    timings: Timings | None = None,
    warnings: tuple[str, ...] = (),
    skip_reason: str = "",
    incomplete: bool = False,
    facts: SeriesFacts | None = None,
) -> ConvertResult:
    now = ctx.clock()
    generation = item.generation
    if skip_reason:
        stored, changed = ctx.update_item(
            item.batch_id, item.item_id, lambda i: model.skip(i, now, skip_reason, warnings, generation)
        )
        outcome, name = Outcome.SKIPPED, Event.SERIES_SKIPPED
    else:
        stored, changed = ctx.update_item(
            item.batch_id,
            item.item_id,
            lambda i: model.succeed(
                i,
                now,
                outputs,
                timings or Timings(),
                warnings,
                generation=generation,
                incomplete=incomplete,
                facts=facts,
            ),
        )
        outcome, name = Outcome.SUCCEEDED, Event.SERIES_SUCCEEDED
    if not changed:
        return ConvertResult(Outcome.DUPLICATE, stored)
    if outcome is Outcome.SUCCEEDED:
        replace_earlier_outputs(ctx, stored)  # a series' outputs are replaced as a set (issue 13)
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
    generation = item.generation
    if verdict is Verdict.RETRY:
        stored, changed = ctx.store.update_item(
            item.batch_id, item.item_id, lambda i: model.retry_later(i, now, failure, owner, generation)
        )
        if not changed:
            return ConvertResult(Outcome.FENCED, stored, failure)
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
    grace = float(ctx.settings.lease_seconds)
    stored, changed = ctx.store.update_item(
        item.batch_id,
        item.item_id,
        lambda i: model.hand_off(i, now, failure, owner, generation, grace_seconds=grace),
    )
    if not changed:
        return ConvertResult(Outcome.FENCED, stored, failure)
    # If this enqueue fails the exception propagates (5xx): a redelivery finds the series handed off and
    # creates the task again; if none comes, the reconciler dead-letters it once the grace has passed.
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
