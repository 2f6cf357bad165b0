"""A transient fault never changes what is converted (issue 9): a multi-series tree converted through the
fake Drive server while it fails 20% of requests the way networks do — 429, 5xx, connections dropped
before the answer or cut mid-body (FIN and RST), stalled answers, short ranged reads — gives exactly the
outputs of a fault-free run, dead-letters nothing, and a second faulty run leaves the destination as it is.

Also each Drive request kind (list, ranged read, download, upload, metadata) on its own, against the
fault Drive cannot retry for us: an answer cut short by a clean close (http.client.IncompleteRead).
"""

from __future__ import annotations

import gc
import gzip
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomflow import bootstrap, samples
from dicomflow.adapters.drive.connection import DriveConnection
from dicomflow.adapters.local.files import LocalFolderSink, LocalFolderSource
from dicomflow.config import Settings
from dicomflow.domain.failures import TransientError
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import ItemState
from dicomflow.domain.series import FileRef
from dicomflow.services.context import Context
from dicomflow.services.finish import REPORT
from tests.fakes.drive_server import FakeDrive
from tests.support import dicom_kinds, drive
from tests.support.fakes import InlineQueue, run_batch

pytestmark = [
    pytest.mark.integration,
    # httplib2 drops the socket of an answer reset mid-body without closing it; the garbage collector
    # reports that as an unraisable ResourceWarning at a random later moment (see test_fake_drive.py).
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

CLIENT_TIMEOUT = 0.3  # seconds: a stalled answer (FakeDrive.stall_seconds) outlasts it


@pytest.fixture
def fake() -> Iterator[FakeDrive]:
    yield from drive.started()
    gc.collect()


def _tree(root: Path) -> int:
    """Nested series of several kinds, a flat folder mixing two, and a multi-output series; returns the
    number of series."""
    specs = [
        ("sub-01/ses-01/anat", samples.SeriesSpec(kind="mr3d", series_number=2, slices=10)),
        ("sub-01/ses-01/func", samples.SeriesSpec(kind="mr4d", series_number=3, slices=8, volumes=4)),
        ("sub-01/ses-01/dwi", samples.SeriesSpec(kind="dwi", series_number=4, slices=6, volumes=6)),
        ("sub-02/ses-01/me", samples.SeriesSpec(kind="mr3d", series_number=5, slices=6, echo_times_ms=(4.0, 9.0))),
        ("pacs", samples.SeriesSpec(kind="ct", series_number=6, slices=7)),
        ("pacs", samples.SeriesSpec(kind="mr3d", series_number=7, slices=5, series_description="T2w")),
    ]
    for seed, (folder, spec) in enumerate(specs):
        samples.write_series(root / folder, spec, seed=seed, file_names="noext")
    dicom_kinds.several_series_numbers(root / "sub-02" / "ses-01" / "rerun")
    return len(specs) + 1


def _connection(fake: FakeDrive) -> DriveConnection:
    conn = drive.connection(fake)
    conn.http_timeout = CLIENT_TIMEOUT
    return conn


def _context(settings: Settings, conn: DriveConnection) -> Context:
    return bootstrap.build(
        settings,
        queue=InlineQueue(),
        sources={LocationKind.LOCAL: LocalFolderSource, LocationKind.DRIVE: conn.source},
        sinks={LocationKind.LOCAL: LocalFolderSink, LocationKind.DRIVE: conn.sink},
    )


def _outputs(fake: FakeDrive, folder: str) -> dict[str, tuple[str, str]]:
    """Relative path -> (file id, digest of the content, gzip unwrapped) of every file under `folder`."""
    found: dict[str, tuple[str, str]] = {}
    stack = [(folder, "")]
    while stack:
        parent, rel = stack.pop()
        for child in fake.children(parent):
            path = f"{rel}/{child['name']}" if rel else child["name"]
            if child["mimeType"].endswith(".folder"):
                stack.append((child["id"], path))
                continue
            content = fake.content(child["id"])
            if child["name"].endswith(".gz"):
                content = gzip.decompress(content)
            found[path] = (child["id"], hashlib.sha256(content).hexdigest())
    return found


def test_a_tree_converts_identically_through_twenty_percent_network_faults(
    fake: FakeDrive, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    series = _tree(tmp_path / "dicom")
    src = fake.add_folder("DICOM", fake.root_id)
    drive.upload_tree(fake, tmp_path / "dicom", src)
    clean_dest, faulty_dest = fake.add_folder("clean", fake.root_id), fake.add_folder("faulty", fake.root_id)
    drive_fields = {k: v for k, v in drive.drive_settings(fake).__dict__.items() if k.startswith("drive")}

    conn = _connection(fake)
    ctx = _context(make_settings(**drive_fields), conn)
    clean = run_batch(ctx, f"drive://{src}", f"drive://{clean_dest}")
    assert ctx.store.get_batch(clean).counters.succeeded == series
    expected = _outputs(fake, clean_dest)
    assert sum(name.endswith(".nii.gz") for name in expected) == series + 2  # + 1 echo, + 1 clashing volume
    ctx.close()
    conn.close()

    fake.body_timeout_seconds = 0.2  # how long the fake waits for the rest of a chunk cut short by a drop
    fake.stall_seconds = 2 * CLIENT_TIMEOUT
    rule = fake.fault_rate(0.2, seed=11, network=True)
    conn = _connection(fake)
    ctx = _context(make_settings(state_path=str(tmp_path / "faulty" / "state.sqlite"), **drive_fields), conn)
    first = run_batch(ctx, f"drive://{src}", f"drive://{faulty_dest}")
    counters = ctx.store.get_batch(first).counters
    assert (counters.succeeded, counters.dead_lettered) == (series, 0)
    got = _outputs(fake, faulty_dest)
    # Every output the same; report.html (one per batch, naming it) differs by batch id and times.
    assert {k: v[1] for k, v in got.items() if k != REPORT} == {k: v[1] for k, v in expected.items() if k != REPORT}
    assert REPORT in got and REPORT in expected

    second = run_batch(ctx, f"drive://{src}", f"drive://{faulty_dest}")
    items = ctx.store.list_items(second)
    assert [i.state for i in items] == [ItemState.SKIPPED] * series  # same files found: nothing to redo
    again = _outputs(fake, faulty_dest)
    assert {k: v for k, v in again.items() if k != REPORT} == {k: v for k, v in got.items() if k != REPORT}
    assert again[REPORT][0] == got[REPORT][0]  # the second batch's report replaced the first's, in place
    kinds = {r.status for r in fake.requests if r.fault}
    assert rule.hits > 50 and None in kinds and {429, 500, 503} & kinds  # the faults really happened
    ctx.close()
    conn.close()


# --- each request kind against an answer cut mid-body --------------------------------------------------


@pytest.fixture
def conn(fake: FakeDrive) -> Iterator[DriveConnection]:
    connection = _connection(fake)
    yield connection
    connection.close()


def _cut(fake: FakeDrive, path_contains: str, method: str = "GET", times: int = 2, kind: str = "fin") -> Any:
    return fake.faults.add(method=method, path_contains=path_contains, network=kind, times=times)


@pytest.mark.parametrize("kind", ["fin", "rst", "stall"])
def test_listing_survives_answers_cut_or_stalled(fake: FakeDrive, conn: DriveConnection, kind: str) -> None:
    folder = fake.add_folder("s", fake.root_id)
    for n in range(5):
        fake.add_file(f"f{n}", folder, bytes([n]) * 10)
    rule = _cut(fake, "/files?", kind=kind)
    refs = [e for e in conn.source().list_files(Location(LocationKind.DRIVE, folder)) if isinstance(e, FileRef)]
    assert sorted(r.path for r in refs) == [f"f{n}" for n in range(5)] and rule.hits == 2


@pytest.mark.parametrize("kind", ["fin", "rst", "short"])
def test_a_header_read_survives_answers_cut_short(fake: FakeDrive, conn: DriveConnection, kind: str) -> None:
    data = bytes(range(256)) * 1000
    ref = FileRef(fake.add_file("f", fake.root_id, data), "f", len(data))
    rule = _cut(fake, "alt=media", kind=kind)
    assert conn.source().read_prefix(ref, 65536) == data[:65536]
    assert rule.hits == 2


def test_a_header_read_that_stays_short_is_a_transient_error_not_a_short_file(
    fake: FakeDrive, conn: DriveConnection
) -> None:
    data = bytes(range(256)) * 1000
    ref = FileRef(fake.add_file("f", fake.root_id, data), "f", len(data))
    _cut(fake, "alt=media", kind="short", times=100)
    with pytest.raises(TransientError):
        conn.source().read_prefix(ref, 65536)


def test_a_download_survives_answers_cut_short(fake: FakeDrive, conn: DriveConnection, tmp_path: Path) -> None:
    folder = fake.add_folder("s", fake.root_id)
    payloads = [bytes([n]) * (100_000 + n) for n in range(4)]
    for n, data in enumerate(payloads):
        fake.add_file(f"f{n}", folder, data)
    refs = sorted(
        (e for e in conn.source().list_files(Location(LocationKind.DRIVE, folder)) if isinstance(e, FileRef)),
        key=lambda r: r.path,
    )
    rules = [_cut(fake, "alt=media", kind=kind, times=1) for kind in ("fin", "rst", "short")]
    got = conn.source().fetch(refs, tmp_path / "in")
    assert [p.read_bytes() for p in sorted(got.iterdir())] == payloads
    assert all(rule.hits == 1 for rule in rules)


def test_an_upload_and_its_metadata_calls_survive_answers_cut_short(
    fake: FakeDrive, conn: DriveConnection, tmp_path: Path
) -> None:
    dest = fake.add_folder("out", fake.root_id)
    output = tmp_path / "3_T1.nii.gz"
    output.write_bytes(bytes(range(256)) * 2000)
    rules = [
        _cut(fake, "/files?", times=2),  # the sink's lookups (files.list)
        _cut(fake, "uploadType=resumable", method="POST", times=1),  # the upload session
        _cut(fake, "upload_id", method="PUT", times=1, kind="rst"),  # the content
        _cut(fake, dest, method="GET", times=1),  # files.get of the destination folder (check)
    ]
    conn.sink().check(Location(LocationKind.DRIVE, dest))
    (written,) = conn.sink().publish(Location(LocationKind.DRIVE, dest), "sub-01", [output], "series-3")
    assert fake.content(written.ref) == output.read_bytes()
    (sub,) = fake.children(dest)
    assert [c["name"] for c in fake.children(sub["id"])] == ["3_T1.nii.gz"]  # no duplicate from the retries
    assert all(rule.hits >= 1 for rule in rules)
