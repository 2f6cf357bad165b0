"""A destination as a dataset: the files it holds that belong to no single series, and its one writer.

`report.html` (every layout) and, for `--layout bids`, the top-level files (dataset_description.json,
participants.tsv, scans.tsv, ...) are written by the finish step of a batch (services/finish.py), never
by the workers. Two batches finishing into one destination at once must not interleave their writes:
the finish step holds the destination's lease while it places outputs and writes these files — one
writer per destination, whatever the number of batches, workers or duplicated task deliveries. The lease
expires (a writer that died), is renewed by a heartbeat while the writer works, and every write the
writer records is conditional on still holding it.

`files` records what the dataset owns (name → SHA-256, shortened: one record per destination must stay
small whatever the number of sessions); `writing` what the writer is about to write, recorded before it
writes, so a writer that dies between writing and recording still recognises its own file next time. A
file whose content is neither (a user edited dataset_description.json to add Authors) is the user's
and is left alone.

The series' own files are placed by the same writer: `begin_placement`, `placed` and `superseded` are
the item transitions it makes (recorded before and after the files move).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from dicomflow.domain.model import Item, ItemState, OutputFile

DIGEST_CHARS: Final = 16  # 64 bits of SHA-256: enough to tell our file from an edited one


def short_digest(sha256: str) -> str:
    return sha256[:DIGEST_CHARS]


@dataclass(frozen=True, slots=True)
class Dataset:
    dest_key: str
    files: tuple[tuple[str, str], ...] = ()  # (name, short SHA-256), sorted
    # (name, short SHA-256) of every write begun since the last recorded one: an attempt that died after
    # writing left one of these on disk, and a later attempt may want other content for the same name.
    writing: tuple[tuple[str, str], ...] = ()
    lease_owner: str = ""
    lease_until: float | None = None
    updated_at: float = 0.0

    def owns(self, name: str, sha256: str) -> bool:
        """Whether the file `name` with this content is one the dataset wrote (or was about to write)."""
        digest = short_digest(sha256)
        return dict(self.files).get(name) == digest or (name, digest) in self.writing

    def held_by(self, owner: str, now: float) -> bool:
        return self.lease_owner == owner and self.lease_until is not None and self.lease_until > now

    def to_dict(self) -> dict[str, Any]:
        return {
            "dest_key": self.dest_key,
            "files": dict(self.files),
            "writing": [{"name": n, "digest": d} for n, d in self.writing],
            "lease_owner": self.lease_owner,
            "lease_until": self.lease_until,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dataset:
        until = data.get("lease_until")
        return cls(
            dest_key=str(data["dest_key"]),
            files=tuple(sorted((str(k), str(v)) for k, v in (data.get("files") or {}).items())),
            writing=tuple(sorted((str(w["name"]), str(w["digest"])) for w in data.get("writing") or ())),
            lease_owner=str(data.get("lease_owner") or ""),
            lease_until=None if until is None else float(until),
            updated_at=float(data.get("updated_at") or 0.0),
        )


def take(dataset: Dataset, owner: str, now: float, seconds: float) -> Dataset | None:
    """The writer's lease: free, expired, or already this owner's."""
    if dataset.lease_owner and dataset.lease_owner != owner and (dataset.lease_until or 0.0) > now:
        return None
    return replace(dataset, lease_owner=owner, lease_until=now + seconds, updated_at=now)


def renew(dataset: Dataset, owner: str, now: float, seconds: float) -> Dataset | None:
    if not dataset.held_by(owner, now):
        return None
    return replace(dataset, lease_until=now + seconds, updated_at=now)


def release(dataset: Dataset, owner: str, now: float) -> Dataset | None:
    if dataset.lease_owner != owner:
        return None
    return replace(dataset, lease_owner="", lease_until=None, updated_at=now)


def will_write(dataset: Dataset, owner: str, pending: Mapping[str, str], now: float) -> Dataset | None:
    """Record what the writer is about to write (name → SHA-256), before it writes."""
    if not dataset.held_by(owner, now):
        return None
    merged = set(dataset.writing) | {(name, short_digest(sha)) for name, sha in pending.items()}
    return replace(dataset, writing=tuple(sorted(merged)), updated_at=now)


def wrote(
    dataset: Dataset, owner: str, written: Mapping[str, str], removed: frozenset[str], now: float
) -> Dataset | None:
    """The writer wrote `written` (name → SHA-256) and removed `removed`: the dataset owns exactly that."""
    if not dataset.held_by(owner, now):
        return None
    files = {n: d for n, d in dataset.files if n not in removed} | {n: short_digest(s) for n, s in written.items()}
    return replace(dataset, files=tuple(sorted(files.items())), writing=(), updated_at=now)


def free(dataset: Dataset, now: float) -> Dataset | None:
    """Local mode at start-up: no other process can be writing (the state file is locked), so a lease left
    by a killed run is void."""
    if not dataset.lease_owner:
        return None
    return replace(dataset, lease_owner="", lease_until=None, updated_at=now)


# --- a series' files placed under their BIDS names (the finish step, one writer per destination) -----


def begin_placement(item: Item, targets: tuple[OutputFile, ...], now: float) -> Item | None:
    """Record where each output of a succeeded series is about to go (before any file moves)."""
    if item.state is not ItemState.SUCCEEDED or item.placing or targets == item.outputs:
        return None
    return replace(item, placing=targets, updated_at=now)


def placed(
    item: Item,
    placing: tuple[OutputFile, ...],
    done: tuple[OutputFile, ...],
    extras: Mapping[str, Mapping[str, object]],
    now: float,
) -> Item | None:
    """Every output is at the place recorded in `placing`: the series records them as they are now
    (`done`, as the sink names them), and the sidecar keys its rules added (kept for the next writes)."""
    if item.state is not ItemState.SUCCEEDED or not placing or item.placing != placing:
        return None
    facts = replace(item.facts, extras={k: dict(v) for k, v in extras.items()})
    return replace(item, outputs=done, placing=(), facts=facts, updated_at=now)


def superseded(item: Item, now: float) -> Item | None:
    """A later conversion of the same series into the same destination holds its place now: this record
    no longer claims any file there (the older files were replaced or removed first)."""
    if item.state is not ItemState.SUCCEEDED or not (item.outputs or item.placing):
        return None
    return replace(item, outputs=(), placing=(), updated_at=now)
