"""Enforcing access (issue 11): whose batches a caller sees, which folders they may use, how much they may
submit. The rules are in domain/access.py; this module applies them with the state store and Drive.

Folders: a Drive source or destination must be one of the caller's granted roots or lie below one,
which is decided by walking the folder's `parents` up to the root of its drive (at most Drive's 100
nesting levels, GCP_FACTS §1), each lookup cached for a few minutes per process. Anything else is
refused with 403 naming only the caller's own roots, *before* the folder is opened: the answer is the
same whether the folder exists, is someone else's or is not shared with dicomflow at all, and no name of
a file the caller may not access ever reaches them. Local paths (the dev stack) must resolve, symlinks
followed, inside both the stack's roots and the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dicomflow.auth import LOCAL_CALLER
from dicomflow.domain.access import Caller, Limits, can_see, describe_roots, local_path_inside
from dicomflow.domain.failures import DicomflowError, Forbidden, NotFound, QuotaExceeded
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import BATCH_FINAL, Batch, BatchStatus
from dicomflow.domain.series import FileRef
from dicomflow.ports import FileInfo, SkippedFile, WatchChannel
from dicomflow.services.context import Context

MAX_DEPTH = 100  # Drive's folder nesting limit (GCP_FACTS §1)
PARENTS_TTL_SECONDS = 300.0  # a moved folder is seen in its new place within five minutes
UNFINISHED = frozenset(set(BatchStatus) - BATCH_FINAL)


# --- seeing batches and watches -------------------------------------------------------------------------


def not_found(batch_id: str) -> NotFound:
    """Exactly what the store says for an unknown id: someone else's batch must look the same."""
    return NotFound(f"no batch with id {batch_id!r}")


def visible_batch(ctx: Context, caller: Caller, batch_id: str, *, counted: bool = True) -> Batch:
    batch = ctx.store.get_batch(batch_id, counted=counted)
    if not can_see(caller, batch.owner):
        raise not_found(batch_id)
    return batch


def visible_batches(ctx: Context, caller: Caller, limit: int) -> list[Batch]:
    if caller.admin:
        return ctx.store.list_batches(limit=limit)
    return ctx.store.list_batches(limit=limit, owner=caller.owner)


def visible_channel(ctx: Context, caller: Caller, channel_id: str) -> WatchChannel:
    channel = ctx.store.get_channel(channel_id)
    if channel is None or not can_see(caller, channel.owner):
        raise NotFound(f"no watch channel {channel_id!r}")
    return channel


# --- folders --------------------------------------------------------------------------------------------


def check_locations(ctx: Context, caller: Caller, fields: Sequence[tuple[str, Location]]) -> None:
    """Forbidden unless every (field, location) lies inside the caller's roots."""
    if caller is LOCAL_CALLER:
        return  # local mode: one user on their own machine (only LocalAuthenticator answers this caller)
    roots = ctx.settings.access_policy.roots(caller.email)
    for name, location in fields:
        if not _inside_any(ctx, location, roots):
            raise Forbidden(
                f"{location.uri} is not inside the folders granted to you ({describe_roots(roots)}); "
                "ask an administrator to grant it",
                field=name,
            )


def _inside_any(ctx: Context, location: Location, roots: Sequence[Location]) -> bool:
    candidates = [r for r in roots if r.kind is location.kind]
    if not candidates:
        return False
    if location.kind is LocationKind.LOCAL:
        path = ctx.resolve_path(location.ref)
        stack_roots = [ctx.resolve_path(r) for r in _items(ctx.settings.local_roots)]
        if not any(local_path_inside(path, r) for r in stack_roots):
            return False
        return any(local_path_inside(path, ctx.resolve_path(r.ref)) for r in candidates)
    wanted = {r.ref for r in candidates}
    return _reaches(ctx, location.ref, wanted)


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _reaches(ctx: Context, folder_id: str, roots: set[str]) -> bool:
    """Whether a root is the folder or one of its ancestors (breadth-first over `parents`)."""
    frontier, seen = [folder_id], set()
    for _ in range(MAX_DEPTH + 1):
        if not frontier:
            return False
        if roots.intersection(frontier):
            return True
        seen.update(frontier)
        following: list[str] = []
        for current in frontier:
            info = _info(ctx, current)
            if info is None or info.trashed:
                continue
            following.extend(p for p in info.parents if p not in seen)
        frontier = following
    return False


def _info(ctx: Context, file_id: str) -> FileInfo | None:
    cache: dict[str, tuple[float, FileInfo | None]] = ctx.cache("access.parents")
    now = time.monotonic()
    hit = cache.get(file_id)
    if hit is not None and now - hit[0] < PARENTS_TTL_SECONDS:
        return hit[1]
    try:
        info: FileInfo | None = ctx.changes().file_info(file_id)
    except DicomflowError as exc:
        if not exc.permanent:
            raise  # Drive is unavailable: the request is answered 503 and may be repeated
        info = None  # not found or not shared with dicomflow: no way up from here
    cache[file_id] = (now, info)
    return info


# --- limits ---------------------------------------------------------------------------------------------


def limits_of(ctx: Context, owner: str) -> Limits:
    """The owner's limits; none for batches without an owner (local runs and operators' tools)."""
    if not owner:
        return Limits()
    return ctx.settings.access_policy.limits(owner)


def check_unfinished(ctx: Context, caller: Caller) -> None:
    """At most `max_unfinished_batches` batches of one submitter not yet final. Two submissions racing for
    the last place can both pass: the limit bounds load and is not an exact quota."""
    limit = limits_of(ctx, caller.owner).max_unfinished_batches
    if not limit:
        return
    unfinished = ctx.store.list_batches(limit=limit, statuses=UNFINISHED, counted=False, owner=caller.owner)
    if len(unfinished) >= limit:
        raise QuotaExceeded(
            f"you have {len(unfinished)} unfinished batches, the most allowed at once; wait for one to finish "
            "or cancel one (POST /batches/{id}:cancel)"
        )


@dataclass
class ListingGuard:
    """Counts a batch's files as its sources are listed and stops the listing at the first file over a
    limit, so an oversized source fails early instead of after a scan of everything (issue 11)."""

    limits: Limits
    files: int = 0
    bytes: int = 0
    _over: str = field(default="", init=False)

    def admit(self, entry: FileRef | SkippedFile) -> None:
        self.files += 1
        if isinstance(entry, FileRef):
            self.bytes += max(0, entry.size)
        if self.limits.max_batch_files and self.files > self.limits.max_batch_files:
            raise QuotaExceeded(
                f"the source holds more than {self.limits.max_batch_files} files, the most one batch of yours "
                "may list; submit its sub-folders as separate batches"
            )
        if self.limits.max_batch_bytes and self.bytes > self.limits.max_batch_bytes:
            raise QuotaExceeded(
                f"the source holds more than {_size(self.limits.max_batch_bytes)}, the most one batch of yours "
                "may list; submit its sub-folders as separate batches"
            )

    def each(self, entries: Iterator[FileRef | SkippedFile]) -> Iterator[FileRef | SkippedFile]:
        for entry in entries:
            self.admit(entry)
            yield entry


def listing_guard(ctx: Context, batch: Batch) -> ListingGuard:
    """The hook services/expand.py calls while listing a batch's sources."""
    return ListingGuard(limits_of(ctx, batch.owner))


def _size(n: int) -> str:
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
