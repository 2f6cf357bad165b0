"""Checks that `dicomflow demo` converted its sample archive as its manifest expects.

The shape of each NIfTI is read from its header (no extra dependency), so the demo proves more than
"files exist": every good series became a volume of the right dimensions, the diffusion series got its
.bval/.bvec, the corrupt series produced nothing, and the report-only series was skipped.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

from dicomflow.domain.model import Batch
from dicomflow.domain.series import safe_component
from dicomflow.samples import DemoArchive, DemoSeries


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


def check_demo_result(archive: DemoArchive, nifti_root: Path, batch: Batch) -> list[str]:
    problems: list[str] = []
    converted = archive.with_outcome("convert")
    counters = batch.counters
    expected = {
        "series_total": len(archive.series),
        "succeeded": len(converted),
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
