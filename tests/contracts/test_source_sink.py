"""The Source and Sink contracts: a local folder and a Google Drive folder (the real client against the
fake Drive server) behave alike for everything the services rely on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from dicomflow.adapters.drive.connection import DriveConnection
from dicomflow.adapters.local.files import LocalFolderSink, LocalFolderSource
from dicomflow.domain.failures import DestinationConflict, SourceNotFound
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.series import FileRef
from dicomflow.ports import Sink, SkippedFile, Source
from tests.fakes.drive_server import FakeDrive
from tests.support import drive

pytestmark = pytest.mark.contract

TREE = {
    "a/b/one.dcm": b"DICM-1" * 100,
    "a/b/two": b"DICM-2" * 300,
    "a/three.dcm": b"DICM-3" * 7,
    "it's here/four.dcm": b"4" * 50,
}


@dataclass
class SourceCase:
    source: Source
    location: Location
    change: Any  # change(path, new_content)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDrive]:
    yield from drive.started()


@pytest.fixture
def connections() -> Iterator[list[DriveConnection]]:
    made: list[DriveConnection] = []
    yield made
    for connection in made:
        connection.close()


def _connection(request: pytest.FixtureRequest, fake: FakeDrive) -> DriveConnection:
    connection = drive.connection(fake)
    request.getfixturevalue("connections").append(connection)
    return connection


@pytest.fixture(params=["local", "drive"])
def source_case(request: pytest.FixtureRequest, tmp_path: Path) -> SourceCase:
    if request.param == "local":
        for rel, content in TREE.items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(content)
        return SourceCase(LocalFolderSource(), Location(LocationKind.LOCAL, str(tmp_path)),
                          lambda rel, data: (tmp_path / rel).write_bytes(data))  # fmt: skip
    fake: FakeDrive = request.getfixturevalue("fake")
    root = fake.add_folder(f"src-{tmp_path.name}", fake.root_id)
    ids: dict[str, str] = {}
    for rel, content in TREE.items():
        parent = root
        parts = rel.split("/")
        for part in parts[:-1]:
            existing = [c for c in fake.children(parent) if c["name"] == part]
            parent = existing[0]["id"] if existing else fake.add_folder(part, parent)
        ids[rel] = fake.add_file(parts[-1], parent, content)
    fake.add_google_doc("notes", root)  # not a binary file: reported, never read
    return SourceCase(_connection(request, fake).source(), Location(LocationKind.DRIVE, root),
                      lambda rel, data: fake.update_content(ids[rel], data))  # fmt: skip


def _files(case: SourceCase) -> dict[str, FileRef]:
    return {e.path: e for e in case.source.list_files(case.location) if isinstance(e, FileRef)}


def test_lists_every_file_recursively_with_sizes(source_case: SourceCase) -> None:
    files = _files(source_case)
    assert {p: f.size for p, f in files.items()} == {p: len(c) for p, c in TREE.items()}
    skipped = [e for e in source_case.source.list_files(source_case.location) if isinstance(e, SkippedFile)]
    assert all(s.ignored.kind.value == "not_binary" for s in skipped)
    assert source_case.source.check(source_case.location)


def test_reads_prefixes_and_fetches_exact_copies(source_case: SourceCase, tmp_path: Path) -> None:
    files = _files(source_case)
    ref = files["a/b/two"]
    assert source_case.source.read_prefix(ref, 12) == TREE["a/b/two"][:12]
    assert source_case.source.read_prefix(files["a/three.dcm"], 10_000) == TREE["a/three.dcm"]
    chosen = [files["a/b/one.dcm"], files["a/three.dcm"], files["it's here/four.dcm"]]
    progress: list[tuple[int, int]] = []
    folder = source_case.source.fetch(chosen, tmp_path / "fetched", lambda d, t: progress.append((d, t)))
    got = sorted(p.read_bytes() for p in folder.iterdir() if p.is_file())
    assert got == sorted(TREE[f.path] for f in chosen)
    assert progress[-1] == (sum(f.size for f in chosen),) * 2


def test_refresh_sees_replaced_files(source_case: SourceCase) -> None:
    ref = _files(source_case)["a/three.dcm"]
    source_case.change("a/three.dcm", b"re-exported" * 3)
    (fresh,) = source_case.source.refresh([ref])
    assert fresh.ref == ref.ref and fresh.size == 33


@dataclass
class SinkCase:
    sink: Sink
    location: Location
    read: Any  # read(relative name) -> list of contents of files with that name
    plant: Any  # plant(relative name, content): a file dicomflow did not write


@pytest.fixture(params=["local", "drive"])
def sink_case(request: pytest.FixtureRequest, tmp_path: Path) -> SinkCase:
    out = tmp_path / "out"
    if request.param == "local":
        out.mkdir()

        def plant_local(name: str, content: bytes) -> None:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(content)

        def read_local(name: str) -> list[bytes]:
            return [(out / name).read_bytes()] if (out / name).exists() else []

        return SinkCase(LocalFolderSink(), Location(LocationKind.LOCAL, str(out)), read_local, plant_local)
    fake: FakeDrive = request.getfixturevalue("fake")
    root = fake.add_folder(f"dest-{tmp_path.name}", fake.root_id)

    def read(name: str) -> list[bytes]:
        parent = root
        *folders, leaf = name.split("/")
        for folder in folders:
            found = [c for c in fake.children(parent) if c["name"] == folder]
            if not found:
                return []
            parent = found[0]["id"]
        return [fake.content(c["id"]) for c in fake.children(parent) if c["name"] == leaf]

    def plant(name: str, content: bytes) -> None:
        parent = root
        *folders, leaf = name.split("/")
        for folder in folders:
            found = [c for c in fake.children(parent) if c["name"] == folder]
            parent = found[0]["id"] if found else fake.add_folder(folder, parent)
        fake.add_file(leaf, parent, content)

    return SinkCase(_connection(request, fake).sink(), Location(LocationKind.DRIVE, root), read, plant)


def _outputs(tmp_path: Path, contents: dict[str, bytes]) -> list[Path]:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    paths = []
    for name, content in contents.items():
        (staging / name).write_bytes(content)
        paths.append(staging / name)
    return paths


def test_publishing_twice_leaves_one_copy_with_checksums(sink_case: SinkCase, tmp_path: Path) -> None:
    contents = {"3_T1w.nii.gz": b"nifti" * 1000, "3_T1w.json": b'{"EchoTime": 0.003}'}
    first = sink_case.sink.publish(sink_case.location, "sub-01/ses-1", _outputs(tmp_path, contents), "key-1")
    second = sink_case.sink.publish(sink_case.location, "sub-01/ses-1", _outputs(tmp_path, contents), "key-1")
    assert [(o.name, o.sha256, o.ref) for o in first] == [(o.name, o.sha256, o.ref) for o in second]
    for output in first:
        name = output.name.rsplit("/", 1)[1]
        assert output.name == f"sub-01/ses-1/{name}"
        assert output.sha256 == hashlib.sha256(contents[name]).hexdigest()
        assert sink_case.read(f"sub-01/ses-1/{name}") == [contents[name]]


def test_a_changed_output_of_the_same_series_replaces_the_old_one(sink_case: SinkCase, tmp_path: Path) -> None:
    sink_case.sink.publish(sink_case.location, "s", _outputs(tmp_path, {"1_x.json": b"old"}), "key-2")
    sink_case.sink.publish(sink_case.location, "s", _outputs(tmp_path, {"1_x.json": b"new"}), "key-2")
    assert sink_case.read("s/1_x.json") == [b"new"]


def test_a_file_dicomflow_did_not_write_is_never_replaced(sink_case: SinkCase, tmp_path: Path) -> None:
    sink_case.plant("s/2_y.json", b"a colleague's notes")
    try:
        sink_case.sink.publish(sink_case.location, "s", _outputs(tmp_path, {"2_y.json": b"ours"}), "key-3")
    except DestinationConflict:
        assert sink_case.location.kind is LocationKind.LOCAL  # a local name can hold one file only
    assert b"a colleague's notes" in sink_case.read("s/2_y.json")


def test_subfolders_are_created_once(sink_case: SinkCase) -> None:
    first = sink_case.sink.subfolder(sink_case.location, "Patient 7")
    again = sink_case.sink.subfolder(sink_case.location, "Patient 7")
    assert first == again and first != sink_case.location


def test_a_published_file_moves_to_another_name_without_a_copy_and_a_repeated_move_finds_it(
    sink_case: SinkCase, tmp_path: Path
) -> None:
    # The BIDS finish step: a staged output gets its BIDS name (services/finish.py).
    contents = {"5_bold.nii.gz": b"voxels" * 500}
    (staged,) = sink_case.sink.publish(sink_case.location, ".dicomflow/staging/k5", _outputs(tmp_path, contents), "k5")
    target = "sub-01/func/sub-01_task-rest_run-1_bold.nii.gz"
    moved = sink_case.sink.move(sink_case.location, staged, target, "k5")
    assert (moved.name, moved.sha256, moved.size, moved.origin) == (target, staged.sha256, staged.size, "5_bold.nii.gz")
    assert sink_case.read(target) == [contents["5_bold.nii.gz"]]
    assert sink_case.read(".dicomflow/staging/k5/5_bold.nii.gz") == []  # moved, not copied
    again = sink_case.sink.move(sink_case.location, staged, target, "k5")  # an interrupted step, retried
    assert (again.name, again.sha256) == (target, staged.sha256) and sink_case.read(target) == [b"voxels" * 500]
    assert sink_case.sink.read(sink_case.location, target, "k5") == contents["5_bold.nii.gz"]
    assert sink_case.sink.read(sink_case.location, "sub-01/func/absent.json", "k5") is None
    gone = replace(staged, name=".dicomflow/staging/k5/6_other.nii.gz", ref="", sha256="00" * 32)
    with pytest.raises(SourceNotFound):
        sink_case.sink.move(sink_case.location, gone, "sub-01/func/other.nii.gz", "k5")


def test_a_move_never_replaces_a_file_dicomflow_did_not_write(sink_case: SinkCase, tmp_path: Path) -> None:
    sink_case.plant("sub-02/anat/sub-02_T1w.json", b"someone's file")
    (staged,) = sink_case.sink.publish(sink_case.location, "stage", _outputs(tmp_path, {"1.json": b"{}"}), "k6")
    try:
        sink_case.sink.move(sink_case.location, staged, "sub-02/anat/sub-02_T1w.json", "k6")
    except DestinationConflict:
        assert sink_case.location.kind is LocationKind.LOCAL  # a local name holds one file only
    assert b"someone's file" in sink_case.read("sub-02/anat/sub-02_T1w.json")
