"""Firestore behind the StateStore port.

Documents (readable in the Cloud Console):
  batches/{batch_id}                      the batch; `counters` is a snapshot for people, refreshed on
                                          completion — the API always counts items afresh
  batches/{batch_id}/items/{item_id}      one per series: state, attempts, failure, outputs, timings
  batches/{batch_id}/items/{id}/files/{n} file lists of very large series (> FILES_INLINE files)
  batches/{batch_id}/chunks/{n}           expansion scratch (TTL on `expires_at`)
  idempotency_keys/{sha256}               Idempotency-Key → batch (TTL on `expires_at`)
  channels/{channel_id}, pending_folders/{folder_id}   Drive push notifications

Why it is shaped like this (GCP_FACTS §5, gotcha 16): a per-batch counter document updated by every
worker collapses under contention, so counters are `count()` aggregations over item documents — each
item is its own counter shard, and its state transition *is* the counter update, made in the same
single-document write. Every transition is a read-modify-write of one document, committed only if the
document is unchanged since it was read (a precondition on its update time): concurrent deliveries of
the same task race there and exactly one claim wins. This optimistic form never waits on locks, which
under contention time out in Firestore's pessimistic transactions (GCP_FACTS §5: 19 of 20 failed).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from dicomflow.adapters import codec
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

FILES_INLINE = 2000  # file refs kept in the item document; beyond that, in files/{n} (1 MiB limit)
CHUNK_TTL = timedelta(days=7)
_IN_LIMIT = 30  # Firestore's maximum number of values in an `in` filter
_RETRYABLE = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.Aborted)
_LOST_RACE = (gexc.FailedPrecondition, gexc.AlreadyExists, gexc.Conflict)
CAS_ATTEMPTS = 50


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
    def _item_doc(item: Item) -> dict[str, Any]:
        inline = len(item.files) <= FILES_INLINE
        data = codec.item_to_dict(item, with_files=inline)
        data["files_chunks"] = 0 if inline else -(-len(item.files) // FILES_INLINE)
        return _encode_times(data, codec.ITEM_TIME_FIELDS)

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
    def _write_file_chunks(writer: Any, ref: Any, item: Item) -> None:
        if len(item.files) <= FILES_INLINE:
            return
        for n in range(-(-len(item.files) // FILES_INLINE)):
            part = item.files[n * FILES_INLINE : (n + 1) * FILES_INLINE]
            writer.set(ref.collection("files").document(str(n)), {"files": [f.to_dict() for f in part]})

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
        snap = self._batch_ref(batch_id).get()
        if not snap.exists:
            raise NotFound(f"no batch with id {batch_id!r}")
        return self._batch_from(snap.to_dict() or {}, self.counters(batch_id) if counted else None)

    def list_batches(
        self, limit: int = 20, statuses: frozenset[BatchStatus] | None = None, *, counted: bool = True
    ) -> list[Batch]:
        query: Any = self._db.collection("batches")
        if statuses:
            query = query.where(filter=FieldFilter("status", "in", sorted(s.value for s in statuses)))
        query = query.order_by("created_at", direction=firestore.Query.DESCENDING).limit(limit)
        snaps = list(query.stream())
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
        items = self._batch_ref(batch_id).collection("items")

        def count(state: ItemState) -> tuple[ItemState, int]:
            query = items.where(filter=FieldFilter("state", "==", state.value)).count(alias="n")
            result = query.get()
            return state, int(result[0][0].value)

        with ThreadPoolExecutor(max_workers=len(ItemState)) as pool:
            return Counters.from_states(dict(pool.map(count, list(ItemState))))

    def count_active(self, batch_id: str) -> int:
        active = sorted(s.value for s in ACTIVE)
        query = self._batch_ref(batch_id).collection("items").where(filter=FieldFilter("state", "in", active))
        return int(self._run(query.count(alias="n").get)[0][0].value)

    # --- items ---------------------------------------------------------------------------------------

    def add_items(self, items: Sequence[Item]) -> int:
        """Create-if-absent; an existing item is never touched. Items are written with `create`, which
        fails rather than overwrite, so a duplicated expansion racing this one cannot reset an item a
        worker has already claimed."""
        created = 0
        for start in range(0, len(items), 400):
            created += self._create_items(items[start : start + 400])
        return created

    def _create_items(self, items: Sequence[Item]) -> int:
        remaining = list(items)
        for _ in range(CAS_ATTEMPTS):
            refs = [self._item_ref(i.batch_id, i.item_id) for i in remaining]
            existing = {s.reference.path for s in self._db.get_all(refs, field_paths=["state"]) if s.exists}
            remaining = [i for i, ref in zip(remaining, refs, strict=True) if ref.path not in existing]
            if not remaining:
                return 0
            writes = self._db.batch()
            for item in remaining:
                ref = self._item_ref(item.batch_id, item.item_id)
                writes.create(ref, self._item_doc(item))
                self._write_file_chunks(writes, ref, item)
            try:
                self._run(writes.commit)
            except _LOST_RACE:
                continue  # another expansion created some of them first: look again, create the rest
            return len(remaining)
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

        def compute(current: dict[str, Any] | None) -> tuple[dict[str, Any] | None, tuple[Item, bool]]:
            nonlocal files_changed
            if current is None:
                raise NotFound(f"no series {item_id!r} in batch {batch_id!r}")
            item = self._item_from(current, ref)
            updated = change(item)
            if updated is None:
                return None, (item, False)
            files_changed = updated.files != item.files
            doc = self._item_doc(updated)
            if doc["files_chunks"]:
                doc["files"] = firestore.DELETE_FIELD
            return doc, (updated, True)

        def write_files(writes: Any, result: tuple[Item, bool]) -> None:
            if files_changed:
                self._write_file_chunks(writes, ref, result[0])

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

    def find_stale(self, now: float, retrying_older_than: float, limit: int = 500) -> list[Item]:
        items = self._db.collection_group("items")
        horizon = _to_time(min(now, 32503680000.0))  # "all leases expired" (inf) as a far-future time
        running = (
            items.where(filter=FieldFilter("state", "==", ItemState.RUNNING.value))
            .where(filter=FieldFilter("lease_until", "<", horizon))
            .limit(limit)
        )
        retrying = (
            items.where(filter=FieldFilter("state", "==", ItemState.RETRYING.value))
            .where(filter=FieldFilter("updated_at", "<", _to_time(retrying_older_than)))
            .limit(limit)
        )
        snaps = list(running.stream()) + list(retrying.stream())
        return [self._item_from(s.to_dict() or {}, s.reference) for s in snaps][:limit]

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

    # --- expansion scratch ---------------------------------------------------------------------------

    def _chunk_ref(self, batch_id: str, chunk_no: int) -> Any:
        return self._batch_ref(batch_id).collection("chunks").document(str(chunk_no))

    def _chunk_doc(self, chunk: ExpansionChunk) -> dict[str, Any]:
        data = codec.chunk_to_dict(chunk)
        data["expires_at"] = _to_time(self._clock()) + CHUNK_TTL  # type: ignore[operator]
        return data

    def put_chunks(self, chunks: Sequence[ExpansionChunk]) -> None:
        for start in range(0, len(chunks), 20):  # a chunk document can approach 1 MiB: few per commit
            writes = self._db.batch()
            for chunk in chunks[start : start + 20]:
                writes.set(self._chunk_ref(chunk.batch_id, chunk.chunk_no), self._chunk_doc(chunk))
            self._run(writes.commit)

    def get_chunk(self, batch_id: str, chunk_no: int) -> ExpansionChunk:
        snap = self._chunk_ref(batch_id, chunk_no).get()
        if not snap.exists:
            raise NotFound(f"no expansion chunk {chunk_no} for batch {batch_id!r}")
        return codec.chunk_from_dict(snap.to_dict() or {})

    def put_chunk_results(self, batch_id: str, chunk_no: int, results: Sequence[ScanResult]) -> None:
        ref = self._chunk_ref(batch_id, chunk_no)
        try:
            ref.update({"results": [codec.scan_to_dict(r) for r in results], "scanned": True})
        except gexc.NotFound:
            raise NotFound(f"no expansion chunk {chunk_no} for batch {batch_id!r}") from None

    def list_chunks(self, batch_id: str) -> list[ExpansionChunk]:
        snaps = self._batch_ref(batch_id).collection("chunks").stream()
        return sorted((codec.chunk_from_dict(s.to_dict() or {}) for s in snaps), key=lambda c: c.chunk_no)

    def count_unscanned_chunks(self, batch_id: str) -> int:
        query = self._batch_ref(batch_id).collection("chunks").where(filter=FieldFilter("scanned", "==", False))
        return int(query.count(alias="n").get()[0][0].value)

    def delete_chunks(self, batch_id: str) -> None:
        refs = [s.reference for s in self._batch_ref(batch_id).collection("chunks").select([]).stream()]
        for start in range(0, len(refs), 400):
            writes = self._db.batch()
            for ref in refs[start : start + 400]:
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
