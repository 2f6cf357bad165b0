"""Expansion: turn a batch's sources into one item (and one convert task) per DICOM series.

Three idempotent steps, each a task, so any of them may be delivered twice, late, or retried:
1. `list`  — list every source recursively and cut the file list into chunks (stored, not in task
   bodies: Cloud Tasks bodies are limited to 100 KB; sized by bytes, not count, so a chunk document stays
   under Firestore's 1 MiB whatever the path lengths). A source that fits in one chunk is scanned and
   grouped right away; a larger one fans out. A repeated `list` of the same epoch reuses the stored
   chunks: re-listing could cut them differently and orphan scan results.
2. `scan`  — read the headers of one chunk's files (prefixes only) and store the results. The task
   that stores the last missing results enqueues `group`.
3. `group` — group all results into series, fingerprint them, skip those already converted into the
   same destination, create the items, enqueue a convert task for every item *stored* as pending (a
   repeated group acts on what the first one stored, not on what it recomputes), then mark the batch
   running.

Every step belongs to the batch's expansion epoch and does nothing once the epoch moved on. A step that
keeps failing transiently is not turned into a failed batch (its items may already exist): the batch
stays `expanding`, and the reconciler restarts the expansion in a new epoch once it has been idle for the
expand queue's whole retry window (giving up after MAX_RESTARTS). Permanent errors fail the batch at once.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dicomflow.domain import model
from dicomflow.domain.bids_labels import labels_of_series
from dicomflow.domain.failures import DicomflowError, InvalidInput, PermanentError
from dicomflow.domain.layout import Layout
from dicomflow.domain.locations import LocationKind
from dicomflow.domain.model import Batch, BatchStatus, ItemState
from dicomflow.domain.paths import decode_component, display, encode_component, join, split
from dicomflow.domain.series import DicomHeader, FileRef, Ignored, SeriesGroup, fingerprint, group_series
from dicomflow.events import Event
from dicomflow.ports import Attempt, ExpansionChunk, SkippedFile
from dicomflow.services.access import listing_guard
from dicomflow.services.context import Context, event
from dicomflow.services.outputs import finalize
from dicomflow.services.progress import maybe_complete
from dicomflow.services.task_names import convert_task, finish_task, group_task, scan_task

MIN_CHUNK = 64
IGNORED_EXAMPLES = 20
# A chunk document holds its files and, once scanned, a result per file (about as large again): keep
# the files of one chunk well under half of Firestore's 1 MiB per document (GCP_FACTS gotcha 24).
CHUNK_FILE_BYTES = 300 * 1024
ITEMS_PER_CALL_BYTES = 2 * 1024 * 1024
ALREADY_CONVERTED = "already converted into this destination (same files, same converter, same options)"
STEPS = ("list", "scan", "group", "redrive", "cancel", "finish")


@dataclass(frozen=True, slots=True)
class ExpandPayload:
    batch_id: str
    step: str
    chunk_no: int = 0
    epoch: int = 0
    completion: int = 0  # finish steps: the batch completion it finishes

    @classmethod
    def parse(cls, payload: object) -> ExpandPayload:
        if not isinstance(payload, dict):
            raise InvalidInput("task body must be a JSON object", field="body")
        batch_id = payload.get("batch_id")
        step = payload.get("step")
        chunk_no = payload.get("chunk_no", 0)
        epoch = payload.get("epoch", 0)
        completion = payload.get("completion", 0)
        if not isinstance(batch_id, str) or not batch_id:
            raise InvalidInput("batch_id must be a non-empty string", field="batch_id")
        if step not in STEPS:
            raise InvalidInput(f"step must be one of {', '.join(STEPS)}", field="step")
        for name, value in (("chunk_no", chunk_no), ("epoch", epoch), ("completion", completion)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"{name} must be a non-negative integer", field=name)
        return cls(batch_id, str(step), chunk_no, epoch, completion)


def handle_expand(ctx: Context, payload: ExpandPayload, attempt: Attempt) -> None:
    """Run one expansion step of the batch's current epoch. A permanent error fails the batch with the
    reason; transient errors propagate so the queue retries the step (see the module docstring for what
    happens when its retries run out)."""
    batch = ctx.store.get_batch(payload.batch_id, counted=False)
    if batch.status is not BatchStatus.EXPANDING or batch.epoch != payload.epoch:
        return  # a duplicate or late delivery: expansion finished, was restarted, or the batch was cancelled
    try:
        if payload.step == "list":
            _list(ctx, batch)
        elif payload.step == "scan":
            _scan(ctx, batch, payload.chunk_no, group_inline=False)
        else:
            _group(ctx, batch)
    except DicomflowError as exc:
        if exc.permanent:
            fail_expansion(ctx, batch, exc)
            return
        raise


def fail_expansion(ctx: Context, batch: Batch, exc: DicomflowError) -> None:
    """The batch cannot be expanded: it fails with the reason, and any series a partial expansion already
    created are skipped with it, so no series of a failed batch waits for a conversion."""
    failed, changed = ctx.store.update_batch(
        batch.batch_id, lambda b: model.fail_batch(b, ctx.clock(), exc.to_failure())
    )
    if not changed:
        return
    event(
        Event.BATCH_FAILED,
        f"batch could not be expanded: {exc.reason}",
        severity=logging.ERROR,
        batch_id=batch.batch_id,
        code=exc.code,
    )
    reason = f"the batch failed before this series was converted: {exc.reason}"
    while page := ctx.store.list_items(batch.batch_id, frozenset({ItemState.PENDING, ItemState.RETRYING})):
        for item in page:
            finalize(ctx, batch.batch_id, item.item_id, lambda i: model.cancel_item(i, ctx.clock(), reason))
        if len(page) < 100:
            break
    ctx.store.delete_chunks(failed.batch_id)
    ctx.queue.enqueue([finish_task(failed)])  # its report says why it failed (the reconciler resends a lost one)


def source_prefixes(ctx: Context, batch: Batch) -> list[str]:
    """With several sources, outputs go under a folder named after each source (made unique)."""
    if len(batch.sources) == 1:
        return [""]
    names: list[str] = []
    for source in batch.sources:
        name = encode_component(ctx.source_for(source).check(source)) or "source"
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names


def _ref_bytes(ref: FileRef) -> int:
    return len(json.dumps(ref.to_dict(), separators=(",", ":")).encode()) + 16


def cut_chunks(files: Sequence[FileRef], parallelism: int, maximum: int) -> list[tuple[FileRef, ...]]:
    """Chunks small enough that every scanner gets work and every chunk document fits its byte budget,
    large enough that tasks are not mostly overhead."""
    target = max(MIN_CHUNK, min(maximum, -(-len(files) // max(1, parallelism * 2))))
    chunks: list[tuple[FileRef, ...]] = []
    current: list[FileRef] = []
    size = 0
    for ref in files:
        ref_size = _ref_bytes(ref)
        if current and (len(current) >= target or size + ref_size > CHUNK_FILE_BYTES):
            chunks.append(tuple(current))
            current, size = [], 0
        current.append(ref)
        size += ref_size
    return [*chunks, tuple(current)] if current or not chunks else chunks


def _list(ctx: Context, batch: Batch) -> None:
    epoch = batch.epoch
    if not batch.listing:
        listing = f"e{epoch}-{ctx.new_id(4)}"
        files: list[FileRef] = []
        skipped: list[SkippedFile] = []
        guard = listing_guard(ctx, batch)  # the owner's file and byte limits, counted per listed file
        for source, prefix in zip(batch.sources, source_prefixes(ctx, batch), strict=True):
            for entry in guard.each(ctx.source_for(source).list_files(source)):
                if isinstance(entry, SkippedFile):
                    skipped.append(SkippedFile(join(prefix, entry.path), entry.ignored))
                else:
                    files.append(FileRef(entry.ref, join(prefix, entry.path), entry.size, entry.md5))
        files.sort(key=lambda f: f.path)
        parts = cut_chunks(files, ctx.scan_parallelism, ctx.settings.expand_chunk_files)
        chunks = [
            ExpansionChunk(batch.batch_id, n, part, tuple(skipped) if n == 0 else (), listing=listing)
            for n, part in enumerate(parts)
        ]
        ctx.store.put_chunks(chunks)
        # The first listing recorded wins; a concurrent duplicate's chunks (and an older epoch's) are never
        # read, and are removed here.
        batch, _ = ctx.store.update_batch(
            batch.batch_id, lambda b: model.list_done(b, ctx.clock(), epoch, listing, len(chunks))
        )
        if batch.epoch != epoch or batch.status is not BatchStatus.EXPANDING:
            return
        ctx.store.delete_chunks(batch.batch_id, keep=batch.listing)
    if batch.listed_chunks == 1:
        _scan(ctx, batch, 0, group_inline=True)
        return
    unscanned = ctx.store.unscanned_chunks(batch.batch_id, batch.listing)
    if unscanned:
        ctx.queue.enqueue([scan_task(batch.batch_id, epoch, n) for n in unscanned])
    else:
        ctx.queue.enqueue([group_task(batch.batch_id, epoch)])


def _scan(ctx: Context, batch: Batch, chunk_no: int, *, group_inline: bool) -> None:
    epoch, listing = batch.epoch, batch.listing
    if not listing:
        return  # a scan task can only exist once its listing was recorded; nothing to do otherwise
    chunk = ctx.store.get_chunk(batch.batch_id, listing, chunk_no)
    if chunk.results is None:
        # All sources of a batch are of one kind (checked at submission) and file refs carry the rest.
        location = batch.sources[0]
        results = ctx.scanner_for(location).scan(ctx.source_for(location), chunk.files)
        ctx.store.put_chunk_results(batch.batch_id, listing, chunk_no, results)
        ctx.store.update_batch(batch.batch_id, lambda b: model.expansion_progress(b, ctx.clock(), epoch))
    if group_inline:
        _group(ctx, batch)
    elif ctx.store.count_unscanned_chunks(batch.batch_id, listing) == 0:
        ctx.queue.enqueue([group_task(batch.batch_id, epoch)])


def _group(ctx: Context, batch: Batch) -> None:
    epoch = batch.epoch
    if not batch.listing or ctx.store.unscanned_chunks(batch.batch_id, batch.listing):
        return  # the last scan task enqueues group again
    ignored: Tally[str] = Tally()
    examples: list[str] = []
    counts = {"files": 0, "chunks": 0}
    # Examples of skipped files name them by path only where the state stays on the user's machine; in
    # the cloud by Drive id (a source file name may carry the patient's name: docs/privacy.md).
    by_path = batch.sources[0].kind is LocationKind.LOCAL

    def scanned() -> Iterator[tuple[FileRef, DicomHeader]]:
        # The chunks stream in a page at a time and each file's header is folded into its series at
        # once: a 10,000-series batch of 200 files per series never holds two million headers.
        for chunk in ctx.store.list_chunks(batch.batch_id, batch.listing):
            counts["chunks"] += 1
            for skipped in chunk.skipped:
                ignored[skipped.ignored.kind.value] += 1
                counts["files"] += 1
                if len(examples) < IGNORED_EXAMPLES and by_path:
                    examples.append(f"{display(skipped.path)} ({skipped.ignored.kind.value})")
            for ref, result in zip(chunk.files, chunk.results or (), strict=True):
                counts["files"] += 1
                if isinstance(result, Ignored):
                    ignored[result.kind.value] += 1
                    if len(examples) < IGNORED_EXAMPLES:
                        name = display(ref.path) if by_path else f"Drive file {ref.ref}"
                        examples.append(f"{name} ({result.kind.value})")
                else:
                    yield ref, result

    groups = group_series(scanned())
    if counts["chunks"] != batch.listed_chunks:
        return  # chunks of this listing are missing (not written yet): never group part of a source
    files_seen = counts["files"]
    if len(groups) > ctx.settings.max_batch_series:
        raise PermanentError(
            f"the source holds {len(groups)} series, more than the maximum of {ctx.settings.max_batch_series} "
            "per batch; submit its sub-folders as separate batches"
        )
    # --layout bids: labels from the source folders (a bad one fails the batch now, naming every folder).
    labels = series_labels(batch.layout, groups) if batch.layout.is_bids else {}
    # A BIDS dataset is made from its own conversions: a series converted into the destination by a mirror
    # batch is converted again (its outputs are staged and placed, not mirrored).
    version = ctx.conversion_version + ("+bids" if batch.layout.is_bids else "")
    fps = [fingerprint(g.key, g.sop_instance_uids, version, batch.options) for g in groups]
    already = set() if batch.force else ctx.store.succeeded_fingerprints(batch.destination.key, fps)
    # A re-run never makes outputs worse: a series that now has fewer files than when it last converted
    # into this destination (a file gone missing, an upload still running) is reported, not converted
    # over the good outputs; `force` converts it anyway.
    fewer = (
        {}
        if batch.force
        else ctx.store.succeeded_file_counts(
            batch.destination.key, [g.key.item_id for g, fp in zip(groups, fps, strict=True) if fp not in already]
        )
    )
    now = ctx.clock()
    items = [
        model.new_item(
            batch, group, fp, now, skip_reason=_skip_reason(group, fp, already, fewer),
            labels=labels.get(group.key.item_id, ("", "")),
        )
        for group, fp in zip(groups, fps, strict=True)
    ]  # fmt: skip
    for part in _slices(items):
        stored = ctx.store.add_items(part)
        # Enqueue before marking the batch running: if this step dies in between, its redelivery finds
        # the batch still expanding and enqueues again (task names are deterministic; repeats are no-ops).
        ctx.queue.enqueue([convert_task(i) for i in stored if i.state is ItemState.PENDING])
    _, changed = ctx.store.update_batch(
        batch.batch_id,
        lambda b: model.finish_expansion(
            b, ctx.clock(), files_seen, sum(ignored.values()), tuple(examples), epoch=epoch
        ),
    )
    if changed:
        ctx.store.delete_chunks(batch.batch_id)
        event(
            Event.BATCH_EXPANDED,
            "batch expanded into series",
            batch_id=batch.batch_id,
            series=len(items),
            already_converted=len(already),
            files_seen=files_seen,
            files_ignored=sum(ignored.values()),
            ignored_by_kind=dict(ignored),
        )
    maybe_complete(ctx, batch.batch_id)


def series_labels(layout: Layout, groups: Sequence[SeriesGroup]) -> dict[str, tuple[str, str]]:
    """Subject and session of each series (item id → (subject, session), "" where none), from its source
    folders by name — known here, and nowhere later: items keep no source path — checked against the
    same folders scrubbed of the series' identifiers (`group.rel_dir`), which is how errors name them."""
    folders: dict[str, tuple[list[str], list[str]]] = {}
    for group in groups:
        dirs = [posixpath.dirname(f.path) for f in group.files]
        common = dirs[0] if len(set(dirs)) == 1 else (posixpath.commonpath(dirs) if all(dirs) else "")
        raw = [decode_component(c) for c in split(common)]
        folders[group.key.item_id] = (raw, [decode_component(c) for c in split(group.rel_dir)])
    found = labels_of_series(folders, layout.policy())
    return {key: (labels.subject, labels.session or "") for key, labels in found.items() if labels is not None}


def _skip_reason(group: SeriesGroup, fp: str, already: set[str], before: dict[str, int]) -> str:
    if fp in already:
        return ALREADY_CONVERTED
    had = before.get(group.key.item_id, 0)
    if had > len(group.files):
        return (
            f"{len(group.files)} files now, {had} when this series last converted into this destination: not "
            "converted over the good outputs (a file may be missing from the source, or still uploading). "
            "Restore the missing files, or convert again with --force (API: force) to replace the outputs."
        )
    return ""


def _slices(items: Sequence[model.Item]) -> list[list[model.Item]]:
    """Items in calls of bounded size (the store splits further by its own request limits)."""
    slices: list[list[model.Item]] = [[]]
    size = 0
    for item in items:
        item_size = sum(_ref_bytes(f) for f in item.files) + 1024
        if slices[-1] and size + item_size > ITEMS_PER_CALL_BYTES:
            slices.append([])
            size = 0
        slices[-1].append(item)
        size += item_size
    return [s for s in slices if s]
