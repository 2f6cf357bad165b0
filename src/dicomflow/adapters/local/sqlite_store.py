"""SQLite behind the StateStore port: the embedded default, safe for several worker processes.

Every read-modify-write runs in one write transaction (adapters/local/sqlite.py), so two processes
can never both apply a transition to the same item. Counters are `COUNT(*) ... GROUP BY state` over
an index: derived from item states, they can never disagree with them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dicomflow.adapters import codec
from dicomflow.adapters.local.sqlite import SqliteDatabase
from dicomflow.domain.dataset import Dataset
from dicomflow.domain.failures import Conflict, NotFound
from dicomflow.domain.model import Batch, BatchStatus, Counters, Item, ItemState
from dicomflow.domain.series import ScanResult
from dicomflow.ports import (
    BatchChange,
    ExpansionChunk,
    IdempotencyRecord,
    ItemChange,
    PendingFolder,
    WatchChannel,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    data TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS batches_created ON batches (created_at);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    state TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    dest_key TEXT NOT NULL,
    lease_until REAL,
    updated_at REAL NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (batch_id, item_id)
);
CREATE INDEX IF NOT EXISTS items_state ON items (batch_id, state);
CREATE INDEX IF NOT EXISTS items_fingerprint ON items (dest_key, fingerprint, state);
CREATE INDEX IF NOT EXISTS items_stale ON items (state, lease_until, updated_at);
CREATE INDEX IF NOT EXISTS items_idle ON items (state, updated_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key_hash TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    batch_id TEXT NOT NULL,
    listing TEXT NOT NULL,
    chunk_no INTEGER NOT NULL,
    scanned INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (batch_id, listing, chunk_no)
);
CREATE TABLE IF NOT EXISTS channels (
    channel_id TEXT PRIMARY KEY,
    active INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    dest_key TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_folders (
    folder_id TEXT PRIMARY KEY,
    last_change_at REAL NOT NULL,
    submitted INTEGER NOT NULL,
    data TEXT NOT NULL
);
"""


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def _migrate(db: SqliteDatabase) -> None:
    """State files written before listings were recorded have a chunks table without `listing`. Chunks
    are scratch space of unfinished expansions (a resumed batch lists again), so the old table is replaced.
    State files written before batches had owners get the column, filled from each batch's document."""
    columns = {row["name"] for row in db.read("PRAGMA table_info(chunks)")}
    if "listing" not in columns:
        with db.tx() as conn:
            conn.execute("DROP TABLE chunks")
        db.conn().executescript(SCHEMA)
    if "owner" not in {row["name"] for row in db.read("PRAGMA table_info(batches)")}:
        with db.tx() as conn:
            conn.execute("ALTER TABLE batches ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
            conn.execute("UPDATE batches SET owner = coalesce(json_extract(data, '$.owner'), '')")
    db.conn().execute("CREATE INDEX IF NOT EXISTS batches_owner_created ON batches (owner, created_at)")


class SqliteStateStore:
    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self._db = SqliteDatabase(path, SCHEMA)
        _migrate(self._db)

    def close(self) -> None:
        self._db.close()

    # --- batches ---------------------------------------------------------------------------------------

    def create_batch(self, batch: Batch, idempotency: IdempotencyRecord | None = None) -> tuple[Batch, bool]:
        with self._db.tx() as db:
            if idempotency is not None:
                row = db.execute(
                    "SELECT request_hash, batch_id, expires_at FROM idempotency WHERE key_hash = ?",
                    (idempotency.key_hash,),
                ).fetchone()
                if row is not None and row[2] > self._clock():
                    if row[0] != idempotency.request_hash:
                        raise Conflict("this Idempotency-Key was already used for a different request; use a new key")
                    existing = db.execute("SELECT data FROM batches WHERE batch_id = ?", (row[1],)).fetchone()
                    if existing is not None:
                        return codec.batch_from_dict(json.loads(existing[0])), False
                db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                    (idempotency.key_hash, idempotency.request_hash, batch.batch_id, idempotency.expires_at),
                )
            db.execute(
                "INSERT INTO batches (batch_id, status, created_at, updated_at, data, owner) VALUES (?, ?, ?, ?, ?, ?)",
                (batch.batch_id, batch.status.value, batch.created_at, batch.updated_at,
                 _dumps(codec.batch_to_dict(batch)), batch.owner),
            )  # fmt: skip
        return batch, True

    def _load_batch(self, db: sqlite3.Connection, batch_id: str) -> Batch:
        row = db.execute("SELECT data FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        return codec.batch_from_dict(json.loads(row[0]))

    def get_batch(self, batch_id: str, *, counted: bool = True) -> Batch:
        # One read transaction: in WAL mode it sees one snapshot, so the batch and its counters agree.
        with self._db.snapshot() as db:
            row = db.execute("SELECT data FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
            if row is None:
                raise NotFound(f"no batch with id {batch_id!r}")
            return codec.batch_from_dict(json.loads(row[0]), self._count(db, batch_id) if counted else None)

    def list_batches(
        self,
        limit: int = 20,
        statuses: frozenset[BatchStatus] | None = None,
        *,
        counted: bool = True,
        owner: str | None = None,
    ) -> list[Batch]:
        where: list[str] = []
        params: list[Any] = []
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(s.value for s in statuses)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._db.read(
            f"SELECT batch_id, data FROM batches {clause}ORDER BY created_at DESC LIMIT ?",  # noqa: S608
            (*params, limit),
        )
        if not counted:
            return [codec.batch_from_dict(json.loads(r["data"])) for r in rows]
        with self._db.snapshot() as db:
            return [codec.batch_from_dict(json.loads(r["data"]), self._count(db, r["batch_id"])) for r in rows]

    def update_batch(self, batch_id: str, change: BatchChange) -> tuple[Batch, bool]:
        with self._db.tx() as db:
            current = self._load_batch(db, batch_id)
            updated = change(current)
            if updated is None:
                return current, False
            db.execute(
                "UPDATE batches SET status = ?, updated_at = ?, data = ? WHERE batch_id = ?",
                (updated.status.value, updated.updated_at, _dumps(codec.batch_to_dict(updated)), batch_id),
            )
        return updated, True

    def counters(self, batch_id: str) -> Counters:
        with self._db.snapshot() as db:
            return self._count(db, batch_id)

    @staticmethod
    def _count(db: sqlite3.Connection, batch_id: str) -> Counters:
        rows = db.execute("SELECT state, COUNT(*) FROM items WHERE batch_id = ? GROUP BY state", (batch_id,))
        return Counters.from_states({ItemState(state): int(n) for state, n in rows})

    def count_active(self, batch_id: str) -> int:
        rows = self._db.read(
            "SELECT COUNT(*) AS n FROM items WHERE batch_id = ? AND state IN ('pending', 'running', 'retrying')",
            (batch_id,),
        )
        return int(rows[0]["n"])

    # --- items -----------------------------------------------------------------------------------------

    def add_items(self, items: Sequence[Item]) -> list[Item]:
        stored: list[Item] = []
        with self._db.tx() as db:
            for item in items:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.batch_id, item.item_id, item.state.value, item.fingerprint, item.dest_key,
                     item.lease_until, item.updated_at, _dumps(codec.item_to_dict(item))),
                )  # fmt: skip
                if cursor.rowcount:
                    stored.append(item)
                    continue
                row = db.execute(
                    "SELECT data FROM items WHERE batch_id = ? AND item_id = ?", (item.batch_id, item.item_id)
                ).fetchone()
                stored.append(codec.item_from_dict(json.loads(row[0])))
        return stored

    def get_item(self, batch_id: str, item_id: str) -> Item:
        rows = self._db.read("SELECT data FROM items WHERE batch_id = ? AND item_id = ?", (batch_id, item_id))
        if not rows:
            raise NotFound(f"no series {item_id!r} in batch {batch_id!r}")
        return codec.item_from_dict(json.loads(rows[0]["data"]))

    def update_item(self, batch_id: str, item_id: str, change: ItemChange) -> tuple[Item, bool]:
        with self._db.tx() as db:
            row = db.execute(
                "SELECT data FROM items WHERE batch_id = ? AND item_id = ?", (batch_id, item_id)
            ).fetchone()
            if row is None:
                raise NotFound(f"no series {item_id!r} in batch {batch_id!r}")
            current = codec.item_from_dict(json.loads(row[0]))
            updated = change(current)
            if updated is None:
                return current, False
            updated = replace(updated, rev=current.rev + 1)
            # The fingerprint changes too: a redrive reads the series again, a superseded success is marked.
            db.execute(
                "UPDATE items SET state = ?, fingerprint = ?, lease_until = ?, updated_at = ?, data = ? "
                "WHERE batch_id = ? AND item_id = ?",
                (updated.state.value, updated.fingerprint, updated.lease_until, updated.updated_at,
                 _dumps(codec.item_to_dict(updated)), batch_id, item_id),
            )  # fmt: skip
        return updated, True

    def list_items(
        self, batch_id: str, states: frozenset[ItemState] | None = None, after: str = "", limit: int = 100
    ) -> list[Item]:
        params: list[Any] = [batch_id, after]
        where = "batch_id = ? AND item_id > ?"
        if states:
            where += f" AND state IN ({','.join('?' * len(states))})"
            params.extend(s.value for s in sorted(states))
        params.append(limit)
        rows = self._db.read(f"SELECT data FROM items WHERE {where} ORDER BY item_id LIMIT ?", params)  # noqa: S608
        return [codec.item_from_dict(json.loads(r["data"])) for r in rows]

    def find_stale(self, now: float, idle_before: float, limit: int = 500) -> list[Item]:
        running = self._db.read(
            "SELECT data FROM items WHERE state = 'running' AND lease_until < ? ORDER BY lease_until LIMIT ?",
            (now, limit),
        )
        idle = self._db.read(
            "SELECT data FROM items WHERE state IN ('pending', 'retrying') AND updated_at < ? "
            "ORDER BY updated_at LIMIT ?",
            (idle_before, limit),
        )
        return [codec.item_from_dict(json.loads(r["data"])) for r in [*running, *idle]]

    def succeeded_fingerprints(self, dest_key: str, fingerprints: Sequence[str]) -> set[str]:
        found: set[str] = set()
        unique = sorted(set(fingerprints))
        for start in range(0, len(unique), 500):
            part = unique[start : start + 500]
            rows = self._db.read(
                f"SELECT DISTINCT fingerprint FROM items WHERE dest_key = ? AND state = 'succeeded' "  # noqa: S608
                f"AND fingerprint IN ({','.join('?' * len(part))})",
                (dest_key, *part),
            )
            found.update(r["fingerprint"] for r in rows)
        return found

    def succeeded_file_counts(self, dest_key: str, item_ids: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        unique = sorted(set(item_ids))
        for start in range(0, len(unique), 500):
            part = unique[start : start + 500]
            rows = self._db.read(
                f"SELECT item_id, MAX(json_extract(data, '$.file_count')) AS n FROM items "  # noqa: S608
                f"WHERE dest_key = ? AND state = 'succeeded' AND item_id IN ({','.join('?' * len(part))}) "
                "GROUP BY item_id",
                (dest_key, *part),
            )
            counts.update({r["item_id"]: int(r["n"]) for r in rows})
        return counts

    def recorded_outputs(self, dest_key: str, item_id: str, layout: str | None = None) -> set[tuple[str, str]]:
        rows = self._db.read(
            "SELECT data FROM items WHERE dest_key = ? AND item_id = ? AND state = 'succeeded'", (dest_key, item_id)
        )
        items = (codec.item_from_dict(json.loads(r["data"])) for r in rows)
        return {(o.name, o.sha256) for i in items if layout in (None, i.layout) for o in i.outputs}

    def find_unretracted(self, limit: int = 500) -> list[Item]:
        rows = self._db.read(
            "SELECT data FROM items WHERE state IN ('dead_lettered', 'skipped') "
            "AND json_extract(data, '$.needs_retraction') ORDER BY updated_at LIMIT ?",
            (limit,),
        )
        return [codec.item_from_dict(json.loads(r["data"])) for r in rows]

    def list_destination_items(self, dest_key: str, after: str = "", limit: int = 200) -> list[Item]:
        batch_after, _, item_after = after.partition("/")
        rows = self._db.read(
            "SELECT data FROM items WHERE dest_key = ? AND state = 'succeeded' "
            "AND json_extract(data, '$.layout') = 'bids' AND (batch_id, item_id) > (?, ?) "
            "ORDER BY batch_id, item_id LIMIT ?",
            (dest_key, batch_after, item_after, limit),
        )
        return [codec.item_from_dict(json.loads(r["data"])) for r in rows]

    def find_unfinished(self, limit: int = 500) -> list[Batch]:
        rows = self._db.read(
            "SELECT data FROM batches WHERE json_extract(data, '$.finish_pending') ORDER BY updated_at LIMIT ?",
            (limit,),
        )
        return [codec.batch_from_dict(json.loads(r["data"])) for r in rows]

    # --- datasets --------------------------------------------------------------------------------------

    def get_dataset(self, dest_key: str) -> Dataset:
        rows = self._db.read("SELECT data FROM datasets WHERE dest_key = ?", (dest_key,))
        return Dataset.from_dict(json.loads(rows[0]["data"])) if rows else Dataset(dest_key)

    def update_dataset(self, dest_key: str, change: Callable[[Dataset], Dataset | None]) -> tuple[Dataset, bool]:
        with self._db.tx() as db:
            row = db.execute("SELECT data FROM datasets WHERE dest_key = ?", (dest_key,)).fetchone()
            current = Dataset.from_dict(json.loads(row[0])) if row else Dataset(dest_key)
            updated = change(current)
            if updated is None:
                return current, False
            db.execute("INSERT OR REPLACE INTO datasets VALUES (?, ?)", (dest_key, _dumps(updated.to_dict())))
        return updated, True

    # --- expansion scratch ---------------------------------------------------------------------------

    def put_chunks(self, chunks: Sequence[ExpansionChunk]) -> None:
        with self._db.tx() as db:
            for chunk in chunks:
                db.execute(
                    "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)",
                    (chunk.batch_id, chunk.listing, chunk.chunk_no, int(chunk.results is not None),
                     _dumps(codec.chunk_to_dict(chunk))),
                )  # fmt: skip

    def get_chunk(self, batch_id: str, listing: str, chunk_no: int) -> ExpansionChunk:
        rows = self._db.read(
            "SELECT data FROM chunks WHERE batch_id = ? AND listing = ? AND chunk_no = ?", (batch_id, listing, chunk_no)
        )
        if not rows:
            raise NotFound(f"no expansion chunk {chunk_no} for batch {batch_id!r}")
        return codec.chunk_from_dict(json.loads(rows[0]["data"]))

    def put_chunk_results(self, batch_id: str, listing: str, chunk_no: int, results: Sequence[ScanResult]) -> None:
        with self._db.tx() as db:
            row = db.execute(
                "SELECT data FROM chunks WHERE batch_id = ? AND listing = ? AND chunk_no = ?",
                (batch_id, listing, chunk_no),
            ).fetchone()
            if row is None:
                raise NotFound(f"no expansion chunk {chunk_no} for batch {batch_id!r}")
            data = json.loads(row[0])
            data["results"] = [codec.scan_to_dict(r) for r in results]
            data["scanned"] = True
            db.execute(
                "UPDATE chunks SET scanned = 1, data = ? WHERE batch_id = ? AND listing = ? AND chunk_no = ?",
                (_dumps(data), batch_id, listing, chunk_no),
            )

    def list_chunks(self, batch_id: str, listing: str) -> Iterator[ExpansionChunk]:
        rows = self._db.read(
            "SELECT data FROM chunks WHERE batch_id = ? AND listing = ? ORDER BY chunk_no", (batch_id, listing)
        )
        return (codec.chunk_from_dict(json.loads(r["data"])) for r in rows)

    def unscanned_chunks(self, batch_id: str, listing: str) -> list[int]:
        rows = self._db.read(
            "SELECT chunk_no FROM chunks WHERE batch_id = ? AND listing = ? AND scanned = 0 ORDER BY chunk_no",
            (batch_id, listing),
        )
        return [int(r["chunk_no"]) for r in rows]

    def count_unscanned_chunks(self, batch_id: str, listing: str) -> int:
        rows = self._db.read(
            "SELECT COUNT(*) AS n FROM chunks WHERE batch_id = ? AND listing = ? AND scanned = 0", (batch_id, listing)
        )
        return int(rows[0]["n"])

    def delete_chunks(self, batch_id: str, keep: str | None = None) -> None:
        with self._db.tx() as db:
            db.execute(
                "DELETE FROM chunks WHERE batch_id = ? AND listing != ?",
                (batch_id, "" if keep is None else keep),
            )

    # --- Drive watch channels ----------------------------------------------------------------------------

    def put_channel(self, channel: WatchChannel) -> None:
        with self._db.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO channels VALUES (?, ?, ?)",
                (channel.channel_id, int(channel.active), _dumps(codec.channel_to_dict(channel))),
            )

    def get_channel(self, channel_id: str) -> WatchChannel | None:
        rows = self._db.read("SELECT data FROM channels WHERE channel_id = ?", (channel_id,))
        return codec.channel_from_dict(json.loads(rows[0]["data"])) if rows else None

    def list_channels(self, active_only: bool = True) -> list[WatchChannel]:
        rows = self._db.read("SELECT data FROM channels WHERE active >= ?", (1 if active_only else 0,))
        return [codec.channel_from_dict(json.loads(r["data"])) for r in rows]

    def update_channel(
        self, channel_id: str, change: Callable[[WatchChannel], WatchChannel | None]
    ) -> tuple[WatchChannel, bool]:
        with self._db.tx() as db:
            row = db.execute("SELECT data FROM channels WHERE channel_id = ?", (channel_id,)).fetchone()
            if row is None:
                raise NotFound(f"no watch channel {channel_id!r}")
            current = codec.channel_from_dict(json.loads(row[0]))
            updated = change(current)
            if updated is None:
                return current, False
            db.execute(
                "UPDATE channels SET active = ?, data = ? WHERE channel_id = ?",
                (int(updated.active), _dumps(codec.channel_to_dict(updated)), channel_id),
            )
        return updated, True

    def touch_pending_folder(self, folder_id: str, watch_folder_id: str, now: float) -> PendingFolder:
        with self._db.tx() as db:
            row = db.execute("SELECT data FROM pending_folders WHERE folder_id = ?", (folder_id,)).fetchone()
            if row is None or json.loads(row[0]).get("submitted_batch_id"):
                folder = PendingFolder(folder_id, watch_folder_id, first_change_at=now, last_change_at=now)
            else:
                old = codec.pending_from_dict(json.loads(row[0]))
                folder = PendingFolder(folder_id, watch_folder_id, old.first_change_at, max(old.last_change_at, now))
            db.execute(
                "INSERT OR REPLACE INTO pending_folders VALUES (?, ?, 0, ?)",
                (folder_id, folder.last_change_at, _dumps(codec.pending_to_dict(folder))),
            )
        return folder

    def list_pending_folders(self, quiet_since: float) -> list[PendingFolder]:
        rows = self._db.read(
            "SELECT data FROM pending_folders WHERE submitted = 0 AND last_change_at <= ? ORDER BY last_change_at",
            (quiet_since,),
        )
        return [codec.pending_from_dict(json.loads(r["data"])) for r in rows]

    def mark_folder_submitted(self, folder_id: str, last_change_at: float, batch_id: str) -> bool:
        with self._db.tx() as db:
            row = db.execute("SELECT data FROM pending_folders WHERE folder_id = ?", (folder_id,)).fetchone()
            if row is None:
                return False
            folder = codec.pending_from_dict(json.loads(row[0]))
            if folder.submitted_batch_id or folder.last_change_at > last_change_at:
                return False
            done = PendingFolder(folder_id, folder.watch_folder_id, folder.first_change_at,
                                 folder.last_change_at, submitted_batch_id=batch_id)  # fmt: skip
            db.execute(
                "UPDATE pending_folders SET submitted = 1, data = ? WHERE folder_id = ?",
                (_dumps(codec.pending_to_dict(done)), folder_id),
            )
        return True
