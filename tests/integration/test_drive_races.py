"""Writers racing on one Drive destination end with one copy of everything, whatever the interleaving.

Drive's createdTime has millisecond resolution and its ids are random: the sink keeps the oldest item by
(createdTime, id), so two items created in the same millisecond rank by id. tests/support/drive.py's
SameMillisecond forces the unlucky case, two real sinks (two connections, as two processes) against the
fake Drive, at each place a publish creates something: each folder level, and the file itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomflow.adapters.drive.sink import _name_tag
from dicomflow.domain.failures import TransientError
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import OutputFile
from tests.fakes.drive_server import FakeDrive
from tests.support import drive

pytestmark = pytest.mark.integration

OUTPUT = "3_T1w.nii.gz"
SERIES = "series-3"


@pytest.fixture
def fake() -> Iterator[FakeDrive]:
    yield from drive.started()


def loc(folder: str) -> Location:
    return Location(LocationKind.DRIVE, folder)


def in_parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in its own thread (its own sink, its own connection); their results, in order."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:  # re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return results


def outputs_of_two_writers(tmp_path: Path) -> list[Path]:
    """Each writer converted the series itself: identical bytes, its own file."""
    paths = []
    for n in range(2):
        (tmp_path / str(n)).mkdir()
        path = tmp_path / str(n) / OUTPUT
        path.write_bytes(b"identical output")
        paths.append(path)
    return paths


def publishing(fake: FakeDrive, dest: str, rel_dir: str, output: Path) -> Callable[[], tuple[OutputFile, ...]]:
    def publish() -> tuple[OutputFile, ...]:
        connection = drive.connection(fake)
        try:
            return connection.sink().publish(loc(dest), rel_dir, [output], SERIES)  # type: ignore[no-any-return]
        finally:
            connection.close()

    return publish


def only(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    named = [e for e in entries if e["name"] == name]
    assert len(named) == 1, f"{len(named)} items named {name!r}: {named}"
    return named[0]


@pytest.mark.parametrize("level", ["sub-01", "ses-01"])
def test_a_folder_made_twice_in_one_millisecond_ends_as_one_folder_holding_one_copy(
    fake: FakeDrive, tmp_path: Path, level: str
) -> None:
    dest = fake.add_folder("NIfTI", fake.root_id)
    tie = drive.SameMillisecond(fake, creates=drive.creates_folder(level), looks=drive.lists_folder(level))
    outputs = outputs_of_two_writers(tmp_path)
    results = in_parallel(*(publishing(fake, dest, "sub-01/ses-01", path) for path in outputs))

    assert tie.forced
    made = fake.find(name=level, include_trashed=True)
    assert len(made) == 2 and made[0]["createdTime"] == made[1]["createdTime"] and made[1]["id"] < made[0]["id"]
    (sub,) = fake.children(dest)
    (ses,) = fake.children(sub["id"])
    (kept,) = fake.children(ses["id"])
    assert (sub["name"], ses["name"], kept["name"]) == ("sub-01", "ses-01", OUTPUT)
    assert {written.ref for (written,) in results} == {kept["id"]}


def test_an_output_uploaded_twice_in_one_millisecond_is_kept_once_and_both_writers_name_that_copy(
    fake: FakeDrive, tmp_path: Path
) -> None:
    dest = fake.add_folder("NIfTI", fake.root_id)
    fake.add_folder("ses-01", fake.add_folder("sub-01", dest))
    tie = drive.SameMillisecond(fake, creates=drive.uploads, looks=drive.lists_matching(f"value='{SERIES}'"))
    outputs = outputs_of_two_writers(tmp_path)
    results = in_parallel(*(publishing(fake, dest, "sub-01/ses-01", path) for path in outputs))

    assert tie.forced
    (kept,) = fake.find(name=OUTPUT)
    assert {written.ref for (written,) in results} == {kept["id"]}


def test_callers_racing_for_a_subfolder_get_the_same_one(fake: FakeDrive) -> None:
    dest = fake.add_folder("NIfTI", fake.root_id)
    tie = drive.SameMillisecond(fake, creates=drive.creates_folder("Exams"), looks=drive.lists_folder("Exams"))

    def subfolder() -> Location:
        connection = drive.connection(fake)
        try:
            return connection.sink().subfolder(loc(dest), "Exams")  # type: ignore[no-any-return]
        finally:
            connection.close()

    first, second = in_parallel(subfolder, subfolder)

    assert tie.forced
    (exams,) = fake.children(dest)
    assert first == second == loc(exams["id"])


@pytest.mark.parametrize("another_series_there", [False, True])
def test_what_a_writer_left_in_a_losing_folder_before_dying_is_swept_by_the_next_publish(
    fake: FakeDrive, tmp_path: Path, another_series_there: bool
) -> None:
    dest = fake.add_folder("NIfTI", fake.root_id)
    made_by_dicomflow = {"dicomflow": "1"}
    earlier = time.time() - 60
    fake.clock = lambda: earlier
    winner = fake.add_folder("sub-01", dest, app_properties=made_by_dicomflow)
    fake.clock = lambda: earlier + 1  # the losing folder: younger, made by a writer that then died
    loser = fake.add_folder("sub-01", dest, app_properties=made_by_dicomflow)
    left = fake.add_folder("ses-01", loser, app_properties=made_by_dicomflow)
    fake.add_file(OUTPUT, left, b"identical output", app_properties=tags(SERIES, OUTPUT))
    if another_series_there:  # not this publish's to sweep: the file and the folders holding it stay
        fake.add_file("4_bold.nii.gz", left, b"not ours", app_properties=tags("series-4", "4_bold.nii.gz"))
    fake.clock = time.time
    (output,) = outputs_of_two_writers(tmp_path)[:1]

    (written,) = publishing(fake, dest, "sub-01/ses-01", output)()

    (ses,) = fake.children(winner)
    (kept,) = fake.children(ses["id"])
    assert kept["id"] == written.ref and fake.content(kept["id"]) == b"identical output"
    assert [f["name"] for f in fake.children(left)] == (["4_bold.nii.gz"] if another_series_there else [])
    assert [f["id"] for f in fake.children(dest)] == ([winner, loser] if another_series_there else [winner])


def tags(series: str, name: str) -> dict[str, str]:
    """The appProperties dicomflow gives an output."""
    return {"dicomflow_key": series, "dicomflow_name": _name_tag(name)}


def test_a_folder_a_person_trashes_during_a_publish_is_made_again_and_the_output_moves_there(
    fake: FakeDrive, tmp_path: Path
) -> None:
    dest = fake.add_folder("NIfTI", fake.root_id)
    (output,) = outputs_of_two_writers(tmp_path)[:1]

    def trash_while_uploading(method: str, url: str, body: bytes) -> None:
        if drive.uploads(method, url, body):
            fake.intercept = None
            (sub,) = fake.find(name="sub-01")
            fake.trash(sub["id"])

    fake.intercept = trash_while_uploading
    (written,) = publishing(fake, dest, "sub-01/ses-01", output)()

    (sub,) = fake.children(dest)
    (ses,) = fake.children(sub["id"])
    assert [f["id"] for f in fake.children(ses["id"])] == [written.ref]


def test_a_folder_a_person_trashes_between_publishes_fails_the_next_one_transiently_and_its_retry_succeeds(
    fake: FakeDrive, tmp_path: Path
) -> None:
    dest = fake.add_folder("NIfTI", fake.root_id)
    (output,) = outputs_of_two_writers(tmp_path)[:1]
    connection = drive.connection(fake)
    sink = connection.sink()
    sink.publish(loc(dest), "sub-01/ses-01", [output], SERIES)  # the folders are now settled, and remembered
    (sub,) = fake.children(dest)
    fake.trash(sub["id"])

    with pytest.raises(TransientError):
        sink.publish(loc(dest), "sub-01/ses-01", [output], SERIES)
    (written,) = sink.publish(loc(dest), "sub-01/ses-01", [output], SERIES)  # the task's retry
    connection.close()

    (sub,) = fake.children(dest)
    (ses,) = fake.children(sub["id"])
    assert [f["id"] for f in fake.children(ses["id"])] == [written.ref]
