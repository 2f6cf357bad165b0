"""The dead-letter queue's handler, and redriving dead letters after the cause is fixed."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from dicomflow.domain import model
from dicomflow.domain.failures import Conflict, DicomflowError, Failure, InvalidInput
from dicomflow.domain.model import Batch, BatchStatus, ItemState
from dicomflow.domain.series import FileRef
from dicomflow.events import Event
from dicomflow.services.context import Context, event
from dicomflow.services.outputs import finalize
from dicomflow.services.progress import maybe_complete, settle_batch
from dicomflow.services.reread import reread_series
from dicomflow.services.task_names import convert_task_for, redrive_task


@dataclass(frozen=True, slots=True)
class DeadLetterPayload:
    batch_id: str
    item_id: str
    failure: Failure
    generation: int = 0

    @classmethod
    def parse(cls, payload: object) -> DeadLetterPayload:
        if not isinstance(payload, dict):
            raise InvalidInput("task body must be a JSON object", field="body")
        batch_id, item_id, failure = payload.get("batch_id"), payload.get("item_id"), payload.get("failure")
        generation = payload.get("generation", 0)
        if not isinstance(batch_id, str) or not batch_id:
            raise InvalidInput("batch_id must be a non-empty string", field="batch_id")
        if not isinstance(item_id, str) or not item_id:
            raise InvalidInput("item_id must be a non-empty string", field="item_id")
        if not isinstance(failure, dict) or not isinstance(failure.get("reason"), str) or "code" not in failure:
            raise InvalidInput("failure must be an object with code, reason and permanent", field="failure")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise InvalidInput("generation must be a non-negative integer", field="generation")
        return cls(
            batch_id,
            item_id,
            Failure(
                code=str(failure["code"]),
                reason=str(failure["reason"]),
                permanent=bool(failure.get("permanent", True)),
                detail=str(failure.get("detail", "")),
            ),
            generation,
        )


def record_dead_letter(ctx: Context, batch_id: str, item_id: str, failure: Failure, generation: int) -> bool:
    """Move a handed-off item of this generation to dead_lettered once; a duplicate delivery, or a late
    message of an older generation (the series was redriven since), changes and counts nothing."""
    item, changed = finalize(ctx, batch_id, item_id, lambda i: model.dead_letter(i, ctx.clock(), failure, generation))
    if changed:
        announce_dead_letter(ctx, item)
    return changed


def announce_dead_letter(ctx: Context, item: model.Item) -> None:
    failure = item.failure
    event(
        Event.SERIES_DEAD_LETTERED,
        f"series dead-lettered: {failure.reason if failure else ''}",
        severity=logging.ERROR,
        batch_id=item.batch_id,
        item_id=item.item_id,
        code=failure.code if failure else "",
        permanent=failure.permanent if failure else True,
        attempts=item.attempts,
        modality=item.modality,
        series_number=item.series_number,
    )
    maybe_complete(ctx, item.batch_id)


def retry_dead_letters(ctx: Context, batch_id: str) -> tuple[Batch, int]:
    """Ask for every dead-lettered series of the batch to be converted again (the batch API's
    :retry-dead-letters). The work happens in a redrive task, so a request that dies half-way (the API
    function's 60 s) leaves nothing half-done: the task is retried until every series is back in the
    queue. Returns the batch and how many series were dead-lettered when asked."""
    batch = ctx.store.get_batch(batch_id)
    if batch.status in (BatchStatus.CANCELLED, BatchStatus.FAILED, BatchStatus.EXPANDING):
        raise Conflict(
            f"batch {batch_id} is {batch.status.value}; only series of a running or completed batch can be retried"
        )
    if not batch.counters.dead_lettered:
        return batch, 0
    asked, _ = ctx.store.update_batch(batch_id, lambda b: model.request_redrive(b, ctx.clock()))
    ctx.queue.enqueue([redrive_task(batch_id, asked.redrives)])
    event(Event.SERIES_REDRIVEN, "redrive of dead-lettered series requested", batch_id=batch_id,
          count=batch.counters.dead_lettered)  # fmt: skip
    return asked, batch.counters.dead_lettered


def redrive(ctx: Context, batch_id: str) -> int:
    """The redrive task: each dead-lettered series gets its convert task of the next generation *first*,
    then moves to pending in that generation (a task delivered before the move is answered "retry"; a
    crash between the two leaves the series dead-lettered, found again when the task is retried).
    Before that, each series is read again from the source (services/reread.py): the user may have
    re-exported, added or removed files. A series of which nothing is left to convert stays
    dead-lettered, with the reason; a source that can no longer be read at all likewise."""
    batch = ctx.store.get_batch(batch_id, counted=False)
    if batch.status in (BatchStatus.CANCELLED, BatchStatus.FAILED, BatchStatus.EXPANDING):
        return 0
    dead: list[model.Item] = []
    while page := ctx.store.list_items(batch_id, _DEAD, after=dead[-1].item_id if dead else "", limit=PAGE):
        dead.extend(page)
    try:
        now_in_source = reread_series(ctx, batch, dead)  # one listing of the source for all of them
    except DicomflowError as exc:
        if not exc.permanent:
            raise  # the task is retried
        unreadable = Failure(exc.code, f"not retried: the source could not be read again ({exc.reason})", True)
        for item in dead:
            _keep_dead(ctx, item, unreadable)
        settle_batch(ctx, batch_id)
        return 0
    redriven = 0
    for start in range(0, len(dead), PAGE):
        page = dead[start : start + PAGE]
        ready = [i for i in page if i.item_id in now_in_source]
        ctx.queue.enqueue([convert_task_for(i, i.generation + 1) for i in ready])
        for item in page:
            series = now_in_source.get(item.item_id)
            if series is None:
                _keep_dead(ctx, item, _GONE)
                continue
            change = functools.partial(
                _redrive, now=ctx.clock(), files=series.files, generation=item.generation, fp=series.fingerprint
            )
            _, changed = ctx.update_item(batch_id, item.item_id, change)
            redriven += int(changed)
    if redriven:
        event(Event.SERIES_REDRIVEN, f"{redriven} dead-lettered series re-enqueued", batch_id=batch_id,
              count=redriven)  # fmt: skip
    settle_batch(ctx, batch_id)
    return redriven


_DEAD = frozenset({ItemState.DEAD_LETTERED})
PAGE = 200
_GONE = Failure(
    "series_gone",
    "not retried: none of this series' files are in its source folder any more (removed or moved); "
    "put them back, or convert the folder that holds them now",
    permanent=True,
)


def _keep_dead(ctx: Context, item: model.Item, failure: Failure) -> None:
    change = functools.partial(model.not_redriven, now=ctx.clock(), failure=failure, generation=item.generation)
    ctx.update_item(item.batch_id, item.item_id, change)


def _redrive(
    item: model.Item, *, now: float, files: tuple[FileRef, ...], generation: int, fp: str
) -> model.Item | None:
    return model.redrive(item, now, files, generation, fingerprint=fp)
