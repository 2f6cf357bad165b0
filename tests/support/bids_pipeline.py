"""A small stand-in for the conversion pipeline, for the BIDS and report tests.

It does what `dicomflow convert` does to a local source, with dicomflow's own pieces where they are
stable (header scan, grouping, output stems) and the pinned dcm2niix binary with dicomflow's flags, but
without the state store and queue (being rewritten), so these tests exercise the BIDS layout and the
report on real dcm2niix output, not the orchestration. What each series produced is kept per series
folder, as the mirror layout would publish it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dcm2niix

from dicomflow.adapters.dicom_headers import scan_one
from dicomflow.domain.bids import ConvertedSeries, PlannedOutput, sidecar_text
from dicomflow.domain.conversion import console_warnings
from dicomflow.domain.series import DicomHeader, FileRef, SeriesGroup, group_series

FLAGS = ("-z", "y", "-b", "y", "-ba", "y", "-m", "2", "-d", "0", "-w", "1")


@dataclass(frozen=True)
class Converted:
    group: SeriesGroup
    out_dir: Path  # where dcm2niix wrote this series' outputs
    exit_code: int
    warnings: tuple[str, ...]
    seconds: float

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(sorted(p for p in self.out_dir.iterdir() if p.is_file()))

    def as_series(self) -> ConvertedSeries:
        sidecars = {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in self.files if p.suffix == ".json"}
        return ConvertedSeries(
            series_id=self.group.key.item_id,
            rel_dir=self.group.rel_dir,
            stem=self.group.output_stem,
            files=tuple(p.name for p in self.files),
            sidecars=sidecars,
            series_number=self.group.series_number,
            description=self.group.description,
        )


def discover(root: Path) -> list[SeriesGroup]:
    scanned: list[tuple[FileRef, DicomHeader]] = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            size = path.stat().st_size

            def prefix(n: int, path: Path = path) -> bytes:
                with path.open("rb") as fh:
                    return fh.read(n)

            result = scan_one(prefix, size)
            if isinstance(result, DicomHeader):
                scanned.append((FileRef(str(path), path.relative_to(root).as_posix(), size), result))
    return group_series(scanned)


def convert_all(root: Path, work: Path) -> list[Converted]:
    """Every series of `root` through dcm2niix, one call per series on a folder of links to its files."""
    results = []
    for group in discover(root):
        in_dir = work / "in" / group.key.item_id
        out_dir = work / "out" / group.key.item_id
        in_dir.mkdir(parents=True)
        out_dir.mkdir(parents=True)
        for i, ref in enumerate(group.files):
            (in_dir / f"{i:06d}.dcm").symlink_to(ref.ref)
        started = time.monotonic()
        run = subprocess.run(
            [dcm2niix.bin, *FLAGS, "-f", group.output_stem, "-o", str(out_dir), str(in_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        results.append(
            Converted(group, out_dir, run.returncode, console_warnings(run.stdout), time.monotonic() - started)
        )
    return results


def write_dataset(dataset: Path, converted: list[Converted], outputs: tuple[PlannedOutput, ...]) -> None:
    """Copy every output to its planned path; sidecars are rewritten with the plan's additions."""
    by_id = {c.group.key.item_id: c for c in converted}
    for out in outputs:
        source_dir = by_id[out.series_id].out_dir
        for planned in out.files:
            target = dataset / planned.path
            target.parent.mkdir(parents=True, exist_ok=True)
            source = source_dir / planned.source
            if planned.source.endswith(".json"):
                target.write_text(sidecar_text(json.loads(source.read_text()), out))
            else:
                shutil.copyfile(source, target)


def write_files(dataset: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = dataset / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
