"""What `dicomflow` tells the user (issue 13): dcm2niix's warnings and skip reasons per series, incomplete
series flagged, reasons that name the file to fix, unreadable files called unreadable, paths too long for
dcm2niix refused at once, and exit codes that agree with the JSON `status`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dicomflow import samples
from dicomflow.demo import nifti_shape
from tests.support.cli import DICOMFLOW, cli_env, json_result, run_cli, wait_for_succeeded

pytestmark = pytest.mark.e2e


def _gap_series(root: Path) -> samples.WrittenSeries:
    """A CT series with its 4th of 8 slices missing: dcm2niix converts it and warns "Missing images?"."""
    written = samples.write_series(
        root, samples.SeriesSpec(kind="ct", slices=8, series_number=41, series_description="CT_gap"), seed=41
    )
    written.paths[3].unlink()
    return written


def test_warnings_incomplete_series_and_skip_reasons_are_shown_everywhere(tmp_path: Path) -> None:
    archive = samples.make_demo_archive(tmp_path / "dicom", seed=11)
    _gap_series(tmp_path / "dicom" / "sub-09" / "gap")
    out = tmp_path / "nifti"

    text = run_cli("convert", str(archive.root), str(out), home=tmp_path, check_codes=(2,))
    assert "INCOMPLETE" in text.stdout and "41 CT_gap (sub-09/gap)" in text.stdout
    assert "suspects missing images" in text.stdout  # the note on what is missing, not just any warning
    report = archive.with_outcome("skip")[0]
    assert f"{report.series_number} " in text.stdout and "nothing to convert" in text.stdout

    batch_id = text.stdout.split("batch ", 1)[1].split()[0]
    data = json_result(run_cli("status", batch_id, str(out), "--json", home=tmp_path, check_codes=(2,)))
    (gap,) = [n for n in data["notes"] if n["series_number"] == 41]
    assert gap["incomplete"] is True and gap["folder"] == "sub-09/gap"
    assert any("Missing images?" in w for w in gap["warnings"])
    assert data["incomplete"] == 1
    (skipped,) = data["skipped"]
    assert skipped["series_number"] == report.series_number and "no images to convert" in skipped["reason"]

    again = run_cli("status", batch_id, home=tmp_path, check_codes=(2,))  # the same summary, found by its id
    assert "INCOMPLETE" in again.stdout and "41 CT_gap (sub-09/gap)" in again.stdout

    second = json_result(run_cli("convert", str(archive.root), str(out), "--json", home=tmp_path, check_codes=(2,)))
    assert second["already_converted"] == second["counters"]["skipped"] - 1  # the report is skipped again


def test_a_dead_letter_names_the_file_and_quotes_dcm2niix(tmp_path: Path) -> None:
    written = samples.write_series(tmp_path / "dicom" / "ct", samples.SeriesSpec(kind="ct", slices=6), seed=8)
    samples.corrupt_file(written.paths[2])
    data = json_result(
        run_cli("convert", str(tmp_path / "dicom"), str(tmp_path / "out"), "--json", home=tmp_path, check_codes=(2,))
    )
    assert data["status"] == "completed_with_failures"
    (dead,) = data["dead_letters"]
    assert f"ct/{written.paths[2].name}" in dead["reason"]
    assert "dcm2niix said: File not large enough to store image data" in dead["reason"]


def test_unreadable_files_are_reported_as_unreadable_not_as_not_dicom(tmp_path: Path) -> None:
    samples.write_series(tmp_path / "dicom" / "ct", samples.SeriesSpec(kind="ct", slices=4), seed=9)
    (tmp_path / "dicom" / "ct" / "IM-lost.dcm").symlink_to(tmp_path / "moved-away.dcm")
    result = run_cli("convert", str(tmp_path / "dicom"), str(tmp_path / "out"), home=tmp_path)
    assert result.returncode == 0
    assert "unreadable files" in result.stdout and "ct/IM-lost.dcm" in result.stdout


def test_a_source_folder_too_long_for_dcm2niix_is_converted_through_links(tmp_path: Path) -> None:
    deep = tmp_path / "dicom"
    while len(os.fsencode(str(deep))) <= 560:
        deep /= "a_rather_long_folder_name_from_a_pacs_export_" + "x" * 20
    samples.write_series(deep, samples.SeriesSpec(kind="ct", slices=5), seed=10)
    out = tmp_path / "out"
    data = json_result(run_cli("convert", str(tmp_path / "dicom"), str(out), "--json", home=tmp_path))
    assert data["status"] == "completed" and data["counters"]["succeeded"] == 1
    (image,) = out.rglob("*.nii.gz")
    assert nifti_shape(image)[2] == 5


@pytest.mark.parametrize(
    ("length", "message", "fix"),
    [
        (470, "too long a path for dcm2niix", "DICOMFLOW_WORK_DIR"),  # DEST/.dicomflow/work/series-.../out
        (500, "too long a path for SQLite", "--state FILE"),  # DEST/.dicomflow/state.sqlite
    ],
)
def test_a_destination_path_too_long_fails_at_once_with_the_fix(
    length: int, message: str, fix: str, tmp_path: Path
) -> None:
    samples.write_series(tmp_path / "dicom" / "ct", samples.SeriesSpec(kind="ct", slices=4), seed=12)
    out = tmp_path / "o"
    while len(os.fsencode(str(out))) < length:
        out = out.with_name(out.name + "y") if len(out.name) < 200 else out / "o"
    started = time.monotonic()
    result = run_cli("convert", str(tmp_path / "dicom"), str(out), home=tmp_path, check_codes=(1,))
    assert time.monotonic() - started < 30  # refused before any conversion: no retries with backoff
    assert message in result.stderr and fix in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["convert"],  # missing arguments
        ["convert", "a", "b", "--workers", "many"],  # a bad value
        ["no-such-command"],
        ["status", "--no-such-option"],
        ["dlq", "retry"],
    ],
)
def test_usage_errors_exit_1_not_2(args: list[str], tmp_path: Path) -> None:
    result = run_cli(*args, home=tmp_path, check_codes=(1,))
    assert "Usage:" in result.stderr or "Error" in result.stderr


def test_an_empty_source_reports_failed_in_json_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no images here")
    result = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "out"), "--json", home=tmp_path, check_codes=(1,))
    data = json_result(result)
    assert data["status"] == "failed"
    assert data["failure"]["code"] == "no_series" and "no DICOM series found" in data["failure"]["reason"]


def test_ctrl_c_exits_130_and_status_then_says_interrupted(tmp_path: Path) -> None:
    # With grouping on, small series go to workers in groups of up to 32 (local_runtime.small_series_grouper):
    # 96 make at least three groups on two workers, so the first to finish leaves work to interrupt.
    samples.make_bench_archive(tmp_path / "dicom", series=96, slices=24, rows=96, cols=96, seed=5)
    out = tmp_path / "nifti"
    state = out / ".dicomflow" / "state.sqlite"
    env = cli_env(tmp_path, DICOMFLOW_GROUP_SMALL_SERIES="true")
    proc = subprocess.Popen([DICOMFLOW, "convert", str(tmp_path / "dicom"), str(out), "--workers", "2", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    wait_for_succeeded(proc, state, at_least=2)
    assert proc.poll() is None, "the run finished before it could be interrupted; make the archive larger"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr

    listing = run_cli("status", str(out), home=tmp_path)
    assert "interrupted: run the same command to resume" in listing.stdout
    batch_id = listing.stdout.split()[0]
    data = json_result(run_cli("status", batch_id, "--json", home=tmp_path, check_codes=(130,)))
    assert data["status"] == "interrupted" and data["resume"].startswith(" (dicomflow convert ")

    finished = json_result(run_cli("convert", str(tmp_path / "dicom"), str(out), "--json", home=tmp_path))
    assert finished["batch_id"] == batch_id and finished["status"] == "completed"
