"""What the CLI shows while it works and when it is done.

On a terminal: a live overall bar plus one line per series being converted. Elsewhere (CI logs,
pipes): one plain line per finished series. At the end: a summary table, or JSON with --json.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicomflow.domain.failures import Failure
from dicomflow.domain.model import Batch, BatchStatus, Counters, Item, ItemState
from dicomflow.domain.paths import display
from dicomflow.domain.series import IgnoredKind
from dicomflow.services.expand import ALREADY_CONVERTED

FINISH_PHASES = {"succeeded", "skipped", "dead_lettered", "retry"}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class _Running:
    label: str
    phase: str = "queued"
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)


class RunDisplay:
    """Consumes (batch_id, item_id, phase, done, total) messages and counters; renders progress."""

    def __init__(self, out: IO[str] | None = None, *, live: bool | None = None, quiet: bool = False) -> None:
        self._out = out or sys.stderr
        self._console = Console(file=self._out, highlight=False)
        self._live_mode = (self._console.is_terminal if live is None else live) and not quiet
        self._quiet = quiet
        self._running: dict[str, _Running] = {}
        self._labels: dict[str, str] = {}
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("series"),
            TimeElapsedColumn(),
            console=self._console,
        )
        self._task = self._progress.add_task("discovering series", total=None)
        self._live: Live | None = None
        self._finished_lines = 0

    def __enter__(self) -> RunDisplay:
        if self._live_mode:
            self._live = Live(self._render(), console=self._console, refresh_per_second=8, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def set_labels(self, items: Sequence[Item]) -> None:
        for item in items:
            where = display(item.rel_dir) or "."
            self._labels[item.item_id] = f"{item.output_stem or item.item_id[:8]}  ({where})"

    def counters(self, batch: Batch, counters: Counters) -> None:
        if batch.expanded_at is None:
            self._progress.update(self._task, description="discovering series", total=None)
        else:
            self._progress.update(
                self._task, description="converting", total=counters.series_total, completed=counters.finished
            )
        self._refresh()

    def step(self, message: tuple[str, str, str, int, int]) -> None:
        _batch, item_id, phase, done, total = message
        label = self._labels.get(item_id, item_id[:8])
        if phase in FINISH_PHASES:
            self._running.pop(item_id, None)
            if not self._live_mode and not self._quiet:
                self._finished_lines += 1
                print(f"{phase:<13} {label}", file=self._out, flush=True)
        else:
            state = self._running.setdefault(item_id, _Running(label))
            state.phase, state.done, state.total = phase, done, total
        self._refresh()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Group:
        lines = Table.grid(padding=(0, 2))
        for running in list(self._running.values())[:12]:
            if running.total and running.phase in ("download", "upload"):
                detail = f"{_human_bytes(running.done)} / {_human_bytes(running.total)}"
            else:
                detail = f"{time.monotonic() - running.started:.0f} s"
            lines.add_row(f"  {running.phase:<9}", running.label, detail)
        return Group(self._progress, lines)

    def note(self, text: str) -> None:
        if not self._quiet:
            self._console.print(text)


# What a batch amounts to, as the CLI reports it (the exit code follows from it: see cli.py).
INTERRUPTED = "interrupted"
NO_SERIES = "no_series"
SHOWN_PER_LIST = 5  # series listed by name per kind of note in the text summary (all of them in --json)
_NOTED = frozenset({ItemState.SUCCEEDED, ItemState.SKIPPED})
_UNREADABLE = f" ({IgnoredKind.UNREADABLE.value})"  # how expansion marks an unreadable file among its examples


@dataclass(frozen=True)
class Report:
    """Everything the summary of one batch shows, from the batch and all of its series."""

    batch: Batch
    status: str  # a BatchStatus value, or "interrupted" (unfinished, and no run is alive to finish it)
    failure: Failure | None  # why the batch as a whole failed (or found no series)
    dead: tuple[Item, ...]
    noted: tuple[Item, ...]  # finished series with dcm2niix warnings or flagged incomplete
    skipped: tuple[Item, ...]  # skipped for a reason about the data (not "already converted")
    already_converted: int
    resume_hint: str = ""


def build_report(batch: Batch, items: Sequence[Item], *, run_alive: bool = True, resume_hint: str = "") -> Report:
    """`run_alive`: whether a process is working on the batch now (locally: a run holds its state)."""
    status, failure = batch.status.value, batch.failure
    if not batch.is_final and not run_alive:
        status = INTERRUPTED
    elif batch.status is BatchStatus.COMPLETED and batch.counters.series_total == 0:
        # Nothing to convert is not success: the source was probably the wrong folder (issue 13).
        status = BatchStatus.FAILED.value
        ignored = f" ({batch.files_ignored} file(s) skipped: not DICOM images)" if batch.files_ignored else ""
        failure = Failure(NO_SERIES, f"no DICOM series found in the source{ignored}", permanent=True)
    return Report(
        batch=batch,
        status=status,
        failure=failure,
        dead=tuple(i for i in items if i.state is ItemState.DEAD_LETTERED),
        noted=tuple(i for i in items if i.state in _NOTED and (i.warnings or i.incomplete)),
        skipped=tuple(
            i for i in items if i.state is ItemState.SKIPPED and i.skip_reason and i.skip_reason != ALREADY_CONVERTED
        ),
        already_converted=sum(1 for i in items if i.state is ItemState.SKIPPED and i.skip_reason == ALREADY_CONVERTED),
        resume_hint=resume_hint,
    )


def _series(item: Item) -> dict[str, Any]:
    return {
        "item_id": item.item_id,
        "series_number": item.series_number,
        "description": item.description,
        "folder": display(item.rel_dir),
    }


def summary_dict(report: Report) -> dict[str, Any]:
    batch = report.batch
    return {
        "batch_id": batch.batch_id,
        "status": report.status,
        "source": [s.uri for s in batch.sources],
        "destination": batch.destination.uri,
        "label": batch.label,
        "counters": batch.counters.to_dict(),
        "incomplete": sum(1 for i in report.noted if i.incomplete),
        "with_warnings": sum(1 for i in report.noted if i.warnings),
        "already_converted": report.already_converted,
        "files_seen": batch.files_seen,
        "files_ignored": batch.files_ignored,
        "ignored_examples": list(batch.ignored_examples),
        "failure": report.failure.to_dict() if report.failure else None,
        "resume": report.resume_hint or None,
        "layout": batch.layout.kind,
        "report": batch.report_ref,
        "dead_letters": [
            _series(i)
            | {
                "code": i.failure.code if i.failure else "",
                "reason": i.failure.reason if i.failure else "",
                "attempts": i.attempts,
            }
            for i in report.dead
        ],
        "notes": [
            _series(i) | {"state": i.state.value, "incomplete": i.incomplete, "warnings": list(i.warnings)}
            for i in report.noted
        ],
        "skipped": [_series(i) | {"reason": i.skip_reason, "warnings": list(i.warnings)} for i in report.skipped],
    }


def _label(item: Item) -> str:
    number = "" if item.series_number is None else str(item.series_number)
    return f"{number} {item.description}".strip() or item.item_id


def _where(item: Item) -> str:
    return f"{_label(item)} ({display(item.rel_dir) or '.'})"


def _more(shown: int, total: int) -> str:
    return f" (first {shown} shown; all of them with --json)" if total > shown else ""


def print_summary(out: IO[str], report: Report, elapsed: float | None = None) -> None:
    console = Console(file=out, highlight=False, width=max(100, Console(file=out).width))
    batch = report.batch
    c = batch.counters
    incomplete = sum(1 for i in report.noted if i.incomplete)
    table = Table(title=f"batch {batch.batch_id} — {report.status}", show_header=True, header_style="bold")
    for column in ("series", "succeeded", "incomplete", "skipped", "dead-lettered", "files seen", "files ignored"):
        table.add_column(column, justify="right")
    table.add_row(
        str(c.series_total), str(c.succeeded), str(incomplete), str(c.skipped), str(c.dead_lettered),
        str(batch.files_seen), str(batch.files_ignored),
    )  # fmt: skip
    console.print(table)
    if elapsed is not None:
        console.print(f"finished in {elapsed:.1f} s")
    if report.status == INTERRUPTED:
        console.print(f"[yellow]interrupted: run the same command to resume[/yellow]{escape(report.resume_hint)}")
    if report.failure:
        console.print(f"[red]batch failed:[/red] {escape(report.failure.reason)}")
    _print_report(console, batch.layout.kind, batch.destination.uri, batch.report_ref)
    _print_notes(console, report)
    _print_skipped(console, report)
    _print_ignored(console, batch)
    _print_dead(console, report)


def _print_notes(console: Console, report: Report) -> None:
    if not report.noted:
        return
    incomplete = sum(1 for i in report.noted if i.incomplete)
    console.print(
        f"[yellow]{len(report.noted)} series converted with dcm2niix warnings[/yellow] ({incomplete} flagged "
        f"incomplete: check those outputs){_more(SHOWN_PER_LIST, len(report.noted))}:"
    )
    for item in sorted(report.noted, key=lambda i: (not i.incomplete, i.rel_dir, i.output_stem))[:SHOWN_PER_LIST]:
        flag = "[red]INCOMPLETE[/red] " if item.incomplete else ""
        # dicomflow's own note on what is missing comes last (domain/conversion.py `assess`): lead with it.
        shown = (item.warnings[-1] if item.incomplete else item.warnings[0]) if item.warnings else ""
        extra = f" (+{len(item.warnings) - 1} more)" if len(item.warnings) > 1 else ""
        console.print(f"  {flag}{escape(_where(item))}: {escape(shown)}{extra}")


def _print_skipped(console: Console, report: Report) -> None:
    if not (report.skipped or report.already_converted):
        return
    parts = [f"{report.already_converted} already converted into this destination"] * bool(report.already_converted)
    parts += [f"{len(report.skipped)} with nothing to convert"] * bool(report.skipped)
    more = _more(SHOWN_PER_LIST, len(report.skipped))
    console.print(f"{report.batch.counters.skipped} series skipped: {', '.join(parts)}{more}")
    for item in report.skipped[:SHOWN_PER_LIST]:
        console.print(f"  {escape(_where(item))}: {escape(item.skip_reason)}")


def _print_ignored(console: Console, batch: Batch) -> None:
    if not batch.files_ignored:
        return
    console.print(
        f"{batch.files_ignored} file(s) skipped (not DICOM images, unreadable, or a DICOMDIR), e.g. "
        + escape("; ".join(batch.ignored_examples[:SHOWN_PER_LIST]))
    )
    unreadable = [e.removesuffix(_UNREADABLE) for e in batch.ignored_examples if e.endswith(_UNREADABLE)]
    if unreadable:
        console.print(
            "[yellow]unreadable files[/yellow] (not converted; fix them, e.g. their permissions, and run the same "
            "command again): " + escape("; ".join(unreadable))
        )


def _print_dead(console: Console, report: Report) -> None:
    if not report.dead:
        return
    dead = Table(
        title=f"dead-lettered series (fix the cause, then `dicomflow dlq retry {report.batch.batch_id}`)",
        header_style="bold red",
    )
    for column in ("series", "folder", "attempts", "reason"):
        dead.add_column(column, overflow="fold")
    for item in report.dead:
        reason = item.failure.reason if item.failure else ""
        dead.add_row(escape(_label(item)), escape(display(item.rel_dir) or "."), str(item.attempts), escape(reason))
    console.print(dead)


def print_json(out: IO[str], data: Any) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_remote_summary(out: IO[str], data: dict[str, Any]) -> None:
    """The same summary as for a local batch, from the batch API's JSON."""
    console = Console(file=out, highlight=False, width=max(100, Console(file=out).width))
    c = data["counters"]
    table = Table(title=f"batch {data['batch_id']} — {data['status']}", header_style="bold")
    for column in ("series", "succeeded", "skipped", "dead-lettered", "running", "files seen", "files ignored"):
        table.add_column(column, justify="right")
    in_flight = c.get("running", 0) + c.get("retrying", 0)
    cells = [c["series_total"], c["succeeded"], c["skipped"], c["dead_lettered"], in_flight,
             data.get("files_seen", 0), data.get("files_ignored", 0)]  # fmt: skip
    table.add_row(*(str(v) for v in cells))
    console.print(table)
    if data.get("eta_seconds"):
        console.print(f"about {data['eta_seconds']:.0f} s left")
    if data.get("failure"):
        console.print(f"[red]batch failed:[/red] {data['failure']['reason']}")
    # Series with dcm2niix warnings or flagged incomplete, among the items of this answer's page.
    noted = [i for i in data.get("items") or [] if i.get("warnings") or i.get("incomplete")]
    if noted:
        more = _more(SHOWN_PER_LIST, len(noted))
        console.print(f"[yellow]series with dcm2niix warnings on this page[/yellow]{more}:")
        for item in noted[:SHOWN_PER_LIST]:
            flag = "[red]INCOMPLETE[/red] " if item.get("incomplete") else ""
            warnings = item.get("warnings") or [""]
            where = f"{_remote_label(item)} ({item.get('folder') or '.'})"
            console.print(f"  {flag}{escape(where)}: {escape(str(warnings[0]))}")
    _print_report(console, (data.get("layout") or {}).get("kind", "mirror"), data["destination"],
                  data.get("report_ref", ""))  # fmt: skip
    failures = data.get("failures") or []
    if failures:
        dead = Table(
            title=f"dead-lettered series (fix the cause, then `dicomflow dlq retry {data['batch_id']}`)",
            header_style="bold red",
        )
        for column in ("series", "folder", "attempts", "reason"):
            dead.add_column(column, overflow="fold")
        for item in failures:
            reason = (item.get("failure") or {}).get("reason", "")
            dead.add_row(_remote_label(item), item.get("folder") or ".", str(item.get("attempts", "")), reason)
        console.print(dead)


def _remote_label(item: dict[str, Any]) -> str:
    number = "" if item.get("series_number") is None else str(item["series_number"])
    return f"{number} {item.get('description', '')}".strip() or str(item["item_id"])


def _print_report(console: Console, layout: str, destination: str, report_ref: str) -> None:
    """Where the batch's QA report (and BIDS dataset) is."""
    if layout == "bids":
        console.print(f"BIDS dataset: {destination}")
    if report_ref:
        where = report_ref if report_ref.startswith("/") else f"report.html in {destination} (Drive file {report_ref})"
        console.print(f"report: {where}")
