"""The QA report of a batch: one self-contained HTML page (`report.html` in the destination).

Built from plain data the pipeline fills from its state (`ReportSeries` per series, `BatchSummary` for
the batch), with image facts from `adapters.thumbnails.describe`. The page carries everything inline —
CSS in a <style> element, thumbnails as data: URIs — so it opens from Drive, e-mail or a laptop with no
network. Every value that comes from users or DICOM (folder and series names, reasons, warnings) is
HTML-escaped. The same input gives the same bytes: nothing reads the clock or the environment, and
times are rendered in UTC.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Final

# Warnings that mean the series may be incomplete (dicomflow's own wording in domain/conversion.py and
# dcm2niix's console messages about missing slices or volumes).
_INCOMPLETE: Final = (
    (re.compile(r"used \d+ of the \d+ files", re.IGNORECASE), "some files of the series were not used"),
    (re.compile(r"converted only part", re.IGNORECASE), "only part of the series was converted"),
    (re.compile(r"missing (images|slices|volumes)|slices? (is|are) missing", re.IGNORECASE), "slices are missing"),
    (re.compile(r"incomplete volume|uneven (number|slices)", re.IGNORECASE), "volumes are incomplete"),
)

_CSS: Final = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#1b1b1b;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%}th,td{text-align:left;vertical-align:top;padding:.35em .5em;
border-bottom:1px solid #eee}th{background:#f6f6f6;font-weight:600}
.totals td,.totals th{width:auto}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176117}.skip{color:#6b5500}.dead{color:#a11}.flag{color:#a11;font-weight:600}
img{display:block;image-rendering:pixelated;background:#000;max-width:100%}
code{font-size:.92em;word-break:break-all}ul{margin:.2em 0;padding-left:1.2em}.muted{color:#666}
"""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the report shows of a NIfTI image (filled by `adapters.thumbnails.describe`)."""

    shape: tuple[int, ...]
    voxel_size: tuple[float, ...]  # mm (and seconds for the 4th axis when the header says so)
    volumes: int
    thumbnail_png: bytes | None  # None when the image cannot be drawn (e.g. RGB or empty)
    thumbnail_size: tuple[int, int] = (0, 0)  # (width, height) in pixels


@dataclass(frozen=True, slots=True)
class ReportOutput:
    """One output file of a series: its name in the destination (BIDS path or mirror path)."""

    name: str
    image: ImageInfo | None = None
    unclassified_reason: str = ""  # --layout bids: why it sits in unclassified/


@dataclass(frozen=True, slots=True)
class ReportSeries:
    series_id: str
    source: str  # source folder, as the user named it
    series_number: int | None
    description: str
    modality: str
    state: str  # succeeded, skipped, dead_lettered (or a non-final state for a report mid-batch)
    outputs: tuple[ReportOutput, ...] = ()
    warnings: tuple[str, ...] = ()
    reason: str = ""  # skip reason or failure reason
    failure_code: str = ""
    attempts: int = 0
    files: int = 0
    seconds: float = 0.0  # download + convert + upload
    incomplete: bool = False  # dicomflow flagged the conversion as incomplete (missing slices or volumes)


@dataclass(frozen=True, slots=True)
class BatchSummary:
    batch_id: str
    label: str
    status: str
    layout: str  # "mirror" or "bids"
    series_total: int
    succeeded: int
    skipped: int
    dead_lettered: int
    created_at: float | None = None  # POSIX seconds
    finished_at: float | None = None
    files_seen: int = 0
    files_ignored: int = 0
    failure: str = ""  # why the batch failed (its source could not be expanded), in plain language


def incomplete_flags(warnings: Sequence[str]) -> tuple[str, ...]:
    """Plain-language flags for warnings that say a series may be incomplete, in a stable order."""
    return tuple(flag for pattern, flag in _INCOMPLETE if any(pattern.search(w) for w in warnings))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render(summary: BatchSummary, series: Sequence[ReportSeries]) -> str:
    """The whole report page."""
    ordered = sorted(series, key=lambda s: (s.source, s.series_number or 0, s.description, s.series_id))
    converted = [s for s in ordered if s.state == "succeeded"]
    skipped = [s for s in ordered if s.state == "skipped"]
    dead = [s for s in ordered if s.state == "dead_lettered"]
    other = [s for s in ordered if s.state not in ("succeeded", "skipped", "dead_lettered")]
    title = f"dicomflow report — {summary.label or summary.batch_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _totals(summary, ordered),
        _converted(converted),
        _problems("Dead-lettered series", "dead", dead, "Fix the cause, then run dicomflow dlq retry."),
        _problems("Skipped series", "skip", skipped, ""),
        _problems("Not finished", "skip", other, "These series had not finished when the report was written."),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _totals(summary: BatchSummary, series: Sequence[ReportSeries]) -> str:
    elapsed = (
        _duration(summary.finished_at - summary.created_at)
        if summary.created_at is not None and summary.finished_at is not None
        else "—"
    )
    work = sum(s.seconds for s in series)
    rows = [
        ("Batch", f"<code>{_e(summary.batch_id)}</code>"),
        ("Status", _e(summary.status) + (f'<br><span class="dead">{_e(summary.failure)}</span>'
                                          if summary.failure else "")),
        ("Layout", _e(summary.layout)),
        ("Series", f'{summary.series_total}: <span class="ok">{summary.succeeded} converted</span>, '
         f'<span class="skip">{summary.skipped} skipped</span>, '
         f'<span class="dead">{summary.dead_lettered} dead-lettered</span>'),
        ("Files", f"{summary.files_seen} seen, {summary.files_ignored} not DICOM images"),
        ("Started", _when(summary.created_at)),
        ("Finished", _when(summary.finished_at)),
        ("Elapsed", elapsed),
        ("Work time", f"{_duration(work)} (download, conversion and upload of every series, added up)"),
    ]  # fmt: skip
    body = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return f'<h2>Batch</h2><table class="totals">{body}</table>'


def _name(s: ReportSeries) -> str:
    number = "" if s.series_number is None else f"{s.series_number} "
    return f"{number}{s.description or s.modality or 'series'}"


def _image_cell(image: ImageInfo | None) -> str:
    if image is None:
        return '<span class="muted">no image</span>'
    facts = (
        f"shape {' &times; '.join(map(str, image.shape))}<br>"
        f"voxel {' &times; '.join(f'{z:g}' for z in image.voxel_size[:3])} mm<br>"
        f"{image.volumes} volume{'s' if image.volumes != 1 else ''}"
    )
    if image.thumbnail_png is None:
        return f'{facts}<br><span class="muted">no thumbnail</span>'
    width, height = image.thumbnail_size
    return (
        f'<img src="{data_uri(image.thumbnail_png)}" width="{width}" height="{height}" '
        f'alt="sagittal, coronal and axial mid-slices">{facts}'
    )


def _converted(series: Sequence[ReportSeries]) -> str:
    if not series:
        return "<h2>Converted series</h2><p>None.</p>"
    rows = []
    for s in series:
        flags = incomplete_flags(s.warnings)
        if s.incomplete and not flags:
            flags = ("dcm2niix reported missing slices or volumes: check the images",)
        notes = "".join(f'<li class="flag">{_e(f)}</li>' for f in flags)
        notes += "".join(f"<li>{_e(w)}</li>" for w in s.warnings)
        first = True
        for out in s.outputs or (ReportOutput(""),):
            aside = (
                f'<br><span class="skip">unclassified: {_e(out.unclassified_reason)}</span>'
                if out.unclassified_reason
                else ""
            )
            lead = (
                f'<td rowspan="{max(1, len(s.outputs))}"><b>{_e(_name(s))}</b><br>'
                f'<span class="muted">{_e(s.source)}</span><br>{_e(s.modality)}, {s.files} files, '
                f"{_duration(s.seconds)}</td>"
                if first
                else ""
            )
            tail = f'<td rowspan="{max(1, len(s.outputs))}"><ul>{notes}</ul></td>' if first else ""
            rows.append(
                f'<tr data-series="{_e(s.series_id)}">{lead}<td><code>{_e(out.name)}</code>{aside}</td>'
                f"<td>{_image_cell(out.image)}</td>{tail}</tr>"
            )
            first = False
    head = "<tr><th>Series</th><th>Output</th><th>Image</th><th>Warnings</th></tr>"
    return f"<h2>Converted series ({len(series)})</h2><table>{head}{''.join(rows)}</table>"


def _problems(title: str, css: str, series: Sequence[ReportSeries], hint: str) -> str:
    if not series:
        return ""
    rows = "".join(
        f'<tr data-series="{_e(s.series_id)}"><td><b>{_e(_name(s))}</b><br><span class="muted">{_e(s.source)}</span>'
        f'</td><td class="{css}">{_e(s.reason)}</td><td><code>{_e(s.failure_code)}</code></td>'
        f'<td class="num">{s.attempts}</td><td><ul>{"".join(f"<li>{_e(w)}</li>" for w in s.warnings)}</ul></td></tr>'
        for s in series
    )
    head = "<tr><th>Series</th><th>Reason</th><th>Code</th><th>Attempts</th><th>Warnings</th></tr>"
    note = f"<p>{_e(hint)}</p>" if hint else ""
    return f"<h2>{_e(title)} ({len(series)})</h2>{note}<table>{head}{rows}</table>"
