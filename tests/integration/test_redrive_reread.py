"""A redrive reads each dead-lettered series again from its source — here Google Drive, through the fake
Drive server and the real client, as the cloud path does (issue 13): a re-exported file under a new id
replaces the broken one, which was trashed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomflow import bootstrap, samples
from dicomflow.config import Settings
from dicomflow.domain.model import ItemState
from dicomflow.services.dead_letter import retry_dead_letters
from tests.fakes.drive_server import FakeDrive
from tests.support import drive
from tests.support.fakes import InlineQueue, run_batch

pytestmark = pytest.mark.integration


@pytest.fixture
def fake() -> Iterator[FakeDrive]:
    yield from drive.started()


def test_a_redrive_reads_the_drive_folder_again(fake: FakeDrive, make_settings: object, tmp_path: Path) -> None:
    written = samples.write_series(tmp_path / "dicom" / "ct", samples.SeriesSpec(kind="ct", slices=6), seed=21)
    good = written.paths[2].read_bytes()
    samples.corrupt_file(written.paths[2])
    src = fake.add_folder("DICOM", fake.root_id)
    ids = drive.upload_tree(fake, tmp_path / "dicom", src)
    (folder,) = fake.children(src)
    fields = {k: v for k, v in drive.drive_settings(fake).__dict__.items() if k.startswith("drive")}
    settings: Settings = make_settings(**fields)  # type: ignore[operator]
    ctx = bootstrap.build(settings, queue=InlineQueue())
    try:
        batch_id = run_batch(ctx, f"drive://{src}", str(tmp_path / "out"))
        (dead,) = ctx.store.list_items(batch_id)
        assert dead.state is ItemState.DEAD_LETTERED

        broken = ids[f"ct/{written.paths[2].name}"]
        fake.trash(broken)  # the user replaces the broken file by a re-export under another name
        fresh = fake.add_file("IM-reexported.dcm", folder["id"], good)
        _, asked = retry_dead_letters(ctx, batch_id)
        assert asked == 1
        assert isinstance(ctx.queue, InlineQueue)
        ctx.queue.drain(ctx)

        (item,) = ctx.store.list_items(batch_id)
        assert item.state is ItemState.SUCCEEDED and not item.incomplete, item.failure
        refs = {f.ref for f in item.files}
        assert fresh in refs and broken not in refs and item.file_count == 6
    finally:
        ctx.close()
