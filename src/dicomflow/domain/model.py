"""Batches, items, their states and the only allowed transitions between them.

Every transition is a pure function from the current item to the next one (or `None` when the event is
a no-op, e.g. a duplicate delivery). Stores apply a transition atomically to one item document, and
the batch counters are *derived* from item states (each item is its own counter shard), so a counter
can only move together with a state transition, exactly once (DESIGN.md invariant 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from dicomflow.domain.failures import Failure
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

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "ref": self.ref}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> OutputFile:
        return cls(
            name=str(data["name"]),
            size=int(str(data["size"])),
            sha256=str(data["sha256"]),
            ref=str(data.get("ref", "")),
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

    @property
    def is_final(self) -> bool:
        return self.status in BATCH_FINAL


@dataclass(frozen=True, slots=True)
class Item:
    batch_id: str
    item_id: str
    series_uid: str
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
    lease_owner: str = ""
    lease_until: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    timings: Timings = field(default_factory=Timings)
    outputs: tuple[OutputFile, ...] = ()
    warnings: tuple[str, ...] = ()
    failure: Failure | None = None
    skip_reason: str = ""

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def task_id(self) -> str:
        """Cloud Tasks id of this item's convert task: hashed (no dots), and new per redrive generation
        because a task id cannot be reused for up to 24 h after it ran (GCP_FACTS gotcha 10)."""
        return f"convert-{self.batch_id}-{self.item_id}-g{self.generation}"


def new_item(batch: Batch, group: SeriesGroup, fingerprint: str, now: float, *, skip_reason: str = "") -> Item:
    state = ItemState.SKIPPED if skip_reason else ItemState.PENDING
    return Item(
        batch_id=batch.batch_id,
        item_id=group.key.item_id,
        series_uid=group.key.series_uid,
        sop_class_uid=group.key.sop_class_uid,
        fingerprint=fingerprint,
        dest_key=batch.destination.key,
        rel_dir=group.rel_dir,
        output_stem=group.output_stem,
        series_number=group.series_number,
        modality=group.modality,
        description=group.description,
        files=group.files,
        state=state,
        created_at=now,
        updated_at=now,
        bytes_total=group.bytes_total,
        file_count=len(group.files),
        finished_at=now if skip_reason else None,
        skip_reason=skip_reason,
    )


# --- item transitions ------------------------------------------------------------------------------
# Each returns the next item, or None when the event must change nothing (duplicate or late delivery).


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    ALREADY_DONE = "already_done"  # terminal: a duplicate or late delivery
    BUSY = "busy"  # another worker holds a live lease: a re-dispatch while the first attempt runs


def claim_decision(item: Item, now: float) -> ClaimOutcome:
    if item.is_terminal:
        return ClaimOutcome.ALREADY_DONE
    if item.state is ItemState.RUNNING and item.lease_until is not None and item.lease_until > now:
        return ClaimOutcome.BUSY
    return ClaimOutcome.CLAIMED


def claim(item: Item, now: float, lease_seconds: float, owner: str) -> Item | None:
    """pending | retrying | running-with-expired-lease → running, one more attempt."""
    if claim_decision(item, now) is not ClaimOutcome.CLAIMED:
        return None
    return replace(
        item,
        state=ItemState.RUNNING,
        attempts=item.attempts + 1,
        failure=None,  # from now on a failure on a running item means "noted for the dead-letter queue"
        lease_owner=owner,
        lease_until=now + lease_seconds,
        started_at=item.started_at or now,
        updated_at=now,
    )


def succeed(
    item: Item, now: float, outputs: tuple[OutputFile, ...], timings: Timings, warnings: tuple[str, ...]
) -> Item | None:
    if item.is_terminal:
        return None
    return replace(
        item,
        state=ItemState.SUCCEEDED,
        outputs=outputs,
        timings=timings,
        warnings=warnings,
        failure=None,
        lease_owner="",
        lease_until=None,
        finished_at=now,
        updated_at=now,
    )


def skip(item: Item, now: float, reason: str, warnings: tuple[str, ...] = ()) -> Item | None:
    if item.is_terminal:
        return None
    return replace(
        item,
        state=ItemState.SKIPPED,
        skip_reason=reason,
        warnings=warnings or item.warnings,
        lease_owner="",
        lease_until=None,
        finished_at=now,
        updated_at=now,
    )


def retry_later(item: Item, now: float, failure: Failure, owner: str) -> Item | None:
    """running → retrying after a transient failure. Only the lease holder may do it: a stale worker
    whose lease was taken over must not undo the newer attempt's state."""
    if item.state is not ItemState.RUNNING or item.lease_owner != owner:
        return None
    return replace(item, state=ItemState.RETRYING, failure=failure, lease_owner="", lease_until=None, updated_at=now)


def note_failure(item: Item, now: float, failure: Failure) -> Item | None:
    """Record the failure that is being handed to the dead-letter queue, without changing state:
    the dead-letter handler makes the transition (and the count) exactly once."""
    if item.is_terminal:
        return None
    return replace(item, failure=failure, updated_at=now)


def dead_letter(item: Item, now: float, failure: Failure) -> Item | None:
    if item.is_terminal:
        return None
    return replace(
        item,
        state=ItemState.DEAD_LETTERED,
        failure=failure,
        lease_owner="",
        lease_until=None,
        finished_at=now,
        updated_at=now,
    )


def redrive(item: Item, now: float, files: tuple[FileRef, ...] | None = None) -> Item | None:
    """dead_lettered → pending with a fresh attempt budget, a new task generation and, when given, the
    series' files as they are now (the user may have re-exported some)."""
    if item.state is not ItemState.DEAD_LETTERED:
        return None
    files = item.files if files is None else files
    return replace(
        item,
        state=ItemState.PENDING,
        files=files,
        file_count=len(files),
        bytes_total=sum(f.size for f in files),
        attempts=0,
        generation=item.generation + 1,
        finished_at=None,
        updated_at=now,
    )


def release_orphan(item: Item, now: float, failure: Failure) -> Item | None:
    """running (lease holder gone) → retrying; used by the reconciler before it re-enqueues."""
    if item.state is not ItemState.RUNNING:
        return None
    return replace(item, state=ItemState.RETRYING, failure=failure, lease_owner="", lease_until=None, updated_at=now)


# --- batch transitions -------------------------------------------------------------------------------


def finish_expansion(
    batch: Batch, now: float, files_seen: int, ignored: int, examples: tuple[str, ...]
) -> Batch | None:
    if batch.status is not BatchStatus.EXPANDING:
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


def complete_if_done(batch: Batch, counters: Counters, now: float) -> Batch | None:
    """running → completed(_with_failures) once every item is terminal."""
    if batch.status is not BatchStatus.RUNNING or counters.finished != counters.series_total:
        return None
    status = BatchStatus.COMPLETED_WITH_FAILURES if counters.dead_lettered else BatchStatus.COMPLETED
    return replace(batch, status=status, finished_at=now, updated_at=now, counters=counters)


def reopen(batch: Batch, now: float) -> Batch | None:
    """completed_with_failures → running when dead letters are redriven."""
    if batch.status is not BatchStatus.COMPLETED_WITH_FAILURES:
        return None
    return replace(batch, status=BatchStatus.RUNNING, finished_at=None, updated_at=now)


def cancel(batch: Batch, now: float) -> Batch | None:
    if batch.is_final:
        return None
    return replace(batch, status=BatchStatus.CANCELLED, finished_at=now, updated_at=now)


def fail_batch(batch: Batch, now: float, failure: Failure) -> Batch | None:
    if batch.status is not BatchStatus.EXPANDING:
        return None
    return replace(batch, status=BatchStatus.FAILED, failure=failure, finished_at=now, updated_at=now)


def touch(item: Item, now: float) -> Item:
    """Only the update time changes (the reconciler marks an item it re-enqueued)."""
    return replace(item, updated_at=now)


def touch_batch(batch: Batch, now: float) -> Batch:
    return replace(batch, updated_at=now)


def cancel_item(item: Item, now: float, reason: str) -> Item | None:
    """pending | retrying → skipped when the batch is cancelled; a running attempt is left to finish."""
    if item.state not in (ItemState.PENDING, ItemState.RETRYING):
        return None
    return skip(item, now, reason)
