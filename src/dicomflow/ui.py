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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicomflow.domain.model import Batch, Counters, Item
from dicomflow.domain.paths import display

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


def summary_dict(batch: Batch, failures: Sequence[Item]) -> dict[str, Any]:
    c = batch.counters
    return {
        "batch_id": batch.batch_id,
        "status": batch.status.value,
        "source": [s.uri for s in batch.sources],
        "destination": batch.destination.uri,
        "counters": c.to_dict(),
        "files_seen": batch.files_seen,
        "files_ignored": batch.files_ignored,
        "ignored_examples": list(batch.ignored_examples),
        "failure": batch.failure.to_dict() if batch.failure else None,
        "layout": batch.layout.kind,
        "report": batch.report_ref,
        "dead_letters": [
            {
                "item_id": i.item_id,
                "series_number": i.series_number,
                "description": i.description,
                "folder": display(i.rel_dir),
                "code": i.failure.code if i.failure else "",
                "reason": i.failure.reason if i.failure else "",
                "attempts": i.attempts,
            }
            for i in failures
        ],
    }


def print_summary(out: IO[str], batch: Batch, failures: Sequence[Item], elapsed: float | None = None) -> None:
    console = Console(file=out, highlight=False, width=max(100, Console(file=out).width))
    c = batch.counters
    table = Table(title=f"batch {batch.batch_id} — {batch.status.value}", show_header=True, header_style="bold")
    for column in ("series", "succeeded", "skipped", "dead-lettered", "files seen", "files ignored"):
        table.add_column(column, justify="right")
    table.add_row(
        str(c.series_total), str(c.succeeded), str(c.skipped), str(c.dead_lettered),
        str(batch.files_seen), str(batch.files_ignored),
    )  # fmt: skip
    console.print(table)
    if elapsed is not None:
        console.print(f"finished in {elapsed:.1f} s")
    if batch.failure:
        console.print(f"[red]batch failed:[/red] {batch.failure.reason}")
    _print_report(console, batch.layout.kind, batch.destination.uri, batch.report_ref)
    if batch.files_ignored:
        console.print(
            f"{batch.files_ignored} file(s) were not DICOM images and were skipped, e.g. "
            + "; ".join(batch.ignored_examples[:5])
        )
    if failures:
        dead = Table(title="dead-lettered series (fix the cause, then `dicomflow dlq retry`)", header_style="bold red")
        for column in ("series", "folder", "attempts", "reason"):
            dead.add_column(column, overflow="fold")
        for item in failures:
            number = "" if item.series_number is None else str(item.series_number)
            dead.add_row(
                f"{number} {item.description}".strip() or item.item_id[:8],
                display(item.rel_dir) or ".",
                str(item.attempts),
                item.failure.reason if item.failure else "",
            )
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
    _print_report(console, (data.get("layout") or {}).get("kind", "mirror"), data["destination"],
                  data.get("report_ref", ""))  # fmt: skip
    failures = data.get("failures") or []
    if failures:
        dead = Table(title="dead-lettered series (fix the cause, then `dicomflow dlq retry`)", header_style="bold red")
        for column in ("series", "folder", "attempts", "reason"):
            dead.add_column(column, overflow="fold")
        for item in failures:
            number = "" if item.get("series_number") is None else str(item["series_number"])
            reason = (item.get("failure") or {}).get("reason", "")
            dead.add_row(f"{number} {item.get('description', '')}".strip() or item["item_id"][:8],
                         item.get("folder") or ".", str(item.get("attempts", "")), reason)  # fmt: skip
        console.print(dead)


def _print_report(console: Console, layout: str, destination: str, report_ref: str) -> None:
    """Where the batch's QA report (and BIDS dataset) is."""
    if layout == "bids":
        console.print(f"BIDS dataset: {destination}")
    if report_ref:
        where = report_ref if report_ref.startswith("/") else f"report.html in {destination} (Drive file {report_ref})"
        console.print(f"report: {where}")
