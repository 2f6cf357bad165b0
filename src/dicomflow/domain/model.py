"""Batches, items, their states and the only allowed transitions between them.

Every transition is a pure function from the current item to the next one (or `None` when the event is
a no-op, e.g. a duplicate delivery). Stores apply a transition atomically to one item document, and
the batch counters are *derived* from item states (each item is its own counter shard), so a counter
can only move together with a state transition, exactly once (DESIGN.md invariant 2).

Fencing (DESIGN.md invariant 8): every transition is conditional on who makes it. A worker's transitions
name the generation of its task and the lease it holds; the dead-letter handler names the generation it
was handed; the reconciler names the revision of the snapshot it acted on (`rev`, which the store bumps
on every write). A stale attempt, an older generation's message or a reconciler reading an old query
result therefore changes nothing. The one deliberate exception: a *success* of the current generation is
accepted from any attempt, even one whose lease was taken over, because its outputs are already in the
destination and a conversion of the same files is the same result; refusing it would leave published
outputs that no record accounts for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from dicomflow.domain.facts import SeriesFacts
from dicomflow.domain.failures import Failure
from dicomflow.domain.layout import Layout
from dicomflow.domain.locations import Location
from dicomflow.domain.series import ConversionOptions, FileRef, SeriesGroup


class BatchStatus(StrEnum):
    EXPANDING = "expanding"
    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
    CANCELLED = "cancelled"
    FAILED = "failed"  # expansion itself failed (source vanished, access revoked); `failure` says why


BATCH_FINAL = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.COMPLETED_WITH_FAILURES, BatchStatus.CANCELLED, BatchStatus.FAILED}
)


class ItemState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    DEAD_LETTERED = "dead_lettered"


TERMINAL = frozenset({ItemState.SUCCEEDED, ItemState.SKIPPED, ItemState.DEAD_LETTERED})
ACTIVE = frozenset({ItemState.PENDING, ItemState.RUNNING, ItemState.RETRYING})


@dataclass(frozen=True, slots=True)
class Counters:
    series_total: int = 0
    pending: int = 0
    running: int = 0
    retrying: int = 0
    succeeded: int = 0
    skipped: int = 0
    dead_lettered: int = 0

    @classmethod
    def from_states(cls, counts: Mapping[ItemState, int]) -> Counters:
        return cls(
            series_total=sum(counts.values()),
            pending=counts.get(ItemState.PENDING, 0),
            running=counts.get(ItemState.RUNNING, 0),
            retrying=counts.get(ItemState.RETRYING, 0),
            succeeded=counts.get(ItemState.SUCCEEDED, 0),
            skipped=counts.get(ItemState.SKIPPED, 0),
            dead_lettered=counts.get(ItemState.DEAD_LETTERED, 0),
        )

    @property
    def finished(self) -> int:
        return self.succeeded + self.skipped + self.dead_lettered

    def to_dict(self) -> dict[str, int]:
        return {
            "series_total": self.series_total,
            "pending": self.pending,
            "running": self.running,
            "retrying": self.retrying,
            "succeeded": self.succeeded,
            "skipped": self.skipped,
            "dead_lettered": self.dead_lettered,
        }


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One file written to the destination: its name relative to the destination root, its size and
    SHA-256, and the sink's reference to it (local path or Drive file id)."""

    name: str
    size: int
    sha256: str
    ref: str = ""
    # The name the converter gave the file, when it was moved to another one (a BIDS name): "" while the
    # file still has it (its base name is the last part of `name`).
    origin: str = ""

    @property
    def original(self) -> str:
        return self.origin or self.name.rsplit("/", 1)[-1]

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"name": self.name, "size": self.size, "sha256": self.sha256, "ref": self.ref}
        if self.origin:
            data["origin"] = self.origin
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> OutputFile:
        return cls(
            name=str(data["name"]),
            size=int(str(data["size"])),
            sha256=str(data["sha256"]),
            ref=str(data.get("ref", "")),
            origin=str(data.get("origin") or ""),
        )


@dataclass(frozen=True, slots=True)
class Timings:
    download_seconds: float = 0.0
    convert_seconds: float = 0.0
    upload_seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "download_seconds": round(self.download_seconds, 3),
            "convert_seconds": round(self.convert_seconds, 3),
            "upload_seconds": round(self.upload_seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Timings:
        return cls(
            download_seconds=float(str(data.get("download_seconds", 0.0))),
            convert_seconds=float(str(data.get("convert_seconds", 0.0))),
            upload_seconds=float(str(data.get("upload_seconds", 0.0))),
        )


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: str
    sources: tuple[Location, ...]
    destination: Location
    options: ConversionOptions
    label: str
    status: BatchStatus
    created_at: float
    updated_at: float
    force: bool = False
    finished_at: float | None = None
    expanded_at: float | None = None
    files_seen: int = 0
    files_ignored: int = 0
    ignored_examples: tuple[str, ...] = ()
    failure: Failure | None = None
    counters: Counters = field(default_factory=Counters)
    # Expansion runs in epochs: the reconciler restarts a stalled expansion in a new epoch, whose task ids
    # are new (old ones may stay blocked for a day) and whose chunks replace the old epoch's; steps of an
    # older epoch find the epoch moved on and do nothing.
    epoch: int = 0
    listing: str = ""  # the list step of this epoch whose chunks count ("": not listed yet)
    listed_chunks: int = 0
    restarts: int = 0
    redrives: int = 0  # :retry-dead-letters requests so far (names each redrive task)
    expires_at: float | None = None  # retention: Firestore's TTL deletes the batch after this time
    # Who submitted it: the e-mail of the verified caller (or of the watch's owner for a batch started by a
    # Drive notification). Only the owner and administrators see or act on it ("" = no owner recorded:
    # batches from before ownership, local runs, operator tools; administrators only in the cloud).
    owner: str = ""
    layout: Layout = field(default_factory=Layout)
    # The finish step (services/finish.py: BIDS placement, top-level files, report.html) runs once per
    # completion: every time the batch becomes final, or its final counts change (a redrive, a late
    # success). `completions` counts them, `finished` is the last one whose finish step is done,
    # `finish_key` what the last completion was for, `finish_seq` names the reconciler's re-enqueues.
    completions: int = 0
    finished: int = 0
    finish_key: str = ""
    finish_seq: int = 0
    report_ref: str = ""  # where the last report.html is (local path or Drive file id); "" before the first

    @property
    def is_final(self) -> bool:
        return self.status in BATCH_FINAL

    @property
    def finish_pending(self) -> bool:
        """Final, and the finish step of its last completion has not run yet (report, BIDS placement)."""
        return self.is_final and self.finished < self.completions


CANCELLED = "the batch was cancelled before this series was converted"


@dataclass(frozen=True, slots=True)
class Item:
    """One series of a batch. Its SeriesInstanceUID is not kept (PS3.15 treats UIDs as identifiers):
    `item_id` is a hash of it and the SOPClassUID (SeriesKey.item_id)."""

    batch_id: str
    item_id: str
    sop_class_uid: str
    fingerprint: str
    dest_key: str
    rel_dir: str
    output_stem: str
    series_number: int | None
    modality: str
    description: str
    files: tuple[FileRef, ...]
    state: ItemState
    created_at: float
    updated_at: float
    bytes_total: int = 0
    file_count: int = 0
    attempts: int = 0
    generation: int = 0
    task_seq: int = 0  # the convert task of this generation the item waits for (the reconciler moves it on)
    lease_owner: str = ""
    lease_until: float | None = None
    handed_off: bool = False  # an attempt handed the series to the dead-letter queue (failure says why)
    rev: int = 0  # bumped by the store on every write: the reconciler's fence against stale snapshots
    started_at: float | None = None
    finished_at: float | None = None
    timings: Timings = field(default_factory=Timings)
    outputs: tuple[OutputFile, ...] = ()
    warnings: tuple[str, ...] = ()
    failure: Failure | None = None
    skip_reason: str = ""
    incomplete: bool = False  # converted, but dcm2niix reported missing slices or volumes: check the outputs
    expires_at: float | None = None
    # Written before an attempt publishes: the outputs it is about to put in the destination. A success
    # moves them to `outputs`; a series that ends without success keeps them here until they are retracted
    # (the publish may have landed while the record of it was lost).
    publishing: tuple[OutputFile, ...] = ()
    layout: str = "mirror"  # the batch's layout kind when the series was found (bids: staged, then placed)
    subject: str = ""  # --layout bids: the labels found at discovery ("" = no subject label)
    session: str = ""
    facts: SeriesFacts = field(default_factory=SeriesFacts)
    # Written by the finish step before it moves a succeeded series' outputs to their BIDS names: where
    # each will be. Once every file is there, `outputs` becomes this (DESIGN.md invariant 3 under crashes).
    placing: tuple[OutputFile, ...] = ()

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def needs_retraction(self) -> bool:
        """Final without a success, but an attempt may have published outputs that nothing records."""
        return self.state in (ItemState.DEAD_LETTERED, ItemState.SKIPPED) and bool(self.publishing)

    @property
    def task_id(self) -> str:
        """Cloud Tasks id of this item's current convert task: hashed (no dots), new per redrive generation
        and per reconciler re-enqueue, because a task id cannot be reused for up to 24 h after it ran or
        was dropped (GCP_FACTS gotcha 10)."""
        return convert_task_id(self.batch_id, self.item_id, self.generation, self.task_seq)


def convert_task_id(batch_id: str, item_id: str, generation: int, seq: int) -> str:
    return f"convert-{batch_id}-{item_id}-g{generation}-t{seq}"


def positioned(files: Sequence[FileRef]) -> tuple[FileRef, ...]:
    """Files as an item keeps them: by reference (a local path, a Drive id) and position in the series,
    never by their source path (folder names may name the patient, docs/privacy.md)."""
    return tuple(replace(f, path=str(n)) for n, f in enumerate(files, 1))


def new_item(
    batch: Batch,
    group: SeriesGroup,
    fingerprint: str,
    now: float,
    *,
    skip_reason: str = "",
    labels: tuple[str, str] = ("", ""),
) -> Item:
    state = ItemState.SKIPPED if skip_reason else ItemState.PENDING
    return Item(
        batch_id=batch.batch_id,
        item_id=group.key.item_id,
        sop_class_uid=group.key.sop_class_uid,
        fingerprint=fingerprint,
        dest_key=batch.destination.key,
        rel_dir=group.rel_dir,
        output_stem=group.output_stem,
        series_number=group.series_number,
        modality=group.modality,
        description=group.description,
        # Files are kept by reference (a local path, a Drive id) and position in the series, never by their
        # source name: a Siemens export puts the patient's name into every file name (docs/privacy.md).
        files=positioned(group.files),
        state=state,
        created_at=now,
        updated_at=now,
        bytes_total=group.bytes_total,
        file_count=len(group.files),
        finished_at=now if skip_reason else None,
        skip_reason=skip_reason,
        layout=batch.layout.kind,
        subject=labels[0],
        session=labels[1],
    )


# --- item transitions ------------------------------------------------------------------------------
# Each returns the next item, or None when the event must change nothing (duplicate, late or stale).


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    ALREADY_DONE = "already_done"  # terminal, handed off, or a task of an older generation: nothing to do
    BUSY = "busy"  # another attempt holds a live lease: try again later, it may still fail
    NOT_YET = "not_yet"  # a task of a newer generation than the item: its redrive has not been recorded yet

    @property
    def retry_later(self) -> bool:
        """Whether the delivery should be answered with "retry" (the task must stay alive)."""
        return self in (ClaimOutcome.BUSY, ClaimOutcome.NOT_YET)


def claim_decision(item: Item, now: float, generation: int | None = None) -> ClaimOutcome:
    if generation is not None and generation > item.generation:
        return ClaimOutcome.NOT_YET
    if item.is_terminal or item.handed_off or (generation is not None and generation < item.generation):
        return ClaimOutcome.ALREADY_DONE
    if item.state is ItemState.RUNNING and item.lease_until is not None and item.lease_until > now:
        return ClaimOutcome.BUSY
    return ClaimOutcome.CLAIMED


def claim(item: Item, now: float, lease_seconds: float, owner: str, generation: int | None = None) -> Item | None:
    """pending | retrying | running-with-expired-lease → running, one more attempt, for the task's generation."""
    if claim_decision(item, now, generation) is not ClaimOutcome.CLAIMED:
        return None
    return replace(
        item,
        state=ItemState.RUNNING,
        attempts=item.attempts + 1,
        failure=None,
        lease_owner=owner,
        lease_until=now + lease_seconds,
        started_at=item.started_at or now,
        updated_at=now,
    )


def holds_lease(item: Item, owner: str, generation: int) -> bool:
    return (
        item.state is ItemState.RUNNING
        and not item.handed_off
        and item.lease_owner == owner
        and item.generation == generation
    )


def renew(
    item: Item,
    now: float,
    lease_seconds: float,
    owner: str,
    generation: int,
    *,
    publishing: tuple[OutputFile, ...] | None = None,
) -> Item | None:
    """Heartbeat: the lease holder extends its lease. None means the attempt was fenced out (its lease
    expired and someone else took the series, or it finished): the attempt must stop. With `publishing`,
    the holder also records the outputs it is about to publish (the last renewal before it does)."""
    if not holds_lease(item, owner, generation):
        return None
    intent = item.publishing if publishing is None else publishing
    return replace(item, lease_until=now + lease_seconds, publishing=intent, updated_at=now)


def _accepts_result(item: Item, generation: int) -> bool:
    """A conversion result of this generation is recorded from any of its attempts (even one whose lease
    was taken over) while the series has no final state: its outputs exist. Once final, the series is
    closed: a result arriving later would be a record of outputs the finalizer may already retract."""
    return item.generation == generation and not item.is_terminal


def succeed(
    item: Item,
    now: float,
    outputs: tuple[OutputFile, ...],
    timings: Timings,
    warnings: tuple[str, ...],
    *,
    generation: int | None = None,
    incomplete: bool = False,
    facts: SeriesFacts | None = None,
) -> Item | None:
    if not _accepts_result(item, item.generation if generation is None else generation):
        return None
    return replace(
        item,
        state=ItemState.SUCCEEDED,
        outputs=outputs,
        facts=facts or SeriesFacts(),
        incomplete=incomplete,
        publishing=(),
        timings=timings,
        warnings=warnings,
        failure=None,
        handed_off=False,
        lease_owner="",
        lease_until=None,
        finished_at=now,
        updated_at=now,
    )


def skip(
    item: Item, now: float, reason: str, warnings: tuple[str, ...] = (), generation: int | None = None
) -> Item | None:
    """Nothing to convert (a report, a secondary capture): a fact about the data, like a success."""
    if not _accepts_result(item, item.generation if generation is None else generation):
        return None
    return replace(
        item,
        state=ItemState.SKIPPED,
        skip_reason=reason,
        warnings=warnings or item.warnings,
        failure=None,
        handed_off=False,
        lease_owner="",
        lease_until=None,
        finished_at=now,
        updated_at=now,
    )


def retry_later(item: Item, now: float, failure: Failure, owner: str, generation: int | None = None) -> Item | None:
    """running → retrying after a transient failure. Only the lease holder may do it: a stale worker
    whose lease was taken over must not undo the newer attempt's state."""
    if not holds_lease(item, owner, item.generation if generation is None else generation):
        return None
    return replace(item, state=ItemState.RETRYING, failure=failure, lease_owner="", lease_until=None, updated_at=now)


def hand_off(
    item: Item, now: float, failure: Failure, owner: str, generation: int, *, grace_seconds: float
) -> Item | None:
    """The lease holder gives up on the series (a permanent failure, or its last attempt): the failure is
    recorded and the series waits for the dead-letter handler, which makes the final transition (and the
    count) exactly once. No attempt may claim it again; if the hand-off task is lost, the reconciler
    dead-letters the series with this failure once `grace_seconds` have passed."""
    if not holds_lease(item, owner, generation):
        return None
    return replace(
        item, failure=failure, handed_off=True, lease_owner="", lease_until=now + grace_seconds, updated_at=now
    )


def dead_letter(item: Item, now: float, failure: Failure, generation: int | None = None) -> Item | None:
    """The dead-letter handler's transition: only for a series handed off in this generation, so a late
    message of an older generation never ends a redriven one (the failure recorded at hand-off wins)."""
    if item.is_terminal or item.state is not ItemState.RUNNING or not item.handed_off:
        return None
    if generation is not None and generation != item.generation:
        return None
    return _dead(item, now, item.failure or failure)


def _dead(item: Item, now: float, failure: Failure) -> Item:
    return replace(
        item,
        state=ItemState.DEAD_LETTERED,
        failure=failure,
        handed_off=False,
        lease_owner="",
        lease_until=None,
        finished_at=now,
        updated_at=now,
    )


def redrive(
    item: Item,
    now: float,
    files: tuple[FileRef, ...] | None = None,
    generation: int | None = None,
    fingerprint: str | None = None,
) -> Item | None:
    """dead_lettered → pending with a fresh attempt budget, a new task generation and, when given, the
    series' files as they are now (the user may have re-exported, added or removed some) and the
    fingerprint of those files."""
    if item.state is not ItemState.DEAD_LETTERED:
        return None
    if generation is not None and generation != item.generation:
        return None
    files = item.files if files is None else files
    return replace(
        item,
        state=ItemState.PENDING,
        fingerprint=item.fingerprint if fingerprint is None else fingerprint,
        files=files,
        file_count=len(files),
        bytes_total=sum(f.size for f in files),
        attempts=0,
        generation=item.generation + 1,
        task_seq=0,
        outputs=(),
        finished_at=None,
        updated_at=now,
    )


SUPERSEDED = "superseded:"


def supersede(item: Item, now: float, by_batch: str, finished_before: float) -> Item | None:
    """A success of this series finished earlier than another batch's success into the same destination,
    whose outputs replaced this one's (issue 13: outputs are replaced as a set). It keeps its state and
    counts, but records no outputs (they were removed) and its fingerprint is marked so it no longer makes
    the destination "already converted" with its options: converting with them again redoes the series."""
    if item.state is not ItemState.SUCCEEDED or item.batch_id == by_batch or not item.outputs:
        return None
    if item.finished_at is None or item.finished_at >= finished_before:
        return None
    note = f"its outputs were replaced by the conversion of batch {by_batch}"
    return replace(
        item,
        outputs=(),
        fingerprint=item.fingerprint if item.fingerprint.startswith(SUPERSEDED) else SUPERSEDED + item.fingerprint,
        warnings=(*item.warnings, note),
        updated_at=now,
    )


def not_redriven(item: Item, now: float, failure: Failure, generation: int) -> Item | None:
    """A redrive found nothing it could convert again (the series' files are gone from the source, or the
    source cannot be read): the series stays dead-lettered, with the reason it was not retried."""
    if item.state is not ItemState.DEAD_LETTERED or item.generation != generation:
        return None
    return replace(item, failure=failure, finished_at=now, updated_at=now)


def cancel_item(item: Item, now: float, reason: str = CANCELLED) -> Item | None:
    """pending | retrying → skipped when the batch is cancelled; a running attempt is left to finish."""
    if item.state not in (ItemState.PENDING, ItemState.RETRYING):
        return None
    return replace(
        item,
        state=ItemState.SKIPPED,
        skip_reason=reason,
        lease_owner="",
        lease_until=None,
        finished_at=now,
        updated_at=now,
    )


# --- the reconciler's transitions: fenced on the snapshot it read (`seen.rev`) -----------------------


def _unchanged(item: Item, seen: Item) -> bool:
    return item.rev == seen.rev and item.state is seen.state


def _lease_expired(item: Item, before: float) -> bool:
    return item.lease_until is not None and item.lease_until < before


def release_orphan(
    item: Item, now: float, failure: Failure, seen: Item, *, expired_before: float | None = None
) -> Item | None:
    """running, lease expired (before `expired_before`, default now), not handed off → retrying with a
    new task (the lease holder is gone)."""
    if not _unchanged(item, seen) or item.state is not ItemState.RUNNING or item.handed_off:
        return None
    if not _lease_expired(item, now if expired_before is None else expired_before):
        return None
    return replace(
        item,
        state=ItemState.RETRYING,
        failure=failure,
        lease_owner="",
        lease_until=None,
        task_seq=item.task_seq + 1,
        updated_at=now,
    )


def requeue(item: Item, now: float, seen: Item) -> Item | None:
    """pending | retrying whose task is lost (dropped by the queue after its last attempt, or never
    created) → the same state, waiting for a new task."""
    if not _unchanged(item, seen) or item.state not in (ItemState.PENDING, ItemState.RETRYING):
        return None
    return replace(item, task_seq=item.task_seq + 1, updated_at=now)


def still_queued(item: Item, now: float, seen: Item) -> Item | None:
    """The queue still holds the item's task (a long backlog): wait another full period."""
    if not _unchanged(item, seen) or item.state not in (ItemState.PENDING, ItemState.RETRYING):
        return None
    return replace(item, updated_at=now)


def abandon(
    item: Item, now: float, failure: Failure, seen: Item, *, expired_before: float | None = None
) -> Item | None:
    """The reconciler dead-letters a series nobody will finish: a hand-off whose dead-letter task was
    lost (its recorded failure wins), or a last attempt that died (lease expired, attempts used up)."""
    if not _unchanged(item, seen) or item.state is not ItemState.RUNNING:
        return None
    if not _lease_expired(item, now if expired_before is None else expired_before):
        return None
    return _dead(item, now, item.failure if item.handed_off and item.failure else failure)


def retracted(item: Item, now: float) -> Item | None:
    """The outputs an unsuccessful series may have left were removed from the destination."""
    if not item.needs_retraction:
        return None
    return replace(item, publishing=(), updated_at=now)


def give_up(item: Item, now: float, failure: Failure, seen: Item) -> Item | None:
    """pending | retrying with no attempts left and no task: dead-lettered with its last failure."""
    if not _unchanged(item, seen) or item.state not in (ItemState.PENDING, ItemState.RETRYING):
        return None
    return _dead(item, now, item.failure or failure)


def cancel_stale(item: Item, now: float, seen: Item) -> Item | None:
    if not _unchanged(item, seen):
        return None
    return cancel_item(item, now)


# --- batch transitions -------------------------------------------------------------------------------


def finish_expansion(
    batch: Batch, now: float, files_seen: int, ignored: int, examples: tuple[str, ...], *, epoch: int | None = None
) -> Batch | None:
    if batch.status is not BatchStatus.EXPANDING or (epoch is not None and epoch != batch.epoch):
        return None
    return replace(
        batch,
        status=BatchStatus.RUNNING,
        expanded_at=now,
        files_seen=files_seen,
        files_ignored=ignored,
        ignored_examples=examples,
        updated_at=now,
    )


def settle(batch: Batch, counters: Counters, now: float, retention_seconds: float = 0.0) -> Batch | None:
    """The status the counters call for: running → completed(_with_failures) once every item is terminal;
    completed(_with_failures) → the other one, or back to running, when a late success or a redrive
    changed the counts. Expanding, cancelled and failed batches are left alone."""
    if batch.status not in (BatchStatus.RUNNING, BatchStatus.COMPLETED, BatchStatus.COMPLETED_WITH_FAILURES):
        return None
    if counters.finished != counters.series_total:
        if batch.status is BatchStatus.RUNNING:
            return None
        return replace(batch, status=BatchStatus.RUNNING, finished_at=None, expires_at=None, updated_at=now)
    status = BatchStatus.COMPLETED_WITH_FAILURES if counters.dead_lettered else BatchStatus.COMPLETED
    if status is batch.status and batch.counters == counters:
        return None
    finished = batch.finished_at if status is batch.status and batch.finished_at else now
    settled = replace(
        batch,
        status=status,
        finished_at=finished,
        expires_at=finished + retention_seconds if retention_seconds else None,
        updated_at=now,
        counters=counters,
    )
    # The finish step is owed in the same write that makes the batch final: no crash can fall between.
    return request_finish(settled, counters, now) or settled


def complete_if_done(batch: Batch, counters: Counters, now: float) -> Batch | None:
    """running → completed(_with_failures) once every item is terminal."""
    if batch.status is not BatchStatus.RUNNING:
        return None
    return settle(batch, counters, now)


def cancel(batch: Batch, now: float) -> Batch | None:
    """Final at once; its finish step is owed in the same write (it waits for series still running)."""
    if batch.is_final:
        return None
    return _owe_finish(replace(batch, status=BatchStatus.CANCELLED, finished_at=now, updated_at=now))


def fail_batch(batch: Batch, now: float, failure: Failure) -> Batch | None:
    if batch.status is not BatchStatus.EXPANDING:
        return None
    return _owe_finish(replace(batch, status=BatchStatus.FAILED, failure=failure, finished_at=now, updated_at=now))


def _owe_finish(batch: Batch) -> Batch:
    return replace(batch, completions=batch.completions + 1, finish_key=f"{batch.status.value}:open", finish_seq=0)


def list_done(batch: Batch, now: float, epoch: int, listing: str, chunks: int) -> Batch | None:
    """The first list step of `epoch` to finish makes its chunks the batch's: a repeated or concurrent
    list delivery uses those (a re-listing of a folder still changing could cut the files differently,
    and mixing two cuts could drop a file between them)."""
    if batch.status is not BatchStatus.EXPANDING or batch.epoch != epoch or batch.listing:
        return None
    return replace(batch, listing=listing, listed_chunks=chunks, updated_at=now)


def expansion_progress(batch: Batch, now: float, epoch: int) -> Batch | None:
    """A step of the current epoch made progress: the reconciler measures a stall from here."""
    if batch.status is not BatchStatus.EXPANDING or batch.epoch != epoch:
        return None
    return replace(batch, updated_at=now)


def restart_expansion(batch: Batch, now: float, seen_updated_at: float) -> Batch | None:
    """A stalled expansion (its tasks were dropped) starts over in a new epoch."""
    if batch.status is not BatchStatus.EXPANDING or batch.updated_at != seen_updated_at:
        return None
    return replace(
        batch, epoch=batch.epoch + 1, listing="", listed_chunks=0, restarts=batch.restarts + 1, updated_at=now
    )


def request_redrive(batch: Batch, now: float) -> Batch | None:
    if batch.status not in (BatchStatus.RUNNING, BatchStatus.COMPLETED, BatchStatus.COMPLETED_WITH_FAILURES):
        return None
    return replace(batch, redrives=batch.redrives + 1, updated_at=now)


# --- the finish step of a batch (services/finish.py) --------------------------------------------------


def finish_key(status: BatchStatus, counters: Counters) -> str:
    return f"{status.value}:" + ",".join(f"{k}={v}" for k, v in sorted(counters.to_dict().items()))


def request_finish(batch: Batch, counters: Counters, now: float) -> Batch | None:
    """A final batch whose every series is final gets a (new) completion when what it ended with is new:
    its finish step must run for it. A repeated request for the same outcome changes nothing."""
    if not batch.is_final or counters.finished != counters.series_total:
        return None
    key = finish_key(batch.status, counters)
    if key == batch.finish_key:
        return None
    return replace(batch, completions=batch.completions + 1, finish_key=key, finish_seq=0, updated_at=now)


def finish_done(batch: Batch, completion: int, report_ref: str, now: float) -> Batch | None:
    """The finish step of `completion` is done (a later completion, if any, is still pending)."""
    if completion <= batch.finished or completion > batch.completions:
        return None
    return replace(batch, finished=completion, report_ref=report_ref or batch.report_ref, updated_at=now)


def retry_finish(batch: Batch, now: float, seen: Batch) -> Batch | None:
    """The reconciler gives a pending finish step a new task (its task may have been dropped)."""
    if not batch.finish_pending or batch.finish_seq != seen.finish_seq or batch.completions != seen.completions:
        return None
    return replace(batch, finish_seq=batch.finish_seq + 1, updated_at=now)
