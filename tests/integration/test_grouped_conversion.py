"""Small series converted together by one dcm2niix process (issue 13, item 9), with the real binary: each
series gets exactly what a run of it alone gives, and any doubt falls back to one run per series."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from dicomflow import samples
from dicomflow.adapters.dcm2niix import Dcm2niixConverter
from dicomflow.adapters.local.grouped import GroupingConverter
from dicomflow.domain.conversion import parse_console
from dicomflow.domain.series import ConversionOptions
from dicomflow.ports import ConverterRun

pytestmark = pytest.mark.integration

OPTIONS = ConversionOptions(compress=False)  # as the pipeline runs it: the privacy profile compresses later
SPECS = [
    samples.SeriesSpec(kind="mr3d", series_number=3, slices=6),
    samples.SeriesSpec(kind="mr3d", series_number=5, slices=5, echo_times_ms=(5.0, 10.0)),  # _e1, _e2
    samples.SeriesSpec(kind="dwi", series_number=7, slices=4, volumes=4),  # .bval/.bvec
    samples.SeriesSpec(kind="mr4d", series_number=9, slices=4, volumes=3),
    samples.SeriesSpec(kind="ct", series_number=2, slices=5),
]


def _series(root: Path) -> list[Path]:
    folders = []
    for n, spec in enumerate(SPECS):
        written = samples.write_series(root / f"s{n}", spec, seed=40 + n)
        folders.append(written.folder)
    return folders


def _contents(run: ConverterRun) -> dict[str, object]:
    """Each output by name: sidecars as data, images as bytes."""
    return {p.name: json.loads(p.read_text()) if p.suffix == ".json" else p.read_bytes() for p in run.outputs}


def _together(
    converter: GroupingConverter, jobs: list[tuple[Path, Path, str]], extra_threads: int = 0
) -> list[ConverterRun]:
    results: list[ConverterRun | None] = [None] * len(jobs)

    def convert(index: int) -> None:
        try:
            folder, out, stem = jobs[index]
            results[index] = converter.convert(folder, out, stem, OPTIONS, timeout_seconds=60)
        finally:
            converter.done()

    threads = [threading.Thread(target=convert, args=(n,)) for n in range(len(jobs))]
    # Threads of the group whose task ends without a conversion (a duplicate delivery, a skip).
    threads += [threading.Thread(target=converter.done) for _ in range(extra_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_one_run_converts_every_series_exactly_as_alone(tmp_path: Path) -> None:
    folders = _series(tmp_path / "in")
    base = Dcm2niixConverter(60)
    alone = [base.convert(f, tmp_path / "alone" / str(n), f"{n}_x", OPTIONS) for n, f in enumerate(folders)]
    grouping = GroupingConverter(base, len(folders) + 2, tmp_path / "scratch", timeout_seconds=60)
    jobs = [(f, tmp_path / "group" / str(n), f"{n}_x") for n, f in enumerate(folders)]
    together = _together(grouping, jobs, extra_threads=2)

    assert grouping.runs == 1  # one dcm2niix process for all five series
    for solo, grouped in zip(alone, together, strict=True):
        assert grouped.exit_code == 0
        assert _contents(grouped) == _contents(solo)
        assert parse_console(grouped.console).found == parse_console(solo.console).found
        assert [(r.name, r.images, r.dims) for r in parse_console(grouped.console).converted] == [
            (r.name, r.images, r.dims) for r in parse_console(solo.console).converted
        ]
    assert {p.name for p in together[1].outputs} >= {"1_x_e1.nii", "1_x_e2.nii"}
    assert {p.name for p in together[2].outputs} >= {"2_x.bval", "2_x.bvec"}
    assert not list((tmp_path / "scratch").iterdir())  # the group's scratch is gone


def test_two_copies_of_one_series_never_share_a_run(tmp_path: Path) -> None:
    folders = _series(tmp_path / "in")[:2]
    copy = tmp_path / "in" / "copy"
    shutil.copytree(folders[0], copy)  # the same SeriesInstanceUID twice (one series in two batches)
    base = Dcm2niixConverter(60)
    grouping = GroupingConverter(base, 3, tmp_path / "scratch", timeout_seconds=60)
    jobs = [(folders[0], tmp_path / "g0", "a"), (folders[1], tmp_path / "g1", "b"), (copy, tmp_path / "g2", "c")]
    together = _together(grouping, jobs)
    alone = base.convert(folders[0], tmp_path / "solo", "a", OPTIONS)
    assert grouping.runs == 1
    assert _contents(together[0]) == _contents(alone)
    assert {p.name for p in together[2].outputs} == {"c.json", "c.nii"}  # converted alone, not merged with a


def test_a_warning_sends_every_series_back_to_a_run_of_its_own(tmp_path: Path) -> None:
    folders = _series(tmp_path / "in")[:3]
    broken = samples.write_series(tmp_path / "in" / "broken", samples.SeriesSpec(slices=6, series_number=11), seed=9)
    samples.corrupt_file(broken.paths[2], "short_pixel_data")
    folders.append(broken.folder)
    base = Dcm2niixConverter(60)
    grouping = GroupingConverter(base, len(folders), tmp_path / "scratch", timeout_seconds=60)
    jobs = [(f, tmp_path / "group" / str(n), f"{n}_x") for n, f in enumerate(folders)]
    together = _together(grouping, jobs)
    alone = [base.convert(f, tmp_path / "alone" / str(n), f"{n}_x", OPTIONS) for n, f in enumerate(folders)]
    assert grouping.runs == 1  # tried together, refused, then each alone
    for solo, grouped in zip(alone, together, strict=True):
        assert grouped.exit_code == solo.exit_code
        assert _contents(grouped) == _contents(solo)
    # The corrupt series' complaint stays its own; the others' consoles do not carry it.
    assert "Error" in together[3].console or together[3].exit_code != 0
    assert all("rror" not in run.console for run in together[:3])
