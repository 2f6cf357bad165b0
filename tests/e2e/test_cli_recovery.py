"""Recovering the way the summary says (issue 13): `dlq retry` reads each series again from its source —
files re-exported under a new name, put back or removed — and a re-conversion replaces a series' earlier
outputs as a set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dicomflow import samples
from dicomflow.demo import nifti_shape
from tests.support.cli import json_result, outputs, run_cli

pytestmark = pytest.mark.e2e


def _broken_series(tmp_path: Path, slices: int = 6) -> tuple[samples.WrittenSeries, Path]:
    written = samples.write_series(tmp_path / "dicom" / "ct", samples.SeriesSpec(kind="ct", slices=slices), seed=8)
    good = tmp_path / "re-exported.dcm"
    shutil.copy(written.paths[2], good)
    samples.corrupt_file(written.paths[2])
    return written, good


def test_dlq_retry_as_the_summary_says_reads_new_fixed_and_removed_files(tmp_path: Path) -> None:
    written, good = _broken_series(tmp_path)
    out = tmp_path / "out"
    first = run_cli("convert", str(tmp_path / "dicom"), str(out), home=tmp_path, check_codes=(2,))
    advice = first.stdout.split("fix the cause, then `", 1)[1].split("`", 1)[0]
    assert advice.startswith("dicomflow dlq retry ")

    # The user removes the broken file and puts the re-exported one back under another name, and a stray
    # file lands in the folder: the series must be read again, not its old file list re-stated.
    written.paths[2].unlink()
    shutil.copy(good, written.paths[2].with_name("IM-reexported.dcm"))
    (written.paths[0].parent / "notes.txt").write_text("not an image")

    retried = run_cli(*advice.split()[1:], "--json", home=tmp_path)  # exactly the advice, from anywhere
    data = json_result(retried)
    assert retried.returncode == 0 and data["status"] == "completed", data
    assert data["counters"]["succeeded"] == 1 and data["incomplete"] == 0 and data["notes"] == []
    (image,) = [p for p in outputs(out) if p.name.endswith(".nii.gz")]
    assert nifti_shape(image)[2] == 6  # every slice, the re-exported one included


def test_dlq_retry_of_a_series_whose_files_are_gone_says_so(tmp_path: Path) -> None:
    written, _ = _broken_series(tmp_path)
    samples.write_series(tmp_path / "dicom" / "mr", samples.SeriesSpec(kind="mr3d", slices=4), seed=9)
    out = tmp_path / "out"
    batch_id = json_result(run_cli("convert", str(tmp_path / "dicom"), str(out), "--json", home=tmp_path,
                                   check_codes=(2,)))["batch_id"]  # fmt: skip
    shutil.rmtree(written.paths[0].parent)

    data = json_result(run_cli("dlq", "retry", batch_id[:8], str(out), "--json", home=tmp_path, check_codes=(2,)))
    (dead,) = data["dead_letters"]
    assert "none of this series' files are in its source folder any more" in dead["reason"]
    assert data["counters"]["succeeded"] == 1  # the other series is untouched


def test_a_reconversion_with_other_options_replaces_the_outputs_as_a_set(tmp_path: Path) -> None:
    samples.write_series(tmp_path / "dicom" / "ct", samples.SeriesSpec(kind="ct", slices=4), seed=10)
    out = tmp_path / "out"
    (out / "ct").mkdir(parents=True)
    mine = out / "ct" / "my-notes.txt"  # a file of the user's, next to the outputs
    mine.write_text("keep me")

    def names() -> set[str]:
        return {p.name.split(".", 1)[1] for p in outputs(out) if p != mine and p.name != "report.html"}

    run_cli("convert", str(tmp_path / "dicom"), str(out), "--no-compress", home=tmp_path, check_codes=(0,))
    assert names() == {"nii", "json"}
    again = json_result(run_cli("convert", str(tmp_path / "dicom"), str(out), "--json", home=tmp_path))
    assert again["counters"]["succeeded"] == 1
    assert names() == {"nii.gz", "json"}  # the .nii of the first run is gone

    # Back to the first options: converted again (its earlier success no longer counts), not "already there".
    back = json_result(run_cli("convert", str(tmp_path / "dicom"), str(out), "--no-compress", "--json",
                               home=tmp_path))  # fmt: skip
    assert back["counters"]["succeeded"] == 1 and back["already_converted"] == 0
    assert names() == {"nii", "json"}
    assert mine.read_text() == "keep me"
    first = json_result(run_cli("status", str(out), "--json", home=tmp_path))[-1]  # oldest batch
    (note,) = first["notes"]
    assert "its outputs were replaced by the conversion of batch" in note["warnings"][-1]
