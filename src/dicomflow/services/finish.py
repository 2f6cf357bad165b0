"""The finish step of a batch: its report, and for `--layout bids` its place in the BIDS dataset.

When a batch becomes final (completed, completed with failures, cancelled, failed) — and again whenever
that outcome changes (a redrive, a late success) — the batch owes one finish step (model.request_finish,
in the same write that makes it final). It runs as a task on the expand queue, named per completion
(task_names.finish_task), locally through the local queue; the reconciler enqueues it again if its task
is lost. It may be delivered twice, late or never, and die between any two lines, so every part of it is
idempotent and recorded before it acts:

1. it takes the destination's lease (domain/dataset.py): one writer per destination, so two batches
   finishing into one dataset never interleave; a busy destination answers "retry later";
2. BIDS: it plans the dataset from state — every succeeded BIDS series of the destination, of any
   batch (store.list_destination_items), each with the sidecars and acquisition time its worker
   recorded — with this batch's rules. Outputs already placed keep their names, so a series keeps its
   run for good (domain/bids.py). For each series whose files must move (staged outputs, or outputs set
   aside that a rule now names) it records where each file goes (Item.placing), moves the files (a
   rename, or Drive's files.update with addParents/removeParents: no copy), writes its BIDS sidecars,
   then records the new names as the series' outputs. An older record of the same series (a re-run with
   --force) stops claiming files the current one does not hold. Then the top-level files are rewritten
   from the plan (domain/bids_files.py), skipping those a person edited since dicomflow wrote them;
3. it writes `report.html` (every layout) from the batch's series records: what the QA report shows
   was recorded by each worker (domain/facts.py), so no output is downloaded here;
4. it records the completion as finished, and releases the lease.

What a destination holds is then exactly what the succeeded series record (their outputs) plus what the
dataset record owns (report.html, the BIDS top-level files): nothing else, nothing twice.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Final

from dicomflow.domain import dataset as ds
from dicomflow.domain import model
from dicomflow.domain.bids import (
    NIFTI_EXTENSIONS,
    ConvertedSeries,
    DatasetPlan,
    PlannedOutput,
    parse_bids_path,
    plan_dataset,
    sidecar_text,
    split_ext,
)
from dicomflow.domain.bids_files import DatasetInfo, top_level_files
from dicomflow.domain.bids_labels import Labels
from dicomflow.domain.failures import (
    AttemptOutOfTime,
    DestinationConflict,
    DicomflowError,
    PermanentError,
    SourceNotFound,
    TransientError,
)
from dicomflow.domain.layout import Layout
from dicomflow.domain.model import Batch, Item, OutputFile
from dicomflow.domain.paths import display, split
from dicomflow.events import Event
from dicomflow.ports import Attempt, HeartbeatHandle, Sink
from dicomflow.report import BatchSummary, ImageInfo, ReportOutput, ReportSeries, render
from dicomflow.services.context import Context, event

DATASET_KEY: Final = "dicomflow-dataset"  # the owner (sink key) of files that belong to no single series
REPORT: Final = "report.html"
DATASET_NAME: Final = "dicomflow BIDS dataset"  # never a folder name: those may carry a patient's name
LINK_KEYS: Final = frozenset({"IntendedFor", "B0FieldIdentifier", "B0FieldSource"})
REPORT_THUMBNAILS: Final = 2000  # series shown with thumbnails in one report (the page stays loadable)
PAGE: Final = 200


class DatasetBusy(TransientError):
    """Another batch's finish step is writing into the same destination: this one waits for its turn."""

    code = "dataset_busy"


class SeriesStillRunning(TransientError):
    """The batch is final (cancelled, failed) but some of its series are still being converted."""

    code = "series_still_running"


class DatasetLost(TransientError):
    """This finish step lost the destination's lease (it stalled); another writer may hold it now."""

    code = "dataset_lost"


@dataclass(frozen=True, slots=True)
class FinishResult:
    outcome: str  # done | duplicate
    report_ref: str = ""
    moved: int = 0


def finish_batch(ctx: Context, batch_id: str, completion: int, attempt: Attempt) -> FinishResult:
    batch = ctx.store.get_batch(batch_id, counted=False)
    if not batch.finish_pending or completion != batch.completions:
        return FinishResult("duplicate")  # done already, owed for a newer completion, or running again
    if ctx.store.count_active(batch_id):
        # A cancelled or failed batch is final while series it had started still run: they end soon (their
        # lease or their dispatch deadline), and their outputs belong in the report and the dataset.
        raise SeriesStillRunning("series of this batch are still converting; its report waits for them")
    writer = _Writer.take(ctx, batch, attempt)
    plan: DatasetPlan | None = None
    try:
        try:
            plan = _place_dataset(writer) if batch.layout.is_bids else None
            refs = writer.write_files({REPORT: _report(ctx, batch_id, plan)}, keep=None)
        except PermanentError as exc:
            # The destination refuses the writes (permissions revoked, a quota): retrying cannot help. The
            # batch is finished without them; the log says why.
            event(Event.BATCH_FINISHED, f"batch report and dataset could not be written: {exc.reason}",
                  severity=logging.ERROR, batch_id=batch_id, code=exc.code)  # fmt: skip
            refs = {}
        report_ref = refs.get(REPORT, "")
        ctx.store.update_batch(batch_id, lambda b: model.finish_done(b, completion, report_ref, ctx.clock()))
    finally:
        writer.release()
    event(
        Event.BATCH_FINISHED,
        "batch report written" + (" and BIDS dataset updated" if plan else ""),
        batch_id=batch_id,
        layout=batch.layout.kind,
        moved=writer.moved,
        bids_files=len(plan.classified) if plan else 0,
        unclassified=len(plan.unclassified) if plan else 0,
    )
    return FinishResult("done", report_ref, writer.moved)


# --- the writer: the destination's lease, and every write the finish step makes ------------------------

Move = tuple[OutputFile, OutputFile, bytes | None]  # (current output, its target, new content or None: as is)


class _Writer:
    def __init__(self, ctx: Context, batch: Batch, owner: str, beating: HeartbeatHandle, until: float | None) -> None:
        self.ctx = ctx
        self.batch = batch
        self.dest = batch.destination
        self.sink: Sink = ctx.sink_for(batch.destination)
        self.owner = owner
        self.beating = beating
        self.until = until
        self.moved = 0
        self._scratch: Path | None = None

    @classmethod
    def take(cls, ctx: Context, batch: Batch, attempt: Attempt) -> _Writer:
        owner = ctx.attempt_owner()
        seconds = float(ctx.settings.lease_seconds)
        key = batch.destination.key
        _, taken = ctx.store.update_dataset(key, lambda d: ds.take(d, owner, ctx.clock(), seconds))
        if not taken:
            raise DatasetBusy(
                "another batch is writing its report or BIDS files into the same destination; this batch's turn "
                "comes next (it will be retried)"
            )

        def renew() -> bool:
            _, held = ctx.store.update_dataset(key, lambda d: ds.renew(d, owner, ctx.clock(), seconds))
            return held

        until = ctx.answer_by(attempt, ctx.settings.expand_dispatch_deadline_seconds)
        return cls(ctx, batch, owner, ctx.heartbeat.start(renew, every=max(1.0, seconds / 3)), until)

    def confirm(self) -> None:
        """Before each series and each set of files: still the writer (checked against the store now), and
        time left before the task's dispatch deadline (the work done so far is kept: a retry continues)."""
        ctx = self.ctx
        if self.until is not None and ctx.clock() > self.until:
            raise AttemptOutOfTime("the finish step ran out of time; it continues where it stopped when retried")
        seconds = float(ctx.settings.lease_seconds)
        _, held = ctx.store.update_dataset(self.dest.key, lambda d: ds.renew(d, self.owner, ctx.clock(), seconds))
        if not self.beating.alive or not held:
            raise DatasetLost("the finish step lost the destination's lease; it will be retried")

    def release(self) -> None:
        self.beating.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        with suppress(DicomflowError):  # otherwise the lease simply expires
            self.ctx.store.update_dataset(self.dest.key, lambda d: ds.release(d, self.owner, self.ctx.clock()))

    # --- series files ---------------------------------------------------------------------------------

    def place(self, item: Item, moves: list[Move], extras: Mapping[str, Mapping[str, object]]) -> Item:
        """Put each output of a succeeded series at its target: where they go is recorded first (placing),
        then the files move (or sidecars are written), then the series records the new names."""
        ctx = self.ctx
        targets = tuple(target for _, target, _ in moves)
        if item.placing != targets:
            item, began = ctx.update_item(
                item.batch_id, item.item_id, lambda i: ds.begin_placement(i, targets, ctx.clock())
            )
            if not began:
                return item  # not a success any more, or another placement of it is recorded (resumed first)
        placing = item.placing
        self.confirm()
        try:
            done = tuple(self._put(item, current, target, content) for current, target, content in moves)
        except (SourceNotFound, DestinationConflict) as exc:
            # A staged file vanished, or a file someone put there holds the name: leave this series as it is
            # (its record still says where each file is going) and go on with the others.
            event(
                Event.BATCH_FINISHED,
                f"a series could not be placed in the BIDS dataset: {exc.reason}",
                severity=logging.WARNING,
                batch_id=self.batch.batch_id,
                item_id=item.item_id,
                code=exc.code,
            )
            return item
        item, _ = ctx.update_item(
            item.batch_id, item.item_id, lambda i: ds.placed(i, placing, done, extras, ctx.clock())
        )
        return item

    def _put(self, item: Item, current: OutputFile, target: OutputFile, content: bytes | None) -> OutputFile:
        if content is None:
            if display(target.name) == current.name:
                return current
            self.moved += 1
            return self.sink.move(self.dest, current, target.name, item.item_id)
        written = replace(self._publish(target.name, content, item.item_id), origin=current.original)
        if written.name != current.name:
            self.sink.retract(self.dest, [current], owner_key=item.item_id)  # the staged or older sidecar
        self.moved += 1
        return written

    def _publish(self, name: str, content: bytes, owner_key: str) -> OutputFile:
        """A file written from memory, published like a converted output (renamed into place locally)."""
        parts = split(name)
        if self._scratch is None:
            self.ctx.work_dir.mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(dir=self.ctx.work_dir, prefix="finish-"))
        path = self._scratch / display(parts[-1])
        path.write_bytes(content)
        (written,) = self.sink.publish(self.dest, "/".join(parts[:-1]), [path], owner_key=owner_key)
        path.unlink(missing_ok=True)  # a local publish renamed it into place; a Drive upload copied it
        return written

    def retract_older(self, item: Item, keep: set[tuple[str, str]]) -> None:
        """An older record of a series that a later conversion replaced: remove the files only it holds,
        then it claims none."""
        doomed = [o for o in (*item.outputs, *item.placing) if (display(o.name), o.sha256) not in keep]
        self.confirm()
        if doomed:
            self.sink.retract(self.dest, doomed, owner_key=item.item_id)
        self.ctx.update_item(item.batch_id, item.item_id, lambda i: ds.superseded(i, self.ctx.clock()))

    # --- dataset files ----------------------------------------------------------------------------------

    def write_files(self, desired: Mapping[str, str], *, keep: frozenset[str] | None) -> dict[str, str]:
        """Make the dataset's own files what `desired` says (name → text). With `keep` given, the files the
        dataset recorded earlier that are neither desired nor kept are removed (a scans.tsv of a session
        that no longer exists). A file someone edited since dicomflow wrote it (or wrote themselves) is
        left alone. Returns {name: ref} of the files written."""
        ctx, key = self.ctx, self.dest.key
        record = ctx.store.get_dataset(key)
        last = dict(record.files)
        writes: dict[str, bytes] = {}
        agreed: dict[str, str] = {}
        for name, text in desired.items():
            data = text.encode("utf-8")
            sha = hashlib.sha256(data).hexdigest()
            if last.get(name) == ds.short_digest(sha) and name != REPORT:
                continue  # as dicomflow last wrote it and still wants it (an edit made since is kept)
            existing = self.sink.read(self.dest, name, DATASET_KEY)
            if existing is not None:
                found = hashlib.sha256(existing).hexdigest()
                if found != sha and not record.owns(name, found):
                    event(Event.DATASET_FILE_KEPT, f"{name} was changed since dicomflow wrote it (or was not written "
                          "by dicomflow): left as it is", batch_id=self.batch.batch_id, file=name)  # fmt: skip
                    continue
            writes[name] = data
            agreed[name] = sha
        obsolete = [] if keep is None else [n for n in last if n not in desired and n not in keep]
        self.confirm()
        ctx.store.update_dataset(key, lambda d: ds.will_write(d, self.owner, agreed, ctx.clock()))
        refs = {name: self._publish(name, data, DATASET_KEY).ref for name, data in writes.items()}
        removed: set[str] = set()
        for name in obsolete:
            existing = self.sink.read(self.dest, name, DATASET_KEY)
            if existing is not None:
                found = hashlib.sha256(existing).hexdigest()
                if not record.owns(name, found):
                    continue  # edited since: the person who edited it decides
                self.sink.retract(self.dest, [OutputFile(name, len(existing), found)], owner_key=DATASET_KEY)
            removed.add(name)
        _, held = ctx.store.update_dataset(
            key, lambda d: ds.wrote(d, self.owner, agreed, frozenset(removed), ctx.clock())
        )
        if not held:
            raise DatasetLost("the finish step lost the destination's lease; it will be retried")
        return refs


# --- BIDS placement -------------------------------------------------------------------------------------


def _destination_items(ctx: Context, dest_key: str) -> Iterator[Item]:
    """Every succeeded BIDS series record of the destination, without the thumbnails (not needed here,
    and the largest part of a record)."""
    after = ""
    while page := ctx.store.list_destination_items(dest_key, after=after, limit=PAGE):
        for item in page:
            yield replace(item, facts=replace(item.facts, images=()))
        if len(page) < PAGE:
            return
        after = f"{page[-1].batch_id}/{page[-1].item_id}"


def _placed_names(item: Item) -> dict[str, str]:
    """Output stem → BIDS path, for the item's NIfTI outputs that have a BIDS name."""
    names = {}
    for output in item.outputs:
        if output.original.endswith(NIFTI_EXTENSIONS) and parse_bids_path(output.name) is not None:
            names[split_ext(output.original)[0]] = output.name
    return names


def _converted(item: Item) -> ConvertedSeries:
    return ConvertedSeries(
        series_id=item.item_id,
        rel_dir=item.rel_dir,
        stem=item.output_stem,
        files=tuple(o.original for o in item.outputs),
        sidecars=item.facts.sidecars,
        series_number=item.series_number,
        description=item.description,
        acquired_at=item.facts.acquired_at,
        labels=Labels(item.subject, item.session or None) if item.subject else None,
        placed=_placed_names(item),
        extras=item.facts.extras,
    )


Index = dict[tuple[str, str], tuple[PlannedOutput, str]]  # (series, output file name) -> (output, its path)


def _index(plan: DatasetPlan) -> Index:
    return {(o.series_id, f.source): (o, f.path) for o in plan.outputs for f in o.files}


def _content(item: Item, original: str, output: PlannedOutput) -> bytes | None:
    """The BIDS sidecar of a named output: the one its worker published plus the plan's keys (task name,
    rule keys, fieldmap links). Outputs set aside keep their sidecar as published."""
    if not original.endswith(".json") or not output.classified:
        return None
    base = item.facts.sidecars.get(original.removesuffix(".json"))
    return None if base is None else sidecar_text(base, output).encode("utf-8")


def _extras(item: Item, index: Index) -> dict[str, dict[str, object]]:
    """The sidecar keys the plan adds to the item's named outputs besides fieldmap links (a rule's keys,
    TaskName, Units): recorded with the placement, because a placed output is not classified again."""
    extras: dict[str, dict[str, object]] = {}
    for output in item.outputs:
        entry = index.get((item.item_id, output.original))
        if entry is not None and _content(item, output.original, entry[0]) is not None:
            updates = entry[0].sidecar_updates
            extras[split_ext(output.original)[0]] = {k: v for k, v in updates.items() if k not in LINK_KEYS}
    return extras


def _moves(item: Item, index: Index) -> tuple[list[Move], dict[str, dict[str, object]]]:
    """What to do with each output of `item` for the plan (nothing when every file is where and what the
    plan says), and the sidecar keys its rules add (kept for the next plans)."""
    moves: list[Move] = []
    changed = False
    for output in item.outputs:
        entry = index.get((item.item_id, output.original))
        if entry is None:
            moves.append((output, output, None))
            continue
        planned, path = entry
        content = _content(item, output.original, planned)
        sha = hashlib.sha256(content).hexdigest() if content is not None else output.sha256
        size = len(content) if content is not None else output.size
        changed = changed or display(path) != output.name or sha != output.sha256
        moves.append((output, OutputFile(path, size, sha, origin=output.original), content))
    return (moves if changed else []), _extras(item, index)


def _resume(writer: _Writer, item: Item, index: Index) -> Item:
    """Complete a placement an earlier finish step recorded and did not finish (it died half-way): to the
    targets it recorded, with the sidecar content of the current plan."""
    moves: list[Move] = []
    for output, target in zip(item.outputs, item.placing, strict=True):
        entry = index.get((item.item_id, output.original))
        content = _content(item, output.original, entry[0]) if entry else None
        moves.append((output, target, content if target.sha256 != output.sha256 else None))
    return writer.place(item, moves, _extras(item, index))


@dataclass(frozen=True, slots=True)
class _Records:
    live: list[Item]  # the current record of every series in the destination (its latest success)
    older: list[Item]  # earlier records of series converted again since (--force)
    previous_runs: dict[str, int]  # the run an older record of a series was placed with


def _records(ctx: Context, dest_key: str) -> _Records:
    current: dict[str, Item] = {}
    older: list[Item] = []
    for item in sorted(_destination_items(ctx, dest_key), key=lambda i: (i.finished_at or 0.0, i.batch_id)):
        if item.item_id in current:
            older.append(current[item.item_id])
        current[item.item_id] = item
    # A series converted again keeps the run its older record was placed with.
    previous_runs: dict[str, int] = {}
    for item in older:
        for name in _placed_names(item).values():
            parsed = parse_bids_path(name)
            if parsed is not None:
                previous_runs[item.item_id] = parsed[2]
    live = [i for i in current.values() if i.outputs or i.placing]
    return _Records(live, older, previous_runs)


def planned_dataset(ctx: Context, dest_key: str, layout: Layout) -> DatasetPlan:
    """The BIDS plan of a destination as its series records stand now (what the finish step writes the
    top-level files from; the simulation checks the destination against it)."""
    records = _records(ctx, dest_key)
    series = [_converted(i) for i in records.live]
    return plan_dataset(series, None, layout.parsed_rules(), layout.options(), records.previous_runs)


def dataset_info(ctx: Context) -> DatasetInfo:
    return DatasetInfo(DATASET_NAME, _version(), ctx.converter.version.removeprefix("dcm2niix-"))


def _place_dataset(writer: _Writer) -> DatasetPlan:
    ctx, batch = writer.ctx, writer.batch
    records = _records(ctx, batch.destination.key)
    live, older, previous_runs = records.live, records.older, records.previous_runs
    rules, options = batch.layout.parsed_rules(), batch.layout.options()

    def plan_now() -> DatasetPlan:
        return plan_dataset([_converted(i) for i in live], None, rules, options, previous_runs)

    if any(i.placing for i in live):
        index = _index(plan_now())
        live = [_resume(writer, i, index) if i.placing else i for i in live]
    plan = plan_now()
    index = _index(plan)
    for n, item in enumerate(live):
        moves, extras = _moves(item, index)
        if moves:
            live[n] = writer.place(item, moves, extras)
    keep = {(display(o.name), o.sha256) for item in live for o in item.outputs}
    for item in older:
        if item.outputs or item.placing:
            writer.retract_older(item, keep)
    writer.write_files(top_level_files(plan, dataset_info(ctx)), keep=frozenset({REPORT}))
    return plan


def _version() -> str:
    try:
        return metadata.version("dicomflow")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


# --- the report -----------------------------------------------------------------------------------------


def _report(ctx: Context, batch_id: str, plan: DatasetPlan | None) -> str:
    """report.html of the batch, from its series records (and the plan's reasons for outputs set aside)."""
    batch = ctx.store.get_batch(batch_id)
    reasons = {(o.series_id, f.source): o.reason for o in plan.outputs for f in o.files} if plan else {}
    series: list[ReportSeries] = []
    with_images = 0
    after = ""
    while page := ctx.store.list_items(batch_id, after=after, limit=PAGE):
        for item in page:
            shown = _report_series(item, reasons, images=with_images < REPORT_THUMBNAILS)
            with_images += int(any(o.image and o.image.thumbnail_png for o in shown.outputs))
            series.append(shown)
        if len(page) < PAGE:
            break
        after = page[-1].item_id
    c = batch.counters
    summary = BatchSummary(batch_id, batch.label, batch.status.value, batch.layout.kind, c.series_total,
                           c.succeeded, c.skipped, c.dead_lettered, batch.created_at, batch.finished_at,
                           batch.files_seen, batch.files_ignored,
                           batch.failure.reason if batch.failure else "")  # fmt: skip
    return render(summary, series)


def _report_series(item: Item, reasons: Mapping[tuple[str, str], str], *, images: bool) -> ReportSeries:
    outputs = []
    for output in item.outputs:
        if not output.original.endswith(NIFTI_EXTENSIONS):
            continue
        image = item.facts.image_of(output.original)
        info = None
        if image is not None:
            info = ImageInfo(image.shape, image.voxel_size, image.volumes,
                             image.thumbnail_png if images else None, image.thumbnail_size)  # fmt: skip
        outputs.append(ReportOutput(output.name, info, reasons.get((item.item_id, output.original), "")))
    t = item.timings
    return ReportSeries(
        series_id=item.item_id,
        source=display(item.rel_dir) or ".",
        series_number=item.series_number,
        description=item.description,
        modality=item.modality,
        state=item.state.value,
        outputs=tuple(outputs),
        warnings=item.warnings,
        reason=item.skip_reason or (item.failure.reason if item.failure else ""),
        failure_code=item.failure.code if item.failure else "",
        attempts=item.attempts,
        files=item.file_count,
        seconds=t.download_seconds + t.convert_seconds + t.upload_seconds,
        incomplete=item.incomplete,
    )
