"""The interfaces between the core and the outside world.

Each port has a cloud adapter, a local adapter and (where useful) a hand-written test double, and one
contract suite in `tests/contracts/` runs against all of them so local mode cannot drift from production.
Services depend on these protocols only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from dicomflow.domain.dataset import Dataset
from dicomflow.domain.facts import OutputImage
from dicomflow.domain.locations import Location
from dicomflow.domain.model import Batch, BatchStatus, Counters, Item, ItemState, OutputFile
from dicomflow.domain.privacy import Identifiers
from dicomflow.domain.series import ConversionOptions, FileRef, Ignored, ScanResult

Progress = Callable[[int, int], None]
"""progress(done, total) in bytes or files; called from worker threads, must be cheap."""


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A listed file that cannot be a DICOM instance (e.g. a Google Doc); reported, never converted."""

    path: str
    ignored: Ignored


class Source(Protocol):
    """Where DICOM files are read from."""

    def check(self, location: Location) -> str:
        """The folder's display name. Raises SourceNotFound/AccessDenied (saying what to do) unless
        `location` is a readable folder."""

    def list_files(self, location: Location) -> Iterator[FileRef | SkippedFile]:
        """Every file under the folder, recursively, in no particular order."""

    def read_prefix(self, ref: FileRef, size: int) -> bytes:
        """The first `size` bytes of a file (fewer if the file is shorter)."""

    def refresh(self, refs: Sequence[FileRef]) -> list[FileRef]:
        """The same files with their current size and checksum (files that no longer exist are left
        out): a redriven series picks up files the user re-exported after a failure."""

    def fetch(self, refs: Sequence[FileRef], dest_dir: Path, progress: Progress | None = None) -> Path:
        """A local folder holding exactly these files (nothing else, no sub-folders needed), for dcm2niix:
        `dest_dir` filled with copies or links, or — for a local source folder that already holds only
        this series — that folder itself, which the caller must never modify. Verifies sizes and checksums
        when the source reports them."""


class Sink(Protocol):
    """Where NIfTI outputs are written."""

    def check(self, location: Location) -> str:
        """The folder's display name. Raises (saying what to do) unless `location` can receive outputs."""

    def subfolder(self, location: Location, name: str) -> Location:
        """The folder `name` inside `location`, created if needed (once, even when callers race)."""

    def publish(
        self,
        location: Location,
        rel_dir: str,
        files: Sequence[Path],
        owner_key: str,
        progress: Progress | None = None,
    ) -> tuple[OutputFile, ...]:
        """Write `files` under `location/rel_dir`, idempotently: publishing the same outputs again (a
        re-delivered task) leaves exactly one copy of each. `owner_key` identifies the series; a file
        of the same name that dicomflow did not write for that key is never replaced. `progress` may
        raise to stop between files."""

    def intended(self, rel_dir: str, files: Sequence[Path]) -> tuple[OutputFile, ...]:
        """What `publish` would record for these files (names as it names them, sizes, SHA-256), without
        writing anything: the intent an attempt records before it publishes."""

    def retract(self, location: Location, outputs: Sequence[OutputFile], owner_key: str) -> int:
        """Remove those of `outputs` that dicomflow wrote for `owner_key` and that still hold exactly the
        recorded bytes (never a file changed since, never a file of another series). Missing files are
        fine. Returns how many were removed."""

    def move(self, location: Location, output: OutputFile, name: str, owner_key: str) -> OutputFile:
        """Give the published file `output` (dicomflow wrote it for `owner_key`) the name `name` (a path
        relative to `location`; folders are created), without copying it. Idempotent: when the file is
        already there (a repeated or interrupted move) it is returned as it is. Raises SourceNotFound when
        it is in neither place, DestinationConflict when `name` holds a file dicomflow did not write for
        `owner_key`."""

    def read(self, location: Location, name: str, owner_key: str) -> bytes | None:
        """The content of the file `name` (relative to `location`), None if there is none: the one dicomflow
        wrote for `owner_key` when there are several of that name (Drive), else any."""


class HeaderScanner(Protocol):
    """Reads DICOM headers (not pixels) of many files, in parallel."""

    def scan(self, source: Source, refs: Sequence[FileRef]) -> list[ScanResult]:
        """One result per ref, in order."""


@dataclass(frozen=True, slots=True)
class ConverterRun:
    exit_code: int
    outputs: tuple[Path, ...]
    console: str
    seconds: float


class Converter(Protocol):
    """dcm2niix behind an interface (tests may swap in a converter that crashes on purpose)."""

    @property
    def version(self) -> str: ...

    def convert(
        self,
        input_dir: Path,
        output_dir: Path,
        stem: str,
        options: ConversionOptions,
        *,
        timeout_seconds: float | None = None,
    ) -> ConverterRun:
        """Convert every DICOM file in `input_dir` (one series) into `output_dir`, named from `stem`; stop
        after `timeout_seconds` (default: the converter's own limit) with ConverterTimeout."""


class Deidentifier(Protocol):
    """The de-identification profile (docs/privacy.md) applied to one series' dcm2niix outputs: the same
    code in local mode and in the cloud (DESIGN.md invariant 6)."""

    @property
    def version(self) -> str:
        """Enters every fingerprint: outputs made under an older profile are made again."""

    def identifiers(self, input_dir: Path) -> Identifiers:
        """The identifying values of the series in `input_dir` (read from its DICOM headers, never stored)."""

    def apply(self, outputs: Sequence[Path], identifiers: Identifiers, *, compress: bool) -> tuple[Path, ...]:
        """Scrub the outputs in place (sidecars through the allow-list, NIfTI header text) and compress the
        NIfTI when asked; returns the files to publish (names may change: .nii becomes .nii.gz)."""

    def acquisition_offset(self, input_dir: Path, outputs: Sequence[Path]) -> float | None:
        """When the series was acquired, as seconds from the start of its study (StudyTime): the earliest
        AcquisitionTime of dcm2niix's sidecars in `outputs` (read before `apply` removes it) minus the
        StudyTime of the files in `input_dir`. A duration, never a time of day (it orders the series of a
        BIDS session and spaces them in scans.tsv); None when either time is missing."""


class ImageInspector(Protocol):
    """What the QA report shows of a NIfTI output (nibabel): shape, voxel size, volumes, a thumbnail."""

    def describe(self, path: Path) -> OutputImage | None:
        """None when the file is not an image this can read."""


class QueueName(StrEnum):
    EXPAND = "expand"
    CONVERT = "convert"
    DEAD_LETTER = "dead-letter"
    CHANGES = "changes"


@dataclass(frozen=True, slots=True)
class Task:
    queue: QueueName
    task_id: str  # [A-Za-z0-9_-]{1,500}: Cloud Tasks forbids dots (GCP_FACTS gotcha 10)
    payload: Mapping[str, Any]
    delay_seconds: float = 0.0


class TaskQueue(Protocol):
    """Cloud Tasks' semantics (GCP_FACTS §4): a named task is created once — a name stays blocked while
    the task exists and for a while after it ran or was dropped; a task is delivered at least once (rarely
    twice, even concurrently); an attempt that does not answer 2xx within the dispatch deadline is retried
    with backoff while it may still be running; after the last attempt the task is dropped silently."""

    def enqueue(self, tasks: Sequence[Task]) -> None:
        """Create the tasks. A task whose name is taken (it exists, or ran recently) is not created
        again, and that is success, not an error."""

    def exists(self, queue: QueueName, task_id: str) -> bool | None:
        """Whether the task is still in the queue (waiting, running or scheduled for a retry): False once
        it succeeded or was dropped. None when the queue cannot tell (then the caller goes by time)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """What the queue tells a handler about the delivery (X-CloudTasks-* headers), and the time by which
    the handler must have answered: Cloud Tasks counts an attempt as failed at its dispatch deadline and
    dispatches the task again while this attempt may still be running (GCP_FACTS gotchas 11, 25)."""

    retry_count: int = 0
    task_id: str = ""
    queue: str = ""
    deadline_at: float | None = None  # answer before this time (clock of the Context); None: no deadline


class HeartbeatHandle(Protocol):
    @property
    def alive(self) -> bool:
        """False once a beat reported that the work lost its claim: the worker must stop."""

    def stop(self) -> None: ...


class Heartbeat(Protocol):
    """Runs `beat` every `every` seconds while long work goes on (a lease renewal). `beat` returns False
    when the claim is lost; a beat that raises is retried at the next tick (a passing store outage)."""

    def start(self, beat: Callable[[], bool], every: float) -> HeartbeatHandle: ...


@dataclass(frozen=True, slots=True)
class ExpansionChunk:
    """A slice of a large source's file list, scanned by one task (fan-out of expansion). Chunks belong
    to one listing (see Batch.listing): two deliveries of a list step may cut a changing folder
    differently, and only the listing the batch records is ever scanned."""

    batch_id: str
    chunk_no: int
    files: tuple[FileRef, ...]
    skipped: tuple[SkippedFile, ...] = ()
    results: tuple[ScanResult, ...] | None = None
    listing: str = ""


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    key_hash: str
    request_hash: str
    batch_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class DriveChange:
    """One entry of Drive's changes feed. `removed` also means "lost access" (GCP_FACTS gotcha 9)."""

    file_id: str
    removed: bool
    trashed: bool = False
    mime_type: str = ""
    parents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChangePage:
    changes: tuple[DriveChange, ...]
    next_page_token: str  # more pages now
    new_start_page_token: str  # only on the last page: where the next read starts


@dataclass(frozen=True, slots=True)
class FileInfo:
    file_id: str
    name: str
    mime_type: str
    parents: tuple[str, ...]
    trashed: bool = False


class ChangeFeed(Protocol):
    """Drive's changes feed and push channels (changes.watch / channels.stop)."""

    def start_page_token(self) -> str: ...

    def changes(self, page_token: str) -> ChangePage: ...

    def file_info(self, file_id: str) -> FileInfo: ...

    def watch(self, channel_id: str, address: str, token: str, page_token: str, expires_at: float) -> tuple[str, float]:
        """Open a channel asking for expiry at `expires_at` (Unix seconds); returns (resource id, the expiry
        Drive granted — it may be earlier)."""

    def stop(self, channel_id: str, resource_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class WatchChannel:
    """A Drive changes.watch channel and the folders it converts (see services/drive_changes.py)."""

    channel_id: str
    resource_id: str
    folder_id: str
    destination: str
    page_token: str
    expires_at: float
    created_at: float
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    active: bool = True
    owner: str = ""  # who opened the watch; the batches it starts are theirs ("" = an operator's watch)
    # SHA-256 of this channel's own token (Drive echoes the token in X-Goog-Channel-Token): the webhook
    # compares hashes in constant time, and the token itself is never stored. "" on channels opened
    # before per-channel tokens, which fall back to the shared DICOMFLOW_WEBHOOK_TOKEN until renewed.
    token_hash: str = ""
    # The highest X-Goog-Message-Number accepted: a replayed or older message is ignored (GCP_FACTS §2:
    # numbers increase but are not sequential).
    last_message: int = 0


@dataclass(frozen=True, slots=True)
class PendingFolder:
    """A watched folder that received files; submitted as one batch once quiet for the settle window."""

    folder_id: str
    watch_folder_id: str
    first_change_at: float
    last_change_at: float
    submitted_batch_id: str = ""


ItemChange = Callable[[Item], Item | None]
BatchChange = Callable[[Batch], Batch | None]


class StateStore(Protocol):
    """Batches, items (one record per series), expansion scratch, idempotency keys and watch channels.

    Every `update_*` applies a pure change function atomically to one record (read, compute, write in
    one transaction) and returns the record as stored plus whether it changed; `update_item` stores the
    item with `rev` one higher than the record it read. Counters are derived from item states, so a
    state transition and its counter move in the same write, and every read of counters (with or
    without its batch) comes from one snapshot: they always add up (DESIGN.md invariant 9).
    No single request exceeds the backend's limits, whatever the number and size of the records.
    """

    # batches
    def create_batch(self, batch: Batch, idempotency: IdempotencyRecord | None = None) -> tuple[Batch, bool]:
        """Store a new batch. With an idempotency record whose key is already known (and not expired),
        return the existing batch and False instead (Conflict if the request hash differs)."""

    def get_batch(self, batch_id: str, *, counted: bool = True) -> Batch:
        """The batch; NotFound if unknown. With `counted`, the batch and its counters are read in one
        snapshot; without (callers that only need the status and request: counting costs a query per
        state in Firestore), `counters` is the snapshot stored with the batch."""

    def list_batches(
        self,
        limit: int = 20,
        statuses: frozenset[BatchStatus] | None = None,
        *,
        counted: bool = True,
        owner: str | None = None,
    ) -> list[Batch]:
        """Most recent first; only those in `statuses` when given, only those of `owner` when given (""
        selects the batches without an owner). `counted` as for get_batch."""

    def update_batch(self, batch_id: str, change: BatchChange) -> tuple[Batch, bool]: ...

    def counters(self, batch_id: str) -> Counters: ...

    def count_active(self, batch_id: str) -> int:
        """Items still pending, running or retrying (one cheap query: is the batch done yet?)."""

    # items
    def add_items(self, items: Sequence[Item]) -> list[Item]:
        """Create items that do not exist yet (by batch_id, item_id); existing ones are left untouched.
        Returns the stored version of every item, in order: the new ones as given, the existing ones as
        they are now (a repeated expansion must act on what is stored, not on what it recomputed)."""

    def get_item(self, batch_id: str, item_id: str) -> Item:
        """NotFound if unknown."""

    def update_item(self, batch_id: str, item_id: str, change: ItemChange) -> tuple[Item, bool]: ...

    def list_items(
        self, batch_id: str, states: frozenset[ItemState] | None = None, after: str = "", limit: int = 100
    ) -> list[Item]:
        """Items ordered by item_id, starting after `after` (for paging)."""

    def find_stale(self, now: float, idle_before: float, limit: int = 500) -> list[Item]:
        """Items `running` whose lease expired before `now` (handed-off ones included), and items
        `pending` or `retrying` not updated since `idle_before` (their task may have been lost): at most
        `limit` of each kind, oldest first."""

    def succeeded_fingerprints(self, dest_key: str, fingerprints: Sequence[str]) -> set[str]:
        """Which of these fingerprints already converted successfully into this destination."""

    def succeeded_file_counts(self, dest_key: str, item_ids: Sequence[str]) -> dict[str, int]:
        """For these series, the largest file count any succeeded item of theirs had in this destination
        (series never converted there are absent)."""

    def recorded_outputs(self, dest_key: str, item_id: str, layout: str | None = None) -> set[tuple[str, str]]:
        """(name, sha256) of every output that a succeeded item of this series (any batch) records in this
        destination: files no retraction may remove. With `layout`, only items of that layout kind."""

    def find_unretracted(self, limit: int = 500) -> list[Item]:
        """Final items without a success whose publish intent was not retracted yet."""

    def list_destination_items(self, dest_key: str, after: str = "", limit: int = 200) -> list[Item]:
        """Succeeded `--layout bids` items of this destination, of any batch: the series a BIDS dataset is
        planned from. Ordered by (batch_id, item_id), starting after `after` ("batch_id/item_id")."""

    def find_unfinished(self, limit: int = 500) -> list[Batch]:
        """Final batches whose finish step has not run for their last completion (Batch.finish_pending)."""

    # datasets (one record per destination: services/finish.py)
    def get_dataset(self, dest_key: str) -> Dataset:
        """The destination's dataset record; an empty one if it has none yet."""

    def update_dataset(self, dest_key: str, change: Callable[[Dataset], Dataset | None]) -> tuple[Dataset, bool]:
        """Apply `change` atomically to the dataset record (created from an empty one if absent)."""

    # expansion scratch space
    def put_chunks(self, chunks: Sequence[ExpansionChunk]) -> None:
        """Store chunks (replacing a chunk of the same batch, listing and number)."""

    def get_chunk(self, batch_id: str, listing: str, chunk_no: int) -> ExpansionChunk: ...

    def put_chunk_results(self, batch_id: str, listing: str, chunk_no: int, results: Sequence[ScanResult]) -> None: ...

    def list_chunks(self, batch_id: str, listing: str) -> Iterator[ExpansionChunk]:
        """The chunks of a listing, in no particular order, read a page at a time (a 10,000-series batch
        has two thousand scanned chunks: they are never all in memory at once)."""

    def unscanned_chunks(self, batch_id: str, listing: str) -> list[int]:
        """The numbers of the listing's chunks whose headers are not scanned yet, without their contents."""

    def count_unscanned_chunks(self, batch_id: str, listing: str) -> int: ...

    def delete_chunks(self, batch_id: str, keep: str | None = None) -> None:
        """Delete the batch's chunks, except those of listing `keep` when given."""

    # Drive push notifications
    def put_channel(self, channel: WatchChannel) -> None: ...

    def get_channel(self, channel_id: str) -> WatchChannel | None: ...

    def list_channels(self, active_only: bool = True) -> list[WatchChannel]: ...

    def update_channel(
        self, channel_id: str, change: Callable[[WatchChannel], WatchChannel | None]
    ) -> tuple[WatchChannel, bool]: ...

    def touch_pending_folder(self, folder_id: str, watch_folder_id: str, now: float) -> PendingFolder: ...

    def list_pending_folders(self, quiet_since: float) -> list[PendingFolder]:
        """Folders with no change after `quiet_since` and no batch submitted yet."""

    def mark_folder_submitted(self, folder_id: str, last_change_at: float, batch_id: str) -> bool:
        """Record the batch unless a newer change arrived meanwhile (then False: wait again)."""
