"""Whose state `status` and `dlq` read (issue 13): the destination's own, never a hidden "last" pointer;
batch ids in full, unique prefixes accepted; a batch whose run died reads "interrupted"; a source and a
destination that contain each other are refused."""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path

import pytest

from dicomflow import samples
from tests.support.cli import cli_env, json_result, run_cli

pytestmark = pytest.mark.e2e


def _convert(tmp_path: Path, name: str, *, corrupt: bool) -> tuple[Path, str]:
    written = samples.write_series(tmp_path / name / "ct", samples.SeriesSpec(kind="ct", slices=4), seed=len(name))
    if corrupt:
        samples.corrupt_file(written.paths[1])
    out = tmp_path / f"{name}-nifti"
    result = run_cli("convert", str(tmp_path / name), str(out), "--json", home=tmp_path, check_codes=(2,) if corrupt
                     else (0,))  # fmt: skip
    return out, str(json_result(result)["batch_id"])


def test_status_and_dlq_read_the_destination_they_are_given(tmp_path: Path) -> None:
    first, first_id = _convert(tmp_path, "alpha", corrupt=True)
    second, second_id = _convert(tmp_path, "beta", corrupt=False)
    # A failing command changes nothing anyone reads afterwards (there is no "last state" to move).
    run_cli("convert", str(tmp_path / "missing"), str(tmp_path / "x"), home=tmp_path, check_codes=(1,))

    recent = run_cli("status", home=tmp_path).stdout  # no target: the destinations, for the user to choose
    assert str(first) in recent and str(second) in recent and first_id in recent and second_id in recent
    assert "give one" in recent

    own = run_cli("status", str(first), home=tmp_path).stdout
    assert first_id in own and second_id not in own
    dead = run_cli("dlq", "list", str(first), home=tmp_path).stdout
    assert first_id in dead and f"dicomflow dlq retry {first_id} {first}" in dead
    assert "no dead-lettered series" in run_cli("dlq", "list", str(second), home=tmp_path).stdout

    # A unique prefix finds the batch among the recent destinations; the JSON carries the full id.
    by_prefix = json_result(run_cli("status", second_id[:6], "--json", home=tmp_path))
    assert by_prefix["batch_id"] == second_id and by_prefix["destination"] == str(second)
    unknown = run_cli("status", "ffffffffffffffffffff0", home=tmp_path, check_codes=(1,))
    assert "no batch" in unknown.stderr


def test_ids_are_never_cut_to_the_terminal_width(tmp_path: Path) -> None:
    out, batch_id = _convert(tmp_path, "gamma", corrupt=True)
    env = cli_env(tmp_path, COLUMNS="40")
    for args in (["status", str(out)], ["status", batch_id], ["dlq", "list", str(out)], ["status"]):
        result = run_cli(*args, home=tmp_path, env=env)
        assert batch_id in result.stdout.replace("\n", ""), args
        assert batch_id in result.stdout, f"{args}: the id was split or cut"


def test_an_unfinished_batch_is_running_while_its_run_lives_and_interrupted_after(tmp_path: Path) -> None:
    out, batch_id = _convert(tmp_path, "delta", corrupt=False)
    state = out / ".dicomflow" / "state.sqlite"
    # Make the batch unfinished, as a run killed while converting leaves it.
    with sqlite3.connect(state) as db:
        db.execute("UPDATE batches SET status = 'running', data = json_set(data, '$.status', 'running')")
        db.execute("UPDATE items SET state = 'running', data = json_set(data, '$.state', 'running')")

    with (out / ".dicomflow" / "state.sqlite.lock").open("a") as lock:  # a live run holds the state's lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        alive = json_result(run_cli("status", batch_id, str(out), "--json", home=tmp_path))
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert alive["status"] == "running"

    dead = run_cli("status", batch_id, str(out), home=tmp_path, check_codes=(130,))
    assert "interrupted: run the same command to resume" in dead.stdout
    assert f"dicomflow convert {tmp_path / 'delta'} {out}" in dead.stdout.replace("\n", "")


@pytest.mark.parametrize("case", ["inside", "contains", "same"])
def test_a_source_and_destination_that_contain_each_other_are_refused(case: str, tmp_path: Path) -> None:
    source = tmp_path / "archive"
    samples.write_series(source / "ct", samples.SeriesSpec(kind="ct", slices=4), seed=3)
    destination = {"inside": source / "nifti", "contains": tmp_path, "same": source}[case]
    before = sorted(p for p in tmp_path.rglob("*"))
    result = run_cli("convert", str(source), str(destination), home=tmp_path, check_codes=(1,))
    assert "Choose a destination folder" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written: no state, no outputs


def test_a_destination_reached_through_a_link_into_the_source_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "archive"
    samples.write_series(source / "ct", samples.SeriesSpec(kind="ct", slices=4), seed=4)
    (source / "out").mkdir()
    (tmp_path / "looks-elsewhere").symlink_to(source / "out")
    result = run_cli("convert", str(source), str(tmp_path / "looks-elsewhere"), home=tmp_path, check_codes=(1,))
    assert "is inside the source" in result.stderr
