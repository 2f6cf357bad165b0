"""Submitting a batch: validate, record it, and start its expansion — nothing slow happens here, so a
submission is answered quickly whatever the size of the source (expansion continues in tasks)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from dicomflow.domain.failures import InvalidInput
from dicomflow.domain.layout import Layout
from dicomflow.domain.locations import Location, LocationKind, check_apart
from dicomflow.domain.model import Batch, BatchStatus
from dicomflow.domain.series import ConversionOptions
from dicomflow.events import Event
from dicomflow.ports import IdempotencyRecord
from dicomflow.services.context import Context, event
from dicomflow.services.task_names import expand_task

MAX_LABEL = 200


@dataclass(frozen=True, slots=True)
class BatchRequest:
    sources: tuple[Location, ...]
    destination: Location
    options: ConversionOptions = ConversionOptions()
    label: str = ""
    force: bool = False
    layout: Layout = field(default_factory=Layout)

    def fingerprint(self) -> str:
        """Hash of the request, to tell a true retry from a different request reusing an idempotency key."""
        body: dict[str, object] = {
            "sources": [s.uri for s in self.sources],
            "destination": self.destination.uri,
            "options": self.options.to_dict(),
            "label": self.label,
            "force": self.force,
        }
        if self.layout.is_bids:  # mirror requests hash as they always did
            body["layout"] = self.layout.to_dict()
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SubmitResult:
    batch: Batch
    created: bool


def validate_request(ctx: Context, request: BatchRequest) -> None:
    if not request.sources:
        raise InvalidInput("give at least one source folder", field="source")
    if len(request.sources) > ctx.settings.max_batch_sources:
        raise InvalidInput(
            f"a batch may list at most {ctx.settings.max_batch_sources} source folders "
            f"(got {len(request.sources)}); split it into several batches",
            field="source",
        )
    if len({s.kind for s in request.sources}) > 1:
        raise InvalidInput("a batch cannot mix local and Drive sources; submit them separately", field="source")
    if len(set(request.sources)) != len(request.sources):
        raise InvalidInput("the same source folder is listed twice", field="source")
    if len(request.label) > MAX_LABEL:
        raise InvalidInput(f"label must be at most {MAX_LABEL} characters", field="label")
    if request.destination in request.sources:
        raise InvalidInput("the destination must differ from the source", field="destination")
    # Neither inside the other, links followed (the next run would read its own outputs as input).
    check_apart([_resolved(ctx, s) for s in request.sources], _resolved(ctx, request.destination))


def _resolved(ctx: Context, location: Location) -> Location:
    return replace(location, ref=ctx.resolve_path(location.ref)) if location.kind is LocationKind.LOCAL else location


def submit(
    ctx: Context,
    request: BatchRequest,
    idempotency_key: str | None = None,
    *,
    check_locations: bool = True,
    owner: str = "",
) -> SubmitResult:
    """Create a batch in `expanding` state and enqueue its expansion.

    The expansion task is created *before* the batch is recorded: if the enqueue fails, the caller gets
    an error and nothing exists (its retry starts afresh, never leaving a second, orphaned batch); if
    recording fails after the enqueue, the task finds no batch and is dropped after its retries. A task
    that arrives before the batch is recorded is answered "not found" and retried.

    With an `idempotency_key`, a repeated submission returns the batch created the first time (and
    enqueues its expansion again if it is still expanding: the task name makes that a no-op). Keys are
    scoped to the `owner`: another caller reusing a key gets their own batch, never this one.
    """
    validate_request(ctx, request)
    if check_locations:
        # Fail at once, with a message naming the folder and the fix, rather than in a task later.
        for source in request.sources:
            ctx.source_for(source).check(source)
        ctx.sink_for(request.destination).check(request.destination)

    now = ctx.clock()
    # Random, not time-ordered: sequential document ids create Firestore hot spots.
    batch = Batch(
        batch_id=ctx.new_id(10),
        sources=request.sources,
        destination=request.destination,
        options=request.options,
        label=request.label,
        status=BatchStatus.EXPANDING,
        created_at=now,
        updated_at=now,
        force=request.force,
        owner=owner,
        layout=request.layout,
    )
    record = None
    if idempotency_key:
        scoped = f"{owner}\n{idempotency_key}" if owner else idempotency_key  # unowned keys hash as before
        record = IdempotencyRecord(
            key_hash=hashlib.sha256(scoped.encode()).hexdigest(),
            request_hash=request.fingerprint(),
            batch_id=batch.batch_id,
            expires_at=now + ctx.settings.idempotency_ttl_hours * 3600,
        )
    ctx.queue.enqueue([expand_task(batch.batch_id, batch.epoch)])
    stored, created = ctx.store.create_batch(batch, record)
    if not created and stored.status is BatchStatus.EXPANDING:
        ctx.queue.enqueue([expand_task(stored.batch_id, stored.epoch)])
    if created:
        event(
            Event.BATCH_SUBMITTED,
            "batch submitted",
            batch_id=stored.batch_id,
            sources=len(request.sources),
            force=request.force,
        )
    return SubmitResult(stored, created)


def find_resumable(request: BatchRequest, candidates: Sequence[Batch]) -> Batch | None:
    """An unfinished batch with exactly this request (local mode resumes it after an interruption)."""
    for batch in candidates:
        if (
            not batch.is_final
            and batch.sources == request.sources
            and batch.destination == request.destination
            and batch.options == request.options
            and batch.force == request.force
            and batch.layout == request.layout
        ):
            return batch
    return None
