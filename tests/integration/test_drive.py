"""The Drive adapter against the fake Drive server, driven by the real google-api-python-client."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicomflow import bootstrap, samples
from dicomflow.adapters.drive.connection import DriveConnection
from dicomflow.adapters.drive.sink import UPLOAD_CHUNK
from dicomflow.config import Settings
from dicomflow.domain.failures import (
    AccessDenied,
    ChecksumMismatch,
    DestinationNotWritable,
    SourceNotFound,
    StorageQuotaExceeded,
)
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import ItemState
from dicomflow.domain.series import FileRef
from dicomflow.ports import SkippedFile
from dicomflow.services.context import Context
from tests.fakes.drive_server import FakeDrive
from tests.support import drive
from tests.support.fakes import InlineQueue

pytestmark = pytest.mark.integration


@pytest.fixture
def fake() -> Iterator[FakeDrive]:
    yield from drive.started()


@pytest.fixture
def build_ctx() -> Iterator[Callable[..., Context]]:
    """bootstrap.build, closing every Context (and its Drive connections) after the test."""
    built: list[Context] = []

    def factory(settings: Settings, **overrides: object) -> Context:
        ctx = bootstrap.build(settings, **overrides)  # type: ignore[arg-type]
        built.append(ctx)
        return ctx

    yield factory
    for ctx in built:
        ctx.close()


@pytest.fixture
def conn(fake: FakeDrive) -> Iterator[DriveConnection]:
    connection = drive.connection(fake)
    yield connection
    connection.close()


def loc(folder: str) -> Location:
    return Location(LocationKind.DRIVE, folder)


def test_listing_survives_short_pages_skips_trash_and_docs_and_handles_quotes(
    fake: FakeDrive, conn: DriveConnection
) -> None:
    root = fake.add_folder("O'Brien's exams", fake.root_id)
    sub = fake.add_folder("it's a 'study'", root)
    for n in range(7):
        fake.add_file(f"IM{n:04d}", sub, b"x" * (n + 1))
    fake.trash(fake.add_file("old", sub, b"gone"))
    fake.add_google_doc("protocol notes", sub)
    fake.short_pages = True  # pages come back short or empty while nextPageToken still says "more"
    entries = list(conn.source().list_files(loc(root)))
    files = sorted(e.path for e in entries if isinstance(e, FileRef))
    assert files == [f"it's a 'study'/IM{n:04d}" for n in range(7)]
    (doc,) = [e for e in entries if isinstance(e, SkippedFile)]
    assert doc.ignored.kind.value == "not_binary" and doc.path.endswith("protocol notes")
    assert conn.source().check(loc(root)) == "O'Brien's exams"


def test_a_folder_not_shared_names_the_account_to_share_it_with(fake: FakeDrive, conn: DriveConnection) -> None:
    folder = fake.add_folder("private", fake.root_id)
    fake.deny(folder, "notFound")
    with pytest.raises(SourceNotFound) as info:
        conn.source().check(loc(folder))
    assert folder in info.value.reason and drive.IDENTITY in info.value.reason and "share" in info.value.reason


def test_a_read_only_destination_names_the_account_and_the_role(
    fake: FakeDrive, conn: DriveConnection, tmp_path: Path
) -> None:
    folder = fake.add_folder("read only", fake.root_id)
    fake.deny(folder, "insufficientFilePermissions")
    output = tmp_path / "1_x.json"
    output.write_text("{}")
    with pytest.raises((AccessDenied, DestinationNotWritable)) as info:
        conn.sink().publish(loc(folder), "", [output], "k")
    assert drive.IDENTITY in info.value.reason and "Editor" in info.value.reason


def test_a_service_account_writing_to_my_drive_is_told_to_use_a_shared_drive(
    fake: FakeDrive, conn: DriveConnection, tmp_path: Path
) -> None:
    fake.service_account_mode = True
    mine = fake.add_folder("in my drive", fake.root_id)
    output = tmp_path / "1_x.nii.gz"
    output.write_bytes(b"nifti")
    with pytest.raises(StorageQuotaExceeded) as info:
        conn.sink().publish(loc(mine), "", [output], "k")
    assert info.value.permanent and "shared drive" in info.value.reason
    shared = fake.add_shared_drive("Lab shared drive")
    (written,) = conn.sink().publish(loc(shared), "sub-01", [output], "k")
    assert fake.content(written.ref) == b"nifti"


def test_discovery_reads_only_header_prefixes(
    fake: FakeDrive, make_settings: Callable[..., Settings], tmp_path: Path, build_ctx: Callable[..., Context]
) -> None:
    spec = samples.SeriesSpec(kind="mr3d", rows=256, columns=256, slices=12)  # 128 KiB per file
    written = samples.write_series(tmp_path / "dicom", spec, seed=41)
    root = fake.add_folder("exam", fake.root_id)
    drive.upload_tree(fake, tmp_path / "dicom", root)
    ctx = build_ctx(make_settings(**_drive_fields(fake)), queue=InlineQueue())
    from dicomflow.services.submit import BatchRequest, submit

    batch = submit(ctx, BatchRequest((loc(root),), Location(LocationKind.LOCAL, str(tmp_path / "out")))).batch
    fake.clear_requests()
    queue = ctx.queue
    assert isinstance(queue, InlineQueue)
    while queue.pending and queue.pending[0][0].queue.value == "expand":
        queue.drain(ctx, max_deliveries=1)
    media = [r for r in fake.requests if r.query.get("alt") == ["media"] or r.query.get("alt") == "media"]
    assert len(media) == written.n_files  # one ranged read per file to group them, nothing more yet
    assert all(r.headers.get("range") == "bytes=0-65535" for r in media)
    queue.drain(ctx)
    assert ctx.store.get_batch(batch.batch_id).counters.succeeded == 1


def _drive_fields(fake: FakeDrive) -> dict[str, object]:
    """The Drive settings of tests/support/drive.py, to combine with local-mode test settings."""
    return {k: v for k, v in drive.drive_settings(fake).__dict__.items() if k.startswith("drive")}


def test_downloads_are_retried_through_faults_and_verified(
    fake: FakeDrive, conn: DriveConnection, tmp_path: Path
) -> None:
    folder = fake.add_folder("s", fake.root_id)
    payloads = {f"f{n}": os.urandom(300_000 + n) for n in range(8)}
    for name, data in payloads.items():
        fake.add_file(name, folder, data)
    refs = [e for e in conn.source().list_files(loc(folder)) if isinstance(e, FileRef)]
    fake.faults.add(method="GET", path_contains="alt=media", status=429, times=3)
    fake.faults.add(method="GET", path_contains="alt=media", status=403, reason="userRateLimitExceeded", times=2)
    fake.faults.add(method="GET", path_contains="alt=media", status=503, times=2)
    fake.faults.add(method="GET", path_contains="alt=media", drop_connection=True, times=2)
    got = conn.source().fetch(refs, tmp_path / "in")
    assert sorted(p.read_bytes() for p in got.iterdir()) == sorted(payloads.values())
    tampered = [FileRef(refs[0].ref, refs[0].path, refs[0].size, "0" * 32)]
    with pytest.raises(ChecksumMismatch):
        conn.source().fetch(tampered, tmp_path / "again")


def test_uploads_are_resumable_and_survive_a_dropped_chunk(
    fake: FakeDrive, conn: DriveConnection, tmp_path: Path
) -> None:
    folder = fake.add_folder("out", fake.root_id)
    big = tmp_path / "9_big.nii.gz"
    big.write_bytes(os.urandom(UPLOAD_CHUNK + 300_000))  # two chunks: 8 MiB, then the rest
    fake.faults.add(method="PUT", path_contains="upload_id", drop_connection=True, times=1)
    (written,) = conn.sink().publish(loc(folder), "", [big], "series-9")
    assert fake.content(written.ref) == big.read_bytes()
    puts = [r for r in fake.requests if r.method == "PUT"]
    assert len(puts) >= 2 and all(r.status in (308, 200, 400, None) for r in puts)
    assert fake.get(written.ref)["appProperties"]["dicomflow_key"] == "series-9"


def test_a_duplicated_delivery_racing_the_same_outputs_leaves_one_copy(fake: FakeDrive, tmp_path: Path) -> None:
    folder = fake.add_folder("race", fake.root_id)
    outputs = []
    for n in range(2):
        (tmp_path / str(n)).mkdir()
        path = tmp_path / str(n) / "3_T1w.nii.gz"
        path.write_bytes(b"identical output")
        outputs.append(path)
    connections = [drive.connection(fake), drive.connection(fake)]
    barrier = threading.Barrier(2)
    results: list[str] = []

    def deliver(index: int) -> None:
        barrier.wait()
        (written,) = connections[index].sink().publish(loc(folder), "sub-01/ses-01", [outputs[index]], "series-3")
        results.append(written.ref)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for connection in connections:
        connection.close()
    (sub,) = [f for f in fake.find(name="sub-01") if not f.get("trashed")]
    (ses,) = fake.children(sub["id"])
    (kept,) = fake.children(ses["id"])
    assert kept["name"] == "3_T1w.nii.gz" and set(results) == {kept["id"]}


def test_names_with_quotes_slashes_dots_and_control_characters(
    fake: FakeDrive, make_settings: Callable[..., Settings], tmp_path: Path, build_ctx: Callable[..., Context]
) -> None:
    root = fake.add_folder("exports", fake.root_id)
    odd = fake.add_folder("Dr. O'Neil/visit 2\x07..", root)
    dots = fake.add_folder("..", odd)
    written = samples.write_series(tmp_path / "s", samples.SeriesSpec(kind="ct", slices=3), seed=42)
    for path in written.paths:
        fake.add_file(path.name, dots, path.read_bytes())
    settings = make_settings(**_drive_fields(fake))
    ctx = build_ctx(settings, queue=InlineQueue())
    from tests.support.fakes import run_batch

    local_batch = run_batch(ctx, f"drive://{root}", str(tmp_path / "local-out"))
    (item,) = ctx.store.list_items(local_batch)
    assert item.state is ItemState.SUCCEEDED
    (image,) = list((tmp_path / "local-out").rglob("*.nii.gz"))
    relative = image.relative_to(tmp_path / "local-out")
    # No separator, no control character, no '..': a name that is only dots gets a keyed pseudonym.
    assert relative.parts[0] == "Dr. O'Neil_visit 2_.." and relative.parts[1].startswith("anon-")
    dest = fake.add_folder("nifti", fake.root_id)
    drive_batch = run_batch(ctx, f"drive://{root}", f"drive://{dest}")
    (item,) = ctx.store.list_items(drive_batch)
    top, report = sorted(fake.children(dest), key=lambda c: c["name"] == "report.html")
    assert report["name"] == "report.html"  # the batch's QA report, beside the outputs
    assert top["name"] == "Dr. O'Neil_visit 2_.."  # the same names on Drive
    assert [c["name"] for c in fake.children(top["id"])] == [relative.parts[1]]


def test_a_whole_batch_converts_through_twenty_percent_injected_faults(
    fake: FakeDrive, make_settings: Callable[..., Settings], tmp_path: Path, build_ctx: Callable[..., Context]
) -> None:
    archive = samples.make_demo_archive(tmp_path / "dicom", seed=43)
    src, dest = fake.add_folder("DICOM", fake.root_id), fake.add_folder("NIfTI", fake.root_id)
    drive.upload_tree(fake, archive.root, src)
    fake.fault_rate(0.2, seed=43)
    fake.body_timeout_seconds = 0.2  # how long the fake waits for the rest of a chunk cut short by a drop
    settings = make_settings(retry_max_attempts=8, **_drive_fields(fake))
    ctx = build_ctx(settings, queue=InlineQueue())
    from tests.support.fakes import run_batch

    batch_id = run_batch(ctx, f"drive://{src}", f"drive://{dest}")
    counters = ctx.store.get_batch(batch_id).counters
    assert counters.succeeded == len(archive.with_outcome("convert"))
    assert counters.dead_lettered == 1  # only the corrupt series
    images = [f for f in fake.find() if f["name"].endswith(".nii.gz") and not f.get("trashed")]
    assert len(images) == archive.expected_nifti_count  # nothing duplicated by all the retries
    assert sum(1 for r in fake.requests if r.fault) > 20  # the faults really happened
