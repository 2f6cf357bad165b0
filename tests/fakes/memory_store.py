"""An in-memory StateStore: the hand-written fake of the port, held to the same contract suite as SQLite
and Firestore (tests/contracts/test_state_store.py), and fast enough for thousands of simulated runs.

Records are frozen dataclasses, so storing them shares nothing mutable. One lock makes every method
atomic, like a single-document transaction; counters are derived from item states under the same lock,
so a counted read is one snapshot. Firestore's per-document limit is enforced on expansion chunks (the
service decides how many files a chunk holds: it must size them by bytes, GCP_FACTS gotcha 24).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from dicomflow.adapters import codec
from dicomflow.domain.dataset import Dataset
from dicomflow.domain.failures import Conflict, NotFound, PermanentError
from dicomflow.domain.model import ACTIVE, Batch, BatchStatus, Counters, Item, ItemState
from dicomflow.domain.series import ScanResult
from dicomflow.ports import (
    BatchChange,
    ExpansionChunk,
    IdempotencyRecord,
    ItemChange,
    PendingFolder,
    WatchChannel,
)

DOCUMENT_LIMIT = 1024 * 1024  # Firestore: one document <= 1 MiB


class DocumentTooLarge(PermanentError):
    code = "document_too_large"


class MemoryStateStore:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._batches: dict[str, Batch] = {}
        self._items: dict[str, dict[str, Item]] = {}
        self._keys: dict[str, IdempotencyRecord] = {}
        self._chunks: dict[tuple[str, str, int], ExpansionChunk] = {}
        self._channels: dict[str, WatchChannel] = {}
        self._folders: dict[str, PendingFolder] = {}
        self._datasets: dict[str, Dataset] = {}
        self.largest_document = 0

    def close(self) -> None:
        return None

    # --- batches -------------------------------------------------------------------------------------

    def create_batch(self, batch: Batch, idempotency: IdempotencyRecord | None = None) -> tuple[Batch, bool]:
        with self._lock:
            if idempotency is not None:
                known = self._keys.get(idempotency.key_hash)
                if known is not None and known.expires_at > self._clock():
                    if known.request_hash != idempotency.request_hash:
                        raise Conflict("this Idempotency-Key was already used for a different request; use a new key")
                    existing = self._batches.get(known.batch_id)
                    if existing is not None:
                        return existing, False
                self._keys[idempotency.key_hash] = idempotency
            if batch.batch_id in self._batches:
                raise Conflict(f"batch {batch.batch_id} already exists")
            self._batches[batch.batch_id] = batch
            self._items.setdefault(batch.batch_id, {})
            return batch, True

    def _batch(self, batch_id: str) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        return batch

    def get_batch(self, batch_id: str, *, counted: bool = True) -> Batch:
        with self._lock:
            batch = self._batch(batch_id)
            return replace(batch, counters=self._count(batch_id)) if counted else batch

    def list_batches(
        self,
        limit: int = 20,
        statuses: frozenset[BatchStatus] | None = None,
        *,
        counted: bool = True,
        owner: str | None = None,
    ) -> list[Batch]:
        with self._lock:
            chosen = [
                b
                for b in self._batches.values()
                if (not statuses or b.status in statuses) and (owner is None or b.owner == owner)
            ]
            chosen.sort(key=lambda b: b.created_at, reverse=True)
            return [replace(b, counters=self._count(b.batch_id)) if counted else b for b in chosen[:limit]]

    def update_batch(self, batch_id: str, change: BatchChange) -> tuple[Batch, bool]:
        with self._lock:
            current = self._batch(batch_id)
            updated = change(current)
            if updated is None:
                return current, False
            self._batches[batch_id] = updated
            return updated, True

    def _count(self, batch_id: str) -> Counters:
        tally: dict[ItemState, int] = {}
        for item in self._items.get(batch_id, {}).values():
            tally[item.state] = tally.get(item.state, 0) + 1
        return Counters.from_states(tally)

    def counters(self, batch_id: str) -> Counters:
        with self._lock:
            return self._count(batch_id)

    def count_active(self, batch_id: str) -> int:
        with self._lock:
            return sum(1 for i in self._items.get(batch_id, {}).values() if i.state in ACTIVE)

    # --- items ---------------------------------------------------------------------------------------

    def add_items(self, items: Sequence[Item]) -> list[Item]:
        stored: list[Item] = []
        with self._lock:
            for item in items:
                table = self._items.setdefault(item.batch_id, {})
                stored.append(table.setdefault(item.item_id, item))
        return stored

    def get_item(self, batch_id: str, item_id: str) -> Item:
        with self._lock:
            item = self._items.get(batch_id, {}).get(item_id)
            if item is None:
                raise NotFound(f"no series {item_id!r} in batch {batch_id!r}")
            return item

    def update_item(self, batch_id: str, item_id: str, change: ItemChange) -> tuple[Item, bool]:
        with self._lock:
            current = self.get_item(batch_id, item_id)
            updated = change(current)
            if updated is None:
                return current, False
            updated = replace(updated, rev=current.rev + 1)
            self._items[batch_id][item_id] = updated
            return updated, True

    def list_items(
        self, batch_id: str, states: frozenset[ItemState] | None = None, after: str = "", limit: int = 100
    ) -> list[Item]:
        with self._lock:
            chosen = sorted(
                (i for i in self._items.get(batch_id, {}).values() if i.item_id > after),
                key=lambda i: i.item_id,
            )
            return [i for i in chosen if not states or i.state in states][:limit]

    def find_stale(self, now: float, idle_before: float, limit: int = 500) -> list[Item]:
        with self._lock:
            every = [i for table in self._items.values() for i in table.values()]
        running = sorted(
            (i for i in every if i.state is ItemState.RUNNING and i.lease_until is not None and i.lease_until < now),
            key=lambda i: i.lease_until or 0.0,
        )
        idle = sorted(
            (i for i in every if i.state in (ItemState.PENDING, ItemState.RETRYING) and i.updated_at < idle_before),
            key=lambda i: i.updated_at,
        )
        return running[:limit] + idle[:limit]

    def succeeded_fingerprints(self, dest_key: str, fingerprints: Sequence[str]) -> set[str]:
        wanted = set(fingerprints)
        with self._lock:
            return {
                i.fingerprint
                for table in self._items.values()
                for i in table.values()
                if i.dest_key == dest_key and i.state is ItemState.SUCCEEDED and i.fingerprint in wanted
            }

    def succeeded_file_counts(self, dest_key: str, item_ids: Sequence[str]) -> dict[str, int]:
        wanted = set(item_ids)
        counts: dict[str, int] = {}
        with self._lock:
            for table in self._items.values():
                for i in table.values():
                    if i.dest_key == dest_key and i.state is ItemState.SUCCEEDED and i.item_id in wanted:
                        counts[i.item_id] = max(counts.get(i.item_id, 0), i.file_count)
        return counts

    def recorded_outputs(self, dest_key: str, item_id: str, layout: str | None = None) -> set[tuple[str, str]]:
        with self._lock:
            return {
                (o.name, o.sha256)
                for table in self._items.values()
                for i in table.values()
                if i.dest_key == dest_key
                and i.item_id == item_id
                and i.state is ItemState.SUCCEEDED
                and layout in (None, i.layout)
                for o in i.outputs
            }

    def find_unretracted(self, limit: int = 500) -> list[Item]:
        with self._lock:
            found = [i for table in self._items.values() for i in table.values() if i.needs_retraction]
        return sorted(found, key=lambda i: i.updated_at)[:limit]

    def list_destination_items(self, dest_key: str, after: str = "", limit: int = 200) -> list[Item]:
        with self._lock:
            found = sorted(
                (
                    i
                    for table in self._items.values()
                    for i in table.values()
                    if i.dest_key == dest_key and i.state is ItemState.SUCCEEDED and i.layout == "bids"
                ),
                key=lambda i: (i.batch_id, i.item_id),
            )
        cursor = tuple(after.partition("/")[::2])
        return [i for i in found if (i.batch_id, i.item_id) > cursor][:limit]

    def find_unfinished(self, limit: int = 500) -> list[Batch]:
        with self._lock:
            found = [b for b in self._batches.values() if b.finish_pending]
        return sorted(found, key=lambda b: b.updated_at)[:limit]

    # --- datasets --------------------------------------------------------------------------------------

    def get_dataset(self, dest_key: str) -> Dataset:
        with self._lock:
            return self._datasets.get(dest_key) or Dataset(dest_key)

    def update_dataset(self, dest_key: str, change: Callable[[Dataset], Dataset | None]) -> tuple[Dataset, bool]:
        with self._lock:
            current = self.get_dataset(dest_key)
            updated = change(current)
            if updated is None:
                return current, False
            self._datasets[dest_key] = updated
            return updated, True

    # --- expansion scratch ---------------------------------------------------------------------------

    def _check_size(self, chunk: ExpansionChunk) -> None:
        size = len(json.dumps(codec.chunk_to_dict(chunk), separators=(",", ":")).encode())
        self.largest_document = max(self.largest_document, size)
        if size > DOCUMENT_LIMIT:
            raise DocumentTooLarge(f"an expansion chunk of {size} bytes exceeds Firestore's 1 MiB per document")

    def put_chunks(self, chunks: Sequence[ExpansionChunk]) -> None:
        for chunk in chunks:
            self._check_size(chunk)
        with self._lock:
            for chunk in chunks:
                self._chunks[(chunk.batch_id, chunk.listing, chunk.chunk_no)] = chunk

    def get_chunk(self, batch_id: str, listing: str, chunk_no: int) -> ExpansionChunk:
        with self._lock:
            chunk = self._chunks.get((batch_id, listing, chunk_no))
        if chunk is None:
            raise NotFound(f"no expansion chunk {chunk_no} for batch {batch_id!r}")
        return chunk

    def put_chunk_results(self, batch_id: str, listing: str, chunk_no: int, results: Sequence[ScanResult]) -> None:
        with self._lock:
            chunk = self.get_chunk(batch_id, listing, chunk_no)
            done = replace(chunk, results=tuple(results))
            self._check_size(done)
            self._chunks[(batch_id, listing, chunk_no)] = done

    def list_chunks(self, batch_id: str, listing: str) -> Iterator[ExpansionChunk]:
        with self._lock:
            found = [c for (b, owner, _), c in self._chunks.items() if b == batch_id and owner == listing]
        return iter(sorted(found, key=lambda c: c.chunk_no))

    def unscanned_chunks(self, batch_id: str, listing: str) -> list[int]:
        return [c.chunk_no for c in self.list_chunks(batch_id, listing) if c.results is None]

    def count_unscanned_chunks(self, batch_id: str, listing: str) -> int:
        return len(self.unscanned_chunks(batch_id, listing))

    def delete_chunks(self, batch_id: str, keep: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._chunks if k[0] == batch_id and k[1] != keep]:
                del self._chunks[key]

    # --- Drive watch channels ------------------------------------------------------------------------

    def put_channel(self, channel: WatchChannel) -> None:
        with self._lock:
            self._channels[channel.channel_id] = channel

    def get_channel(self, channel_id: str) -> WatchChannel | None:
        with self._lock:
            return self._channels.get(channel_id)

    def list_channels(self, active_only: bool = True) -> list[WatchChannel]:
        with self._lock:
            return [c for c in self._channels.values() if c.active or not active_only]

    def update_channel(
        self, channel_id: str, change: Callable[[WatchChannel], WatchChannel | None]
    ) -> tuple[WatchChannel, bool]:
        with self._lock:
            current = self._channels.get(channel_id)
            if current is None:
                raise NotFound(f"no watch channel {channel_id!r}")
            updated = change(current)
            if updated is None:
                return current, False
            self._channels[channel_id] = updated
            return updated, True

    def touch_pending_folder(self, folder_id: str, watch_folder_id: str, now: float) -> PendingFolder:
        with self._lock:
            old = self._folders.get(folder_id)
            if old is None or old.submitted_batch_id:
                folder = PendingFolder(folder_id, watch_folder_id, first_change_at=now, last_change_at=now)
            else:
                folder = PendingFolder(folder_id, watch_folder_id, old.first_change_at, max(old.last_change_at, now))
            self._folders[folder_id] = folder
            return folder

    def list_pending_folders(self, quiet_since: float) -> list[PendingFolder]:
        with self._lock:
            quiet = [f for f in self._folders.values() if not f.submitted_batch_id and f.last_change_at <= quiet_since]
        return sorted(quiet, key=lambda f: f.last_change_at)

    def mark_folder_submitted(self, folder_id: str, last_change_at: float, batch_id: str) -> bool:
        with self._lock:
            folder = self._folders.get(folder_id)
            if folder is None or folder.submitted_batch_id or folder.last_change_at > last_change_at:
                return False
            self._folders[folder_id] = replace(folder, submitted_batch_id=batch_id)
            return True
