"""Firestore behind the StateStore port.

Documents (readable in the Cloud Console):
  batches/{batch_id}                      the batch; `counters` is a snapshot for people, refreshed on
                                          completion — the API always counts items afresh
  batches/{batch_id}/items/{item_id}      one per series: state, attempts, failure, outputs, timings
  batches/{batch_id}/items/{id}/files/{n} file lists too large to keep in the item document
  batches/{batch_id}/chunks/{listing}-{n}   expansion scratch (TTL on `expires_at`)
  idempotency_keys/{sha256}               Idempotency-Key → batch (TTL on `expires_at`)
  channels/{channel_id}, pending_folders/{folder_id}   Drive push notifications

Why it is shaped like this (GCP_FACTS §5, gotcha 16): a per-batch counter document updated by every
worker collapses under contention, so counters are `count()` aggregations over item documents — each
item is its own counter shard, and its state transition *is* the counter update, made in the same
single-document write. Every transition is a read-modify-write of one document, committed only if the
document is unchanged since it was read (a precondition on its update time): concurrent deliveries of
the same task race there and exactly one claim wins. This optimistic form never waits on locks, which
under contention time out in Firestore's pessimistic transactions (GCP_FACTS §5: 19 of 20 failed).

Reads that must agree (a batch and its counters: DESIGN.md invariant 9) run in one read-only
transaction, which reads one snapshot without taking locks. Writes are sized by bytes, never by count
(GCP_FACTS gotcha 24): one commit stays under the emulator's 4 MiB request limit (production allows
10 MiB) and one document under 1 MiB, whatever the number of series and files.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from dicomflow.adapters import codec
from dicomflow.domain.dataset import Dataset
from dicomflow.domain.failures import Conflict, NotFound, ServiceUnavailable
from dicomflow.domain.model import ACTIVE, Batch, BatchStatus, Counters, Item, ItemState
from dicomflow.domain.series import FileRef, ScanResult
from dicomflow.ports import (
    BatchChange,
    ExpansionChunk,
    IdempotencyRecord,
    ItemChange,
    PendingFolder,
    WatchChannel,
)

# Sizes are estimated from the JSON encoding of a document, which is within a few percent of Firestore's
# own accounting (field names + UTF-8 strings + 8 bytes per number); the margins below absorb the rest.
COMMIT_BYTES = 3 * 1024 * 1024  # per commit: under the emulator's 4 MiB gRPC limit (production: 10 MiB)
FILES_DOC_BYTES = 512 * 1024  # file references per document: well under 1 MiB
COMMIT_WRITES = 450  # writes per commit (the old 500-writes rule still holds for some clients)
CHUNKS_PER_READ = 20  # scanned expansion chunks per query page (~3.5 MiB at 200 files per series)
CHUNK_TTL = timedelta(days=7)
_IN_LIMIT = 30  # Firestore's maximum number of values in an `in` filter
_RETRYABLE = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.Aborted)
_LOST_RACE = (gexc.FailedPrecondition, gexc.AlreadyExists, gexc.Conflict)
CAS_ATTEMPTS = 50


def doc_bytes(data: Any) -> int:
    """Estimated stored size of a document (or a list of file references)."""
    return len(json.dumps(data, separators=(",", ":"), default=str).encode()) + 64


def file_parts(files: Sequence[FileRef]) -> list[list[dict[str, object]]]:
    """File references cut into pieces of at most FILES_DOC_BYTES each (one piece when they fit)."""
    parts: list[list[dict[str, object]]] = [[]]
    size = 0
    for ref in files:
        entry = ref.to_dict()
        entry_size = doc_bytes(entry)
        if parts[-1] and size + entry_size > FILES_DOC_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(entry)
        size += entry_size
    return parts


def _to_time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(float(value), tz=UTC)


def _from_time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)


def _encode_times(data: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    for name in fields:
        if name in data:
            data[name] = _to_time(data[name])
    return data


def _decode_times(data: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    for name in fields:
        if name in data:
            data[name] = _from_time(data[name])
    return data


class FirestoreStateStore:
    def __init__(self, client: firestore.Client, clock: Callable[[], float]) -> None:
        self._db = client
        self._clock = clock

    @classmethod
    def connect(cls, project: str, database: str, clock: Callable[[], float]) -> FirestoreStateStore:
        # With FIRESTORE_EMULATOR_HOST set, the client talks to the emulator with anonymous credentials.
        return cls(firestore.Client(project=project or None, database=database or "(default)"), clock)

    def close(self) -> None:
        self._db.close()  # type: ignore[no-untyped-call]

    # --- references ---------------------------------------------------------------------------------

    def _batch_ref(self, batch_id: str) -> Any:
        return self._db.collection("batches").document(batch_id)

    def _item_ref(self, batch_id: str, item_id: str) -> Any:
        return self._batch_ref(batch_id).collection("items").document(item_id)

    # --- encoding ------------------------------------------------------------------------------------

    @staticmethod
    def _batch_doc(batch: Batch) -> dict[str, Any]:
        return _encode_times(codec.batch_to_dict(batch), codec.BATCH_TIME_FIELDS)

    @staticmethod
    def _batch_from(data: dict[str, Any], counters: Counters | None = None) -> Batch:
        return codec.batch_from_dict(_decode_times(dict(data), codec.BATCH_TIME_FIELDS), counters)

    @staticmethod
    def _item_doc(item: Item) -> tuple[dict[str, Any], list[list[dict[str, object]]]]:
        """The item document, and the file-list pieces to store beside it when the list is too long to
        keep inline (an fMRI series has a file per slice per volume)."""
        parts = file_parts(item.files)
        inline = len(parts) == 1
        data = codec.item_to_dict(item, with_files=inline)
        data["files_chunks"] = 0 if inline else len(parts)
        return _encode_times(data, codec.ITEM_TIME_FIELDS), ([] if inline else parts)

    def _item_from(self, data: dict[str, Any], ref: Any) -> Item:
        data = _decode_times(dict(data), codec.ITEM_TIME_FIELDS)
        chunks = int(data.get("files_chunks") or 0)
        files = None
        if chunks:
            collected: list[FileRef] = []
            for n in range(chunks):
                snap = ref.collection("files").document(str(n)).get()
                collected.extend(FileRef.from_dict(f) for f in (snap.to_dict() or {}).get("files", []))
            files = tuple(collected)
        return codec.item_from_dict(data, files)

    @staticmethod
    def _write_file_chunks(
        writer: Any, ref: Any, parts: list[list[dict[str, object]]], expires_at: float | None = None
    ) -> None:
        for n, part in enumerate(parts):
            writer.set(ref.collection("files").document(str(n)), {"files": part, "expires_at": _to_time(expires_at)})

    def _read_modify_write(
        self,
        ref: Any,
        compute: Callable[[dict[str, Any] | None], tuple[dict[str, Any] | None, Any]],
        extra: Callable[[Any, Any], None] | None = None,
    ) -> Any:
        """Apply `compute(current document or None) -> (new document or None, result)` atomically.

        The write is conditional on the document being exactly as read (absent, or same update time);
        if another writer got there first, read again and recompute. `extra(write_batch, result)` adds
        writes committed together with the document (e.g. a series' file-list chunks).
        """
        for attempt in range(CAS_ATTEMPTS):
            snap = self._run(ref.get)
            new_doc, result = compute(snap.to_dict() if snap.exists else None)
            if new_doc is None:
                return result
            writes = self._db.batch()
            if snap.exists:
                writes.update(ref, new_doc, option=self._db.write_option(last_update_time=snap.update_time))
            else:
                writes.create(ref, new_doc)
            if extra is not None:
                extra(writes, result)
            try:
                self._run(writes.commit)
            except _LOST_RACE:
                time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311 - jitter
                continue
            return result
        raise ServiceUnavailable("too many concurrent updates of one record; it will be retried")

    # --- batches -------------------------------------------------------------------------------------

    def create_batch(self, batch: Batch, idempotency: IdempotencyRecord | None = None) -> tuple[Batch, bool]:
        if idempotency is None:
            try:
                self._batch_ref(batch.batch_id).create(self._batch_doc(batch))
            except _RETRYABLE as exc:
                raise ServiceUnavailable("Firestore is unavailable; try again") from exc
            return batch, True
        key_ref = self._db.collection("idempotency_keys").document(idempotency.key_hash)
        now = self._clock()
        key_doc = {
            "request_hash": idempotency.request_hash,
            "batch_id": batch.batch_id,
            "expires_at": _to_time(idempotency.expires_at),
        }

        def claim_key(current: dict[str, Any] | None) -> tuple[dict[str, Any] | None, Batch | None]:
            if current is not None and (_from_time(current.get("expires_at")) or 0.0) > now:
                if current.get("request_hash") != idempotency.request_hash:
                    raise Conflict("this Idempotency-Key was already used for a different request; use a new key")
                existing = self._batch_ref(str(current["batch_id"])).get()
                if existing.exists:
                    return None, self._batch_from(existing.to_dict() or {})
            return key_doc, None  # new, expired, or its batch was never written: take the key

        def write_batch(writes: Any, existing: Batch | None) -> None:
            if existing is None:
                writes.create(self._batch_ref(batch.batch_id), self._batch_doc(batch))

        existing = self._read_modify_write(key_ref, claim_key, write_batch)
        return (existing, False) if existing is not None else (batch, True)

    def get_batch(self, batch_id: str, *, counted: bool = True) -> Batch:
        if not counted:
            snap = self._run(self._batch_ref(batch_id).get)
            if not snap.exists:
                raise NotFound(f"no batch with id {batch_id!r}")
            return self._batch_from(snap.to_dict() or {})
        snap, counters = self._snapshot(batch_id, with_batch=True)
        if snap is None or not snap.exists:
            raise NotFound(f"no batch with id {batch_id!r}")
        return self._batch_from(snap.to_dict() or {}, counters)

    def _snapshot(self, batch_id: str, *, with_batch: bool) -> tuple[Any, Counters]:
        """The batch document and a count per item state, all read in one read-only transaction: one
        snapshot, so the counters always add up and agree with the batch (six separate count queries
        could each see a different moment)."""
        items = self._batch_ref(batch_id).collection("items")

        @firestore.transactional
        def read(transaction: Any) -> tuple[Any, Counters]:
            snap = self._batch_ref(batch_id).get(transaction=transaction) if with_batch else None
            tally = {}
            for state in ItemState:
                query = items.where(filter=FieldFilter("state", "==", state.value)).count(alias="n")
                tally[state] = int(query.get(transaction=transaction)[0][0].value)
            return snap, Counters.from_states(tally)

        result: tuple[Any, Counters] = self._run(lambda: read(self._db.transaction(read_only=True)))
        return result

    def list_batches(
        self,
        limit: int = 20,
        statuses: frozenset[BatchStatus] | None = None,
        *,
        counted: bool = True,
        owner: str | None = None,
    ) -> list[Batch]:
        query: Any = self._db.collection("batches")
        if owner is not None:
            # Composite indexes (owner, created_at desc) and (owner, status, created_at): infra/firestore.tf.
            # Documents written before owners existed lack the field and match no owner, not even "".
            query = query.where(filter=FieldFilter("owner", "==", owner))
        if statuses:
            query = query.where(filter=FieldFilter("status", "in", sorted(s.value for s in statuses)))
        query = query.order_by("created_at", direction=firestore.Query.DESCENDING).limit(limit)
        snaps = list(self._run(lambda: list(query.stream())))
        return [self._batch_from(s.to_dict() or {}, self.counters(s.id) if counted else None) for s in snaps]

    def update_batch(self, batch_id: str, change: BatchChange) -> tuple[Batch, bool]:
        def compute(current: dict[str, Any] | None) -> tuple[dict[str, Any] | None, tuple[Batch, bool]]:
            if current is None:
                raise NotFound(f"no batch with id {batch_id!r}")
            batch = self._batch_from(current)
            updated = change(batch)
            if updated is None:
                return None, (batch, False)
            return self._batch_doc(updated), (updated, True)

        result: tuple[Batch, bool] = self._read_modify_write(self._batch_ref(batch_id), compute)
        return result

    def counters(self, batch_id: str) -> Counters:
        return self._snapshot(batch_id, with_batch=False)[1]

    def count_active(self, batch_id: str) -> int:
        active = sorted(s.value for s in ACTIVE)
        query = self._batch_ref(batch_id).collection("items").where(filter=FieldFilter("state", "in", active))
        return int(self._run(query.count(alias="n").get)[0][0].value)

    # --- items ---------------------------------------------------------------------------------------

    def add_items(self, items: Sequence[Item]) -> list[Item]:
        """Create-if-absent; an existing item is never touched. Items are written with `create`, which
        fails rather than overwrite, so a duplicated expansion racing this one cannot reset an item a
        worker has already claimed. Commits are packed by bytes (GCP_FACTS gotcha 24)."""
        stored: dict[tuple[str, str], Item] = {}
        group: list[tuple[Item, dict[str, Any], list[list[dict[str, object]]]]] = []
        size = 0
        for item in items:
            doc, parts = self._item_doc(item)
            item_size = doc_bytes(doc) + sum(doc_bytes(p) for p in parts)
            if group and (size + item_size > COMMIT_BYTES or len(group) + len(parts) + 1 > COMMIT_WRITES):
                stored.update(self._create_items(group))
                group, size = [], 0
            group.append((item, doc, parts))
            size += item_size
        if group:
            stored.update(self._create_items(group))
        return [stored[(i.batch_id, i.item_id)] for i in items]

    def _create_items(
        self, group: Sequence[tuple[Item, dict[str, Any], list[list[dict[str, object]]]]]
    ) -> dict[tuple[str, str], Item]:
        stored: dict[tuple[str, str], Item] = {}
        remaining = list(group)
        for _ in range(CAS_ATTEMPTS):
            refs = [self._item_ref(i.batch_id, i.item_id) for i, _doc, _parts in remaining]
            snaps: list[Any] = self._run(lambda: list(self._db.get_all(refs)))  # noqa: B023 - called at once
            found = {s.reference.path: s for s in snaps if s.exists}
            for (item, _doc, _parts), ref in zip(remaining, refs, strict=True):
                if ref.path in found:
                    stored[(item.batch_id, item.item_id)] = self._item_from(found[ref.path].to_dict() or {}, ref)
            remaining = [g for g, ref in zip(remaining, refs, strict=True) if ref.path not in found]
            if not remaining:
                return stored
            writes = self._db.batch()
            for item, doc, parts in remaining:
                ref = self._item_ref(item.batch_id, item.item_id)
                writes.create(ref, doc)
                self._write_file_chunks(writes, ref, parts)
            try:
                self._run(writes.commit)
            except _LOST_RACE:
                continue  # another expansion created some of them first: look again, create the rest
            stored.update({(item.batch_id, item.item_id): item for item, _doc, _parts in remaining})
            return stored
        raise ServiceUnavailable("could not create the series records (too much contention); it will be retried")

    def get_item(self, batch_id: str, item_id: str) -> Item:
        ref = self._item_ref(batch_id, item_id)
        snap = ref.get()
        if not snap.exists:
            raise NotFound(f"no series {item_id!r} in batch {batch_id!r}")
        return self._item_from(snap.to_dict() or {}, ref)

    def update_item(self, batch_id: str, item_id: str, change: ItemChange) -> tuple[Item, bool]:
        ref = self._item_ref(batch_id, item_id)
        files_changed = False
        pending_parts: list[list[dict[str, object]]] = []

        def compute(current: dict[str, Any] | None) -> tuple[dict[str, Any] | None, tuple[Item, bool]]:
            nonlocal files_changed
            if current is None:
                raise NotFound(f"no series {item_id!r} in batch {batch_id!r}")
            item = self._item_from(current, ref)
            updated = change(item)
            if updated is None:
                return None, (item, False)
            updated = replace(updated, rev=item.rev + 1)
            # The file pieces are rewritten with the files, or with the item's expiry: TTL deletes a document,
            # never its subcollections, so each piece carries the expiry itself.
            files_changed = updated.files != item.files or updated.expires_at != item.expires_at
            doc, parts = self._item_doc(updated)
            pending_parts[:] = parts
            if doc["files_chunks"]:
                doc["files"] = firestore.DELETE_FIELD
            return doc, (updated, True)

        def write_files(writes: Any, result: tuple[Item, bool]) -> None:
            if files_changed:
                self._write_file_chunks(writes, ref, pending_parts, result[0].expires_at)

        outcome: tuple[Item, bool] = self._read_modify_write(ref, compute, write_files)
        return outcome

    def list_items(
        self, batch_id: str, states: frozenset[ItemState] | None = None, after: str = "", limit: int = 100
    ) -> list[Item]:
        query = self._batch_ref(batch_id).collection("items")
        if states:
            query = query.where(filter=FieldFilter("state", "in", sorted(s.value for s in states)))
        query = query.order_by("__name__")
        if after:
            query = query.start_after({"__name__": self._item_ref(batch_id, after)})
        return [self._item_from(s.to_dict() or {}, s.reference) for s in query.limit(limit).stream()]

    def find_stale(self, now: float, idle_before: float, limit: int = 500) -> list[Item]:
        items = self._db.collection_group("items")
        horizon = _to_time(min(now, 32503680000.0))  # "all leases expired" (inf) as a far-future time
        queries = [
            items.where(filter=FieldFilter("state", "==", ItemState.RUNNING.value))
            .where(filter=FieldFilter("lease_until", "<", horizon))
            .order_by("lease_until")
            .limit(limit)
        ]
        idle_time = _to_time(min(idle_before, 32503680000.0))
        for state in (ItemState.PENDING, ItemState.RETRYING):
            queries.append(
                items.where(filter=FieldFilter("state", "==", state.value))
                .where(filter=FieldFilter("updated_at", "<", idle_time))
                .order_by("updated_at")
                .limit(limit)
            )
        found: list[list[Item]] = [
            [self._item_from(s.to_dict() or {}, s.reference) for s in self._stream(q)] for q in queries
        ]
        idle = sorted((i for part in found[1:] for i in part), key=lambda i: i.updated_at)
        return found[0] + idle[:limit]

    def _stream(self, query: Any) -> list[Any]:
        snaps: list[Any] = self._run(lambda: list(query.stream()))
        return snaps

    def succeeded_fingerprints(self, dest_key: str, fingerprints: Sequence[str]) -> set[str]:
        items = self._db.collection_group("items")
        done = items.where(filter=FieldFilter("dest_key", "==", dest_key)).where(
            filter=FieldFilter("state", "==", ItemState.SUCCEEDED.value)
        )
        if not list(done.limit(1).select(["fingerprint"]).stream()):
            return set()  # nothing ever converted into this destination: skip the per-series lookups
        unique = sorted(set(fingerprints))
        parts = [unique[i : i + _IN_LIMIT] for i in range(0, len(unique), _IN_LIMIT)]

        def lookup(part: list[str]) -> set[str]:
            query = done.where(filter=FieldFilter("fingerprint", "in", part)).select(["fingerprint"])
            return {str((s.to_dict() or {}).get("fingerprint")) for s in query.stream()}

        with ThreadPoolExecutor(max_workers=8) as pool:
            return set().union(*pool.map(lookup, parts)) if parts else set()

    def succeeded_file_counts(self, dest_key: str, item_ids: Sequence[str]) -> dict[str, int]:
        done = (
            self._db.collection_group("items")
            .where(filter=FieldFilter("dest_key", "==", dest_key))
            .where(filter=FieldFilter("state", "==", ItemState.SUCCEEDED.value))
        )
        if not self._stream(done.limit(1).select(["item_id"])):
            return {}  # nothing ever converted into this destination: skip the per-series lookups
        unique = sorted(set(item_ids))
        counts: dict[str, int] = {}
        for start in range(0, len(unique), _IN_LIMIT):
            query = done.where(filter=FieldFilter("item_id", "in", unique[start : start + _IN_LIMIT]))
            for snap in self._stream(query.select(["item_id", "file_count"])):
                data = snap.to_dict() or {}
                item_id = str(data.get("item_id"))
                counts[item_id] = max(counts.get(item_id, 0), int(data.get("file_count") or 0))
        return counts

    def recorded_outputs(self, dest_key: str, item_id: str, layout: str | None = None) -> set[tuple[str, str]]:
        query = (
            self._db.collection_group("items")
            .where(filter=FieldFilter("dest_key", "==", dest_key))
            .where(filter=FieldFilter("item_id", "==", item_id))
            .where(filter=FieldFilter("state", "==", ItemState.SUCCEEDED.value))
        )
        docs = (s.to_dict() or {} for s in self._stream(query))
        return {
            (str(o["name"]), str(o["sha256"]))
            for d in docs
            if layout in (None, d.get("layout", "mirror"))
            for o in d.get("outputs", [])
        }

    def find_unretracted(self, limit: int = 500) -> list[Item]:
        query = (
            self._db.collection_group("items").where(filter=FieldFilter("needs_retraction", "==", True)).limit(limit)
        )
        return [self._item_from(s.to_dict() or {}, s.reference) for s in self._stream(query)]

    def list_destination_items(self, dest_key: str, after: str = "", limit: int = 200) -> list[Item]:
        query = (
            self._db.collection_group("items")
            .where(filter=FieldFilter("dest_key", "==", dest_key))
            .where(filter=FieldFilter("state", "==", ItemState.SUCCEEDED.value))
            .where(filter=FieldFilter("layout", "==", "bids"))
            .order_by("__name__")
        )
        if after:
            batch_id, _, item_id = after.partition("/")
            query = query.start_after({"__name__": self._item_ref(batch_id, item_id)})
        return [self._item_from(s.to_dict() or {}, s.reference) for s in self._stream(query.limit(limit))]

    def find_unfinished(self, limit: int = 500) -> list[Batch]:
        query = self._db.collection("batches").where(filter=FieldFilter("finish_pending", "==", True)).limit(limit)
        return [self._batch_from(s.to_dict() or {}) for s in self._stream(query)]

    # --- datasets ------------------------------------------------------------------------------------

    def _dataset_ref(self, dest_key: str) -> Any:
        return self._db.collection("datasets").document(dest_key)

    def get_dataset(self, dest_key: str) -> Dataset:
        snap = self._run(self._dataset_ref(dest_key).get)
        return Dataset.from_dict(snap.to_dict() or {}) if snap.exists else Dataset(dest_key)

    def update_dataset(self, dest_key: str, change: Callable[[Dataset], Dataset | None]) -> tuple[Dataset, bool]:
        def compute(current: dict[str, Any] | None) -> tuple[dict[str, Any] | None, tuple[Dataset, bool]]:
            dataset = Dataset.from_dict(current) if current is not None else Dataset(dest_key)
            updated = change(dataset)
            if updated is None:
                return None, (dataset, False)
            return updated.to_dict(), (updated, True)

        result: tuple[Dataset, bool] = self._read_modify_write(self._dataset_ref(dest_key), compute)
        return result

    # --- expansion scratch ---------------------------------------------------------------------------

    def _chunk_ref(self, batch_id: str, listing: str, chunk_no: int) -> Any:
        return self._batch_ref(batch_id).collection("chunks").document(f"{listing}-{chunk_no}")

    def _chunk_doc(self, chunk: ExpansionChunk) -> dict[str, Any]:
        data = codec.chunk_to_dict(chunk)
        data["expires_at"] = _to_time(self._clock()) + CHUNK_TTL  # type: ignore[operator]
        return data

    def put_chunks(self, chunks: Sequence[ExpansionChunk]) -> None:
        writes, size, count = self._db.batch(), 0, 0
        for chunk in chunks:
            doc = self._chunk_doc(chunk)
            chunk_size = doc_bytes(doc)
            if count and (size + chunk_size > COMMIT_BYTES or count >= COMMIT_WRITES):
                self._run(writes.commit)
                writes, size, count = self._db.batch(), 0, 0
            writes.set(self._chunk_ref(chunk.batch_id, chunk.listing, chunk.chunk_no), doc)
            size, count = size + chunk_size, count + 1
        if count:
            self._run(writes.commit)

    def get_chunk(self, batch_id: str, listing: str, chunk_no: int) -> ExpansionChunk:
        snap = self._run(self._chunk_ref(batch_id, listing, chunk_no).get)
        if not snap.exists:
            raise NotFound(f"no expansion chunk {chunk_no} for batch {batch_id!r}")
        return codec.chunk_from_dict(snap.to_dict() or {})

    def put_chunk_results(self, batch_id: str, listing: str, chunk_no: int, results: Sequence[ScanResult]) -> None:
        ref = self._chunk_ref(batch_id, listing, chunk_no)
        try:
            self._run(lambda: ref.update({"results": [codec.scan_to_dict(r) for r in results], "scanned": True}))
        except gexc.NotFound:
            raise NotFound(f"no expansion chunk {chunk_no} for batch {batch_id!r}") from None

    def _chunks(self, batch_id: str) -> Any:
        return self._batch_ref(batch_id).collection("chunks")

    def list_chunks(self, batch_id: str, listing: str) -> Iterator[ExpansionChunk]:
        # In pages: a 10,000-series batch of 200 files per series has 2,000 scanned chunks of ~170 KiB, more
        # than one answer should carry (the emulator fails it outright). By document id: no composite index.
        query = self._chunks(batch_id).where(filter=FieldFilter("listing", "==", listing)).order_by("__name__")
        last: Any = None
        while True:
            page = query.limit(CHUNKS_PER_READ) if last is None else query.start_after(last).limit(CHUNKS_PER_READ)
            snaps = self._stream(page)
            yield from (codec.chunk_from_dict(s.to_dict() or {}) for s in snaps)
            if len(snaps) < CHUNKS_PER_READ:
                return
            last = snaps[-1]

    def unscanned_chunks(self, batch_id: str, listing: str) -> list[int]:
        query = (
            self._chunks(batch_id)
            .where(filter=FieldFilter("listing", "==", listing))
            .where(filter=FieldFilter("scanned", "==", False))
            .select(["chunk_no"])
        )
        return sorted(int((s.to_dict() or {})["chunk_no"]) for s in self._stream(query))

    def count_unscanned_chunks(self, batch_id: str, listing: str) -> int:
        query = (
            self._chunks(batch_id)
            .where(filter=FieldFilter("listing", "==", listing))
            .where(filter=FieldFilter("scanned", "==", False))
        )
        return int(self._run(query.count(alias="n").get)[0][0].value)

    def delete_chunks(self, batch_id: str, keep: str | None = None) -> None:
        snaps = self._run(lambda: list(self._chunks(batch_id).select(["listing"]).stream()))
        refs = [s.reference for s in snaps if (s.to_dict() or {}).get("listing") != keep]
        for start in range(0, len(refs), COMMIT_WRITES):
            writes = self._db.batch()
            for ref in refs[start : start + COMMIT_WRITES]:
                writes.delete(ref)
            self._run(writes.commit)

    # --- Drive watch channels ------------------------------------------------------------------------

    def put_channel(self, channel: WatchChannel) -> None:
        self._db.collection("channels").document(channel.channel_id).set(codec.channel_to_dict(channel))

    def get_channel(self, channel_id: str) -> WatchChannel | None:
        snap = self._db.collection("channels").document(channel_id).get()
        return codec.channel_from_dict(snap.to_dict() or {}) if snap.exists else None

    def list_channels(self, active_only: bool = True) -> list[WatchChannel]:
        query: Any = self._db.collection("channels")
        if active_only:
            query = query.where(filter=FieldFilter("active", "==", True))
        return [codec.channel_from_dict(s.to_dict() or {}) for s in query.stream()]

    def update_channel(
        self, channel_id: str, change: Callable[[WatchChannel], WatchChannel | None]
    ) -> tuple[WatchChannel, bool]:
        def compute(current: dict[str, Any] | None) -> tuple[dict[str, Any] | None, tuple[WatchChannel, bool]]:
            if current is None:
                raise NotFound(f"no watch channel {channel_id!r}")
            channel = codec.channel_from_dict(current)
            updated = change(channel)
            if updated is None:
                return None, (channel, False)
            return codec.channel_to_dict(updated), (updated, True)

        result: tuple[WatchChannel, bool] = self._read_modify_write(
            self._db.collection("channels").document(channel_id), compute
        )
        return result

    def _pending_ref(self, folder_id: str) -> Any:
        # Drive ids are safe document ids; hash anyway so any id works.
        return self._db.collection("pending_folders").document(hashlib.sha256(folder_id.encode()).hexdigest()[:40])

    def touch_pending_folder(self, folder_id: str, watch_folder_id: str, now: float) -> PendingFolder:
        def compute(current: dict[str, Any] | None) -> tuple[dict[str, Any] | None, PendingFolder]:
            old = codec.pending_from_dict(current) if current is not None else None
            if old is None or old.submitted_batch_id:
                folder = PendingFolder(folder_id, watch_folder_id, first_change_at=now, last_change_at=now)
            else:
                folder = PendingFolder(folder_id, watch_folder_id, old.first_change_at, max(old.last_change_at, now))
            return codec.pending_to_dict(folder) | {"submitted": False}, folder

        result: PendingFolder = self._read_modify_write(self._pending_ref(folder_id), compute)
        return result

    def list_pending_folders(self, quiet_since: float) -> list[PendingFolder]:
        query = self._db.collection("pending_folders").where(filter=FieldFilter("submitted", "==", False))
        folders = [codec.pending_from_dict(s.to_dict() or {}) for s in query.stream()]
        return sorted((f for f in folders if f.last_change_at <= quiet_since), key=lambda f: f.last_change_at)

    def mark_folder_submitted(self, folder_id: str, last_change_at: float, batch_id: str) -> bool:
        def compute(current: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
            if current is None:
                return None, False
            folder = codec.pending_from_dict(current)
            if folder.submitted_batch_id or folder.last_change_at > last_change_at:
                return None, False
            done = PendingFolder(folder_id, folder.watch_folder_id, folder.first_change_at, folder.last_change_at,
                                 submitted_batch_id=batch_id)  # fmt: skip
            return codec.pending_to_dict(done) | {"submitted": True}, True

        result: bool = self._read_modify_write(self._pending_ref(folder_id), compute)
        return result

    # --- errors --------------------------------------------------------------------------------------

    @staticmethod
    def _run(operation: Callable[[], Any]) -> Any:
        """Firestore outages become TransientError, so the task answering 5xx is retried by its queue."""
        try:
            return operation()
        except _RETRYABLE as exc:
            raise ServiceUnavailable(f"Firestore is unavailable ({type(exc).__name__}); it will be retried") from exc
