"""`dicomflow convert --layout bids` as a user runs it: a real process, real workers, the official validator;
and the mistakes a user makes (labels, mapping files, rules files, folder names), refused with what to fix
before anything is converted — or, for folder names found while listing, with the batch failing and
nothing already converted lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomflow.samples import SeriesSpec, write_series
from dicomflow.samples_bids import BIDS_RULES, add_bids_session
from tests.integration.test_bids_dataset import EXPECTED_WARNINGS, errors_of, validate

pytestmark = pytest.mark.e2e

DICOMFLOW = str(Path(sys.executable).parent / "dicomflow")


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([DICOMFLOW, *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".dicomflow" not in p.relative_to(root).parts
    }


def test_convert_layout_bids_validates_and_the_summary_says_where_the_report_is(tmp_path: Path) -> None:
    source, out, rules = tmp_path / "dicom", tmp_path / "bids", tmp_path / "rules.json"
    session = add_bids_session(source)
    rules.write_text(BIDS_RULES)
    first = run("convert", str(source), str(out), "--layout", "bids", "--rules", str(rules), "--json", home=tmp_path)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["layout"] == "bids" and data["report"] == str(out / "report.html")
    assert data["counters"]["succeeded"] == len(session.series)
    result = validate(out)
    assert errors_of(result) == []
    assert {i["code"] for i in result["issues"]["issues"] if i["severity"] == "warning"} <= EXPECTED_WARNINGS
    for series in session.series:
        for expected in series.expected:
            datatype, name = expected.split("/")
            assert (out / "sub-04" / "ses-01" / datatype / f"sub-04_ses-01_{name}.nii.gz").is_file(), expected
    again = run("convert", str(source), str(out), "--layout", "bids", "--rules", str(rules), home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"report: {out / 'report.html'}" in again.stdout and f"BIDS dataset: {out}" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "bids", "--subject", "01_a"], "--subject: invalid subject label '01_a'"),
        (["--subject", "01"], "--subject: only with --layout bids"),
        (["--layout", "bids", "--session", "pre"], "--session: --session needs --subject"),
        (["--layout", "bids", "--subjects", "{csv}"], "subjects line 2: expected `source folder,subject[,session]`"),
        (["--layout", "bids", "--subjects", "{csv2}"], "invalid session label 'pre-op'"),
        (["--layout", "bids", "--rules", "{regex}"], "rule 'rest' (rule 1): invalid regular expression '('"),
        (["--layout", "bids", "--rules", "{toml}"], "the rules file is not valid TOML"),
        (["--layout", "bids", "--rules", "{missing}"], "cannot read it"),
    ],
)
def test_bad_labels_mappings_and_rules_are_refused_before_anything_is_converted(
    tmp_path: Path, args: list[str], message: str
) -> None:
    source, out = tmp_path / "dicom", tmp_path / "out"
    write_series(source / "exam", SeriesSpec(kind="mr3d", slices=4, rows=16, columns=16), seed=1)
    files = {
        "{csv}": ("subjects.csv", "folder,subject\nexam\n"),
        "{csv2}": ("subjects.csv", "exam,01,pre-op\n"),
        "{regex}": ("rules.json", json.dumps({"rules": [{"id": "rest", "match": {"SeriesDescription": {
            "regex": "("}}, "datatype": "func", "suffix": "bold", "entities": {"task": "rest"}}]})),
        "{toml}": ("rules.toml", "[[rules]\nid = 'x'\n"),
        "{missing}": ("absent.json", None),
    }  # fmt: skip
    argv = []
    for arg in args:
        if arg not in files:
            argv.append(arg)
            continue
        name, text = files[arg]
        if text is not None:
            (tmp_path / name).write_text(text)
        argv.append(str(tmp_path / name))
    result = run("convert", str(source), str(out), *argv, home=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert not out.exists()  # nothing was accepted, nothing written


def test_a_folder_with_a_bad_label_fails_the_batch_naming_it_and_loses_nothing(tmp_path: Path) -> None:
    source, out = tmp_path / "dicom", tmp_path / "bids"
    write_series(source / "sub-01" / "ses-1" / "t1", SeriesSpec(kind="mr3d", series_number=1, slices=6), seed=1)
    assert run("convert", str(source), str(out), "--layout", "bids", home=tmp_path).returncode == 0
    before = files_of(out)
    assert "sub-01/ses-1/anat/sub-01_ses-1_acq-tfl3_run-1_T1w.nii.gz" in before
    write_series(source / "sub-02_b" / "t1", SeriesSpec(kind="mr3d", series_number=1, slices=6), seed=2)
    failed = run("convert", str(source), str(out), "--layout", "bids", home=tmp_path)
    assert failed.returncode == 1
    assert "batch failed" in failed.stdout and "'sub-02_b'" in failed.stdout
    after = files_of(out)
    assert {n: b for n, b in after.items() if n != "report.html"} == {
        n: b for n, b in before.items() if n != "report.html"
    }
    assert "sub-02_b" in after["report.html"].decode()  # the failed batch's report says why
