"""`dicomflow` as a user runs it: a real process, real worker processes, real dcm2niix, real files."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from dicomflow import samples
from tests.support.cli import DICOMFLOW, cli_env, json_result, outputs, run_cli, wait_for_succeeded

pytestmark = pytest.mark.e2e


def test_convert_demo_archive_then_rerun_is_incremental(tmp_path: Path) -> None:
    archive = samples.make_demo_archive(tmp_path / "dicom", seed=11)
    out = tmp_path / "nifti"
    first = run_cli("convert", str(archive.root), str(out), "--json", home=tmp_path)
    assert first.returncode == 2  # the corrupt series was dead-lettered
    data = json_result(first)
    converted = len(archive.with_outcome("convert"))
    assert data["counters"] == {
        "series_total": len(archive.series),
        "succeeded": converted,
        "skipped": len(archive.with_outcome("skip")),
        "dead_lettered": 1,
        "pending": 0,
        "running": 0,
        "retrying": 0,
    }
    (dead,) = data["dead_letters"]
    assert dead["series_number"] == archive.with_outcome("fail")[0].series_number and "dcm2niix" in dead["reason"]
    assert data["files_ignored"] == len(archive.non_dicom_files) + 1  # + the DICOMDIR
    produced = outputs(out)
    assert len([p for p in produced if p.name.endswith(".nii.gz")]) == archive.expected_nifti_count

    second = json_result(run_cli("convert", str(archive.root), str(out), "--json", home=tmp_path))
    assert second["batch_id"] != data["batch_id"]
    assert second["counters"]["succeeded"] == 0
    assert second["counters"]["skipped"] == converted + len(archive.with_outcome("skip"))
    assert second["counters"]["dead_lettered"] == 1  # still broken: tried again, not silently skipped
    assert outputs(out) == produced

    status = run_cli("status", data["batch_id"], "--json", home=tmp_path)
    assert json_result(status)["counters"] == data["counters"]
    listing = run_cli("dlq", "list", str(out), home=tmp_path)
    assert "dcm2niix" in listing.stdout


def test_kill_9_then_rerun_finishes_with_exact_counters_and_no_duplicates(tmp_path: Path) -> None:
    written = samples.make_bench_archive(tmp_path / "dicom", series=16, slices=24, rows=96, cols=96, seed=5)
    out = tmp_path / "nifti"
    state = out / ".dicomflow" / "state.sqlite"
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [DICOMFLOW, "convert", str(tmp_path / "dicom"), str(out), "--workers", "2", "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    succeeded = wait_for_succeeded(proc, state, at_least=3)
    assert proc.poll() is None, "the run finished before it could be killed; make the archive larger"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes, mid-series
    proc.wait()
    assert 3 <= succeeded < len(written)

    result = run_cli("convert", str(tmp_path / "dicom"), str(out), "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json_result(result)
    assert data["counters"]["series_total"] == data["counters"]["succeeded"] == len(written)
    images = [p for p in outputs(out) if p.name.endswith(".nii.gz")]
    assert len(images) == len(written)
    assert not [p for p in out.rglob("*") if "dicomflow-partial" in p.name]
    with sqlite3.connect(state) as db:
        rows = db.execute("SELECT data FROM items WHERE batch_id = ?", (data["batch_id"],)).fetchall()
    for (raw,) in rows:
        for output in json.loads(raw)["outputs"]:
            assert hashlib.sha256(Path(output["ref"]).read_bytes()).hexdigest() == output["sha256"]


@pytest.mark.parametrize("case", ["missing", "file", "dest_under_file"])
def test_bad_locations_fail_with_the_path_and_no_state(case: str, tmp_path: Path) -> None:
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    source, dest = {
        "missing": (tmp_path / "nope", tmp_path / "out"),
        "file": (a_file, tmp_path / "out"),
        "dest_under_file": (tmp_path, a_file / "out"),
    }[case]
    result = run_cli("convert", str(source), str(dest), home=tmp_path, check_codes=(1,))
    assert str(source if case != "dest_under_file" else a_file) in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_source_says_so_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no images here")
    result = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "out"), home=tmp_path, check_codes=(1,))
    assert "no DICOM series found" in result.stderr and "1 file(s) skipped" in result.stderr


def test_dead_letters_can_be_retried_after_fixing_the_cause(tmp_path: Path) -> None:
    good = samples.write_series(tmp_path / "dicom" / "ct", samples.SeriesSpec(kind="ct", slices=6), seed=8)
    victim = good.paths[2]
    backup = tmp_path / "backup.dcm"
    shutil.copy(victim, backup)
    samples.corrupt_file(victim)
    out = tmp_path / "out"
    first = json_result(run_cli("convert", str(tmp_path / "dicom"), str(out), "--json", home=tmp_path))
    assert first["counters"]["dead_lettered"] == 1
    shutil.copy(backup, victim)  # the user re-exports the broken file
    retried = run_cli("dlq", "retry", first["batch_id"], "--json", home=tmp_path)
    assert retried.returncode == 0, retried.stderr
    data = json_result(retried)
    assert data["batch_id"] == first["batch_id"]
    assert data["status"] == "completed"
    assert data["counters"]["succeeded"] == data["counters"]["series_total"] == 1


def test_plain_output_when_not_a_terminal_and_help_texts(tmp_path: Path) -> None:
    samples.write_series(tmp_path / "dicom" / "a", samples.SeriesSpec(kind="ct", slices=4), seed=9)
    result = run_cli("convert", str(tmp_path / "dicom"), str(tmp_path / "out"), home=tmp_path)
    assert result.returncode == 0
    assert "succeeded" in result.stderr  # one plain line per finished series
    assert "\x1b[" not in result.stderr  # no terminal control codes in logs
    for command in (["--help"], ["convert", "--help"], ["status", "--help"], ["dlq", "retry", "--help"]):
        assert run_cli(*command, home=tmp_path).returncode == 0
    assert "DICOMFLOW_WORKERS" in run_cli("convert", "--help", home=tmp_path).stdout


def test_no_patient_identifier_leaves_the_conversion(tmp_path: Path) -> None:
    patients = [samples.phi_patient(tag) for tag in ("ALPHA", "BRAVO", "CHARL")]
    archive = samples.make_demo_archive(tmp_path / "dicom", seed=13, patients=patients)
    out = tmp_path / "nifti"
    result = run_cli("convert", str(archive.root), str(out), "--json", home=tmp_path)
    secrets = {p.name for p in patients} | {p.patient_id for p in patients} | {p.birth_date for p in patients}
    secrets |= {part for p in patients for part in p.name.split("^")}
    secrets |= {p.birth_date[:4] + "-" + p.birth_date[4:6] + "-" + p.birth_date[6:] for p in patients}

    haystacks: dict[str, bytes] = {"cli stdout": result.stdout.encode(), "cli stderr": result.stderr.encode()}
    for path in out.rglob("*"):
        haystacks[f"name {path.relative_to(out)}"] = str(path.relative_to(out)).encode()
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        haystacks[f"file {path.relative_to(out)}"] = data
    with sqlite3.connect(out / ".dicomflow" / "state.sqlite") as db:
        haystacks["sqlite"] = "\n".join(db.iterdump()).encode()
    assert (out / ".dicomflow" / "dicomflow.log").stat().st_size > 0  # the log was searched, and is not empty

    hits = [(where, s) for where, blob in haystacks.items() for s in secrets if s.encode().lower() in blob.lower()]
    assert hits == []
    assert json_result(result)["counters"]["succeeded"] == len(archive.with_outcome("convert"))


def test_demo_runs_with_a_relative_directory_as_make_demo_does(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run([DICOMFLOW, "demo", "--dir", "demo-out"], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=240, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "demo OK" in result.stdout
    assert list((tmp_path / "demo-out" / "nifti").rglob("*.nii.gz"))


def test_small_series_share_dcm2niix_runs_and_get_what_a_run_each_gives(tmp_path: Path) -> None:
    # Issue 13: with DICOMFLOW_GROUP_SMALL_SERIES=true (off by default) several small series convert in one
    # dcm2niix process; the outputs are the same files (names and bytes) as with one process per series.
    samples.make_bench_archive(tmp_path / "dicom", series=10, slices=12, rows=64, cols=64, seed=3)
    key = {"DICOMFLOW_PSEUDONYM_KEY": "ab" * 32}  # one key: both destinations name folders alike
    runs = {}
    for name, grouped in (("grouped", "true"), ("alone", "false")):
        env = cli_env(tmp_path, DICOMFLOW_GROUP_SMALL_SERIES=grouped, **key)
        out = tmp_path / name
        result = run_cli(
            "convert", str(tmp_path / "dicom"), str(out), "--workers", "2", "--json", home=tmp_path, env=env
        )
        assert result.returncode == 0 and json_result(result)["counters"]["succeeded"] == 10
        log = (out / ".dicomflow" / "dicomflow.log").read_text()
        runs[name] = (out, log)
    assert "series converted in one dcm2niix run" in runs["grouped"][1]
    assert "series converted in one dcm2niix run" not in runs["alone"][1]

    def contents(root: Path) -> dict[str, bytes]:
        # report.html names its batch and times: the series' own files must be identical.
        return {str(p.relative_to(root)): p.read_bytes() for p in outputs(root) if p.name != "report.html"}

    assert contents(runs["grouped"][0]) == contents(runs["alone"][0])
