"""Checks that `dicomflow demo` converted its sample archive as its manifest expects.

The shape of each NIfTI is read from its header (no extra dependency), so the demo proves more than
"files exist": every good series became a volume of the right dimensions, the diffusion series got its
.bval/.bvec, the corrupt series produced nothing, and the report-only series was skipped. The BIDS
version of the archive must hold every series of its BIDS session under its expected name.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

from dicomflow.domain.model import Batch
from dicomflow.domain.series import safe_component
from dicomflow.samples import DemoArchive, DemoSeries
from dicomflow.samples_bids import BidsSession


def nifti_shape(path: Path) -> tuple[int, ...]:
    """dim[1..dim[0]] from a NIfTI-1 header (.nii or .nii.gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        header = handle.read(348)
    if len(header) < 348:
        raise ValueError(f"{path.name} is not a NIfTI-1 file")
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    dims = struct.unpack(f"{endian}8h", header[40:56])
    return tuple(int(d) for d in dims[1 : dims[0] + 1])


def expected_stem(series: DemoSeries) -> str:
    return f"{series.series_number}_{safe_component(series.series_description)}"


def check_demo_result(archive: DemoArchive, nifti_root: Path, batch: Batch, *, extra_series: int = 0) -> list[str]:
    """`extra_series`: series added to the archive that all convert (the BIDS session of the demo)."""
    problems: list[str] = []
    converted = archive.with_outcome("convert")
    counters = batch.counters
    expected = {
        "series_total": len(archive.series) + extra_series,
        "succeeded": len(converted) + extra_series,
        "skipped": len(archive.with_outcome("skip")),
        "dead_lettered": len(archive.with_outcome("fail")),
    }
    actual = {key: getattr(counters, key) for key in expected}
    if actual != expected:
        problems.append(f"counters {actual} differ from the expected {expected}")
    for series in archive.series:
        stem = expected_stem(series)
        folder = output_folder(nifti_root, series, stem)
        if series.outcome != "convert":
            strays = sorted(folder.glob(f"{stem}*")) if folder.exists() else []
            if strays:
                problems.append(f"{series.label}: expected no output, found {[p.name for p in strays]}")
            continue
        for suffix in series.output_suffixes:
            image = folder / f"{stem}{suffix}.nii.gz"
            if not image.exists():
                problems.append(f"{series.label}: missing {image}")
                continue
            if series.expected_shape and nifti_shape(image) != tuple(series.expected_shape):
                problems.append(f"{series.label}: shape {nifti_shape(image)} != expected {series.expected_shape}")
            if not (folder / f"{stem}{suffix}.json").exists():
                problems.append(f"{series.label}: missing the BIDS sidecar {stem}{suffix}.json")
        for extra in series.extra_outputs:
            if not (folder / f"{stem}.{extra}").exists():
                problems.append(f"{series.label}: missing {stem}.{extra}")
    if not (nifti_root / "report.html").is_file():
        problems.append(f"no report.html in {nifti_root}")
    return problems


def check_bids_demo(session: BidsSession, bids_root: Path, batch: Batch) -> list[str]:
    """The BIDS version of the archive: every series of the BIDS session under the name it must have, the
    other subjects of the archive present, the top-level files and the report written."""
    problems: list[str] = []
    if batch.finish_pending or not batch.report_ref:
        problems.append("the BIDS batch's report and dataset were not written")
    prefix = bids_root / f"sub-{session.subject}" / f"ses-{session.session}"
    for series in session.series:
        for expected in series.expected:
            datatype, name = expected.split("/")
            path = prefix / datatype / f"sub-{session.subject}_ses-{session.session}_{name}.nii.gz"
            if not path.is_file():
                problems.append(f"{series.description}: missing {path.relative_to(bids_root)}")
    for name in ("dataset_description.json", "participants.tsv", ".bidsignore", "README.md", "report.html"):
        if not (bids_root / name).is_file():
            problems.append(f"missing {name} in {bids_root}")
    participants = (bids_root / "participants.tsv").read_text() if (bids_root / "participants.tsv").is_file() else ""
    for subject in ("01", "02", "03", session.subject):
        if f"sub-{subject}\n" not in participants:
            problems.append(f"participants.tsv does not list sub-{subject}")
    return problems


def output_folder(nifti_root: Path, series: DemoSeries, stem: str) -> Path:
    """Where the series' outputs belong. Its source folders' names, unless the privacy profile renamed
    one: folder names with long digit runs (a CD export's PT000000/ST000000, which could as well be
    record numbers) become `<kept part>-<tag>`, keyed by the destination's secret. Such a folder is
    found at the same depth below the first folder, by the series' own output name."""
    folder = nifti_root / series.folder
    if folder.exists() or len(series.folder.parts) < 2:
        return folder
    top = nifti_root / series.folder.parts[0]
    depth = len(series.folder.parts) - 1
    found = {p.parent for p in top.rglob(f"{stem}*.nii.gz") if len(p.parent.relative_to(top).parts) == depth}
    return found.pop() if len(found) == 1 else folder
