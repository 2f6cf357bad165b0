"""Expansion: turn a batch's sources into one item (and one convert task) per DICOM series.

Three idempotent steps, each a task, so any of them may be delivered twice or retried:
1. `list`  — list every source recursively and cut the file list into chunks (stored, not in task
   bodies: Cloud Tasks bodies are limited to 100 KB). A source that fits in one chunk is scanned and
   grouped right away; a larger one fans out.
2. `scan`  — read the headers of one chunk's files (prefixes only) and store the results. The task
   that stores the last missing results enqueues `group`.
3. `group` — group all results into series, fingerprint them, skip those already converted into the
   same destination, create the items and enqueue their convert tasks, then mark the batch running.
"""

from __future__ import annotations

import logging
import math
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass

from dicomflow.domain import model
from dicomflow.domain.failures import DicomflowError, InvalidInput, PermanentError
from dicomflow.domain.model import Batch, BatchStatus, ItemState
from dicomflow.domain.paths import display, encode_component, join
from dicomflow.domain.retry import CONTROL_POLICY
from dicomflow.domain.series import DicomHeader, FileRef, Ignored, fingerprint, group_series
from dicomflow.events import Event
from dicomflow.ports import Attempt, ExpansionChunk, QueueName, SkippedFile, Task
from dicomflow.services.context import Context, event
from dicomflow.services.progress import maybe_complete

MIN_CHUNK = 64
IGNORED_EXAMPLES = 20
ALREADY_CONVERTED = "already converted into this destination (same files, same converter, same options)"


@dataclass(frozen=True, slots=True)
class ExpandPayload:
    batch_id: str
    step: str
    chunk_no: int = 0

    STEPS = ("list", "scan", "group")

    @classmethod
    def parse(cls, payload: object) -> ExpandPayload:
        if not isinstance(payload, dict):
            raise InvalidInput("task body must be a JSON object", field="body")
        batch_id = payload.get("batch_id")
        step = payload.get("step")
        chunk_no = payload.get("chunk_no", 0)
        if not isinstance(batch_id, str) or not batch_id:
            raise InvalidInput("batch_id must be a non-empty string", field="batch_id")
        if step not in cls.STEPS:
            raise InvalidInput(f"step must be one of {', '.join(cls.STEPS)}", field="step")
        if not isinstance(chunk_no, int) or isinstance(chunk_no, bool) or chunk_no < 0:
            raise InvalidInput("chunk_no must be a non-negative integer", field="chunk_no")
        return cls(batch_id, str(step), chunk_no)


def scan_task(batch_id: str, chunk_no: int) -> Task:
    return Task(
        QueueName.EXPAND,
        f"expand-{batch_id}-scan-{chunk_no}",
        {"batch_id": batch_id, "step": "scan", "chunk_no": chunk_no},
    )


def group_task(batch_id: str) -> Task:
    return Task(QueueName.EXPAND, f"expand-{batch_id}-group", {"batch_id": batch_id, "step": "group"})


def handle_expand(ctx: Context, payload: ExpandPayload, attempt: Attempt) -> None:
    """Run one expansion step. A permanent error, or a transient one on the last attempt, fails the
    batch with the reason (never leaves it silently `expanding`); other transient errors propagate so
    the queue retries the step."""
    batch = ctx.store.get_batch(payload.batch_id, counted=False)
    if batch.status is not BatchStatus.EXPANDING:
        return  # a duplicate or late delivery: expansion already finished (or the batch was cancelled)
    try:
        if payload.step == "list":
            _list(ctx, batch)
        elif payload.step == "scan":
            _scan(ctx, batch, payload.chunk_no, group_inline=False)
        else:
            _group(ctx, batch)
    except DicomflowError as exc:
        if exc.permanent or CONTROL_POLICY.is_last_attempt(attempt.retry_count):
            _fail(ctx, batch, exc)
            return
        raise


def _fail(ctx: Context, batch: Batch, exc: DicomflowError) -> None:
    failed, changed = ctx.store.update_batch(
        batch.batch_id, lambda b: model.fail_batch(b, ctx.clock(), exc.to_failure())
    )
    if changed:
        event(
            Event.BATCH_FAILED,
            f"batch could not be expanded: {exc.reason}",
            severity=logging.ERROR,
            batch_id=batch.batch_id,
            code=exc.code,
        )
        ctx.store.delete_chunks(failed.batch_id)


def _source_prefixes(ctx: Context, batch: Batch) -> list[str]:
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


def chunk_size(total: int, parallelism: int, maximum: int) -> int:
    """Small enough that every scanner gets work, large enough that tasks are not mostly overhead."""
    if total == 0:
        return maximum
    return max(MIN_CHUNK, min(maximum, math.ceil(total / max(1, parallelism * 2))))


def _list(ctx: Context, batch: Batch) -> None:
    files: list[FileRef] = []
    skipped: list[SkippedFile] = []
    for source, prefix in zip(batch.sources, _source_prefixes(ctx, batch), strict=True):
        for entry in ctx.source_for(source).list_files(source):
            if isinstance(entry, SkippedFile):
                skipped.append(SkippedFile(join(prefix, entry.path), entry.ignored))
            else:
                files.append(FileRef(entry.ref, join(prefix, entry.path), entry.size, entry.md5))
    files.sort(key=lambda f: f.path)
    size = chunk_size(len(files), ctx.scan_parallelism, ctx.settings.expand_chunk_files)
    parts = [tuple(files[i : i + size]) for i in range(0, len(files), size)] or [()]
    chunks = [ExpansionChunk(batch.batch_id, n, part, tuple(skipped) if n == 0 else ()) for n, part in enumerate(parts)]
    ctx.store.put_chunks(chunks)
    if len(chunks) == 1:
        _scan(ctx, batch, 0, group_inline=True)
        return
    ctx.queue.enqueue([scan_task(batch.batch_id, c.chunk_no) for c in chunks])


def _scan(ctx: Context, batch: Batch, chunk_no: int, *, group_inline: bool) -> None:
    chunk = ctx.store.get_chunk(batch.batch_id, chunk_no)
    if chunk.results is None:
        # All sources of a batch are of one kind (checked at submission) and file refs carry the rest.
        location = batch.sources[0]
        results = ctx.scanner_for(location).scan(ctx.source_for(location), chunk.files)
        ctx.store.put_chunk_results(batch.batch_id, chunk_no, results)
    if group_inline:
        _group(ctx, batch)
    elif ctx.store.count_unscanned_chunks(batch.batch_id) == 0:
        ctx.queue.enqueue([group_task(batch.batch_id)])


def _group(ctx: Context, batch: Batch) -> None:
    chunks = ctx.store.list_chunks(batch.batch_id)
    if any(c.results is None for c in chunks):
        return  # the last scan task enqueues group again
    pairs: list[tuple[FileRef, DicomHeader]] = []
    ignored: Tally[str] = Tally()
    examples: list[str] = []
    files_seen = 0
    for chunk in chunks:
        for skipped in chunk.skipped:
            ignored[skipped.ignored.kind.value] += 1
            files_seen += 1
            if len(examples) < IGNORED_EXAMPLES:
                examples.append(f"{display(skipped.path)} ({skipped.ignored.kind.value})")
        for ref, result in zip(chunk.files, chunk.results or (), strict=True):
            files_seen += 1
            if isinstance(result, Ignored):
                ignored[result.kind.value] += 1
                if len(examples) < IGNORED_EXAMPLES:
                    examples.append(f"{display(ref.path)} ({result.kind.value})")
            else:
                pairs.append((ref, result))

    groups = group_series(pairs)
    if len(groups) > ctx.settings.max_batch_series:
        raise PermanentError(
            f"the source holds {len(groups)} series, more than the maximum of {ctx.settings.max_batch_series} "
            "per batch; submit its sub-folders as separate batches"
        )
    version = ctx.converter.version
    fps = [fingerprint(g.key, g.sop_instance_uids, version, batch.options) for g in groups]
    already = set() if batch.force else ctx.store.succeeded_fingerprints(batch.destination.key, fps)
    now = ctx.clock()
    items = [
        model.new_item(batch, group, fp, now, skip_reason=ALREADY_CONVERTED if fp in already else "")
        for group, fp in zip(groups, fps, strict=True)
    ]
    _add_in_slices(ctx, items)
    # Enqueue before marking the batch running: if this step dies in between, its redelivery finds the
    # batch still expanding and enqueues again (task ids are deterministic; duplicates are no-ops).
    ctx.queue.enqueue([convert_task(i) for i in items if i.state is ItemState.PENDING])
    _, changed = ctx.store.update_batch(
        batch.batch_id,
        lambda b: model.finish_expansion(b, ctx.clock(), files_seen, sum(ignored.values()), tuple(examples)),
    )
    ctx.store.delete_chunks(batch.batch_id)
    if changed:
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


def _add_in_slices(ctx: Context, items: Sequence[model.Item], size: int = 400) -> None:
    for start in range(0, len(items), size):
        ctx.store.add_items(items[start : start + size])


def convert_task(item: model.Item, suffix: str = "") -> Task:
    task_id = item.task_id + (f"-{suffix}" if suffix else "")
    return Task(
        QueueName.CONVERT,
        task_id,
        {"batch_id": item.batch_id, "item_id": item.item_id, "generation": item.generation},
    )
