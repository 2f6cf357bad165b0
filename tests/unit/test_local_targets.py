"""Which state and batch a local `status`/`dlq` command reads (issue 13), and the refusal of a source and a
destination that contain each other (for the CLI and for the batch API's local paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomflow.adapters.local.sqlite_store import SqliteStateStore
from dicomflow.domain import model
from dicomflow.domain.failures import ConfigError, InvalidInput, NotFound
from dicomflow.domain.locations import check_apart, parse_location
from dicomflow.domain.series import ConversionOptions
from dicomflow.local_targets import find_batch, looks_like_destination

pytestmark = pytest.mark.unit


def _batch(batch_id: str) -> model.Batch:
    return model.Batch(batch_id=batch_id, sources=(parse_location("/in", field="s"),),
                       destination=parse_location("/out", field="d"), options=ConversionOptions(), label="",
                       status=model.BatchStatus.COMPLETED, created_at=1.0, updated_at=1.0)  # fmt: skip


def test_a_unique_prefix_finds_its_batch_and_an_ambiguous_one_lists_the_candidates(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state.sqlite", lambda: 1.0)
    for batch_id in ("abc123", "abd456", "ff0000"):
        store.create_batch(_batch(batch_id))
    assert find_batch(store, "ff").batch_id == "ff0000"
    assert find_batch(store, "abc123").batch_id == "abc123"
    with pytest.raises(ConfigError, match=r"matches 2 batches \(abc123, abd456\)"):
        find_batch(store, "ab")
    with pytest.raises(NotFound):
        find_batch(store, "0")
    store.close()


def test_a_lone_argument_is_a_destination_only_when_it_looks_like_one(tmp_path: Path) -> None:
    (tmp_path / "nifti").mkdir()
    assert looks_like_destination(str(tmp_path / "nifti"))
    assert looks_like_destination("drive://1AbCdEfGhIjKlMnOp")
    assert looks_like_destination("./nifti") and looks_like_destination("~/nifti")
    assert not looks_like_destination("9f3a0c")


@pytest.mark.parametrize(
    ("source", "destination", "words"),
    [
        ("/data/dicom", "/data/dicom/nifti", "is inside the source"),
        ("/data/dicom", "/data/dicom", "is the source"),
        ("/data/dicom", "/data", "is inside the destination"),
        ("/data/dicom/", "/data/dicom/../dicom/out", "is inside the source"),
    ],
)
def test_a_source_and_destination_that_contain_each_other_are_refused(
    source: str, destination: str, words: str
) -> None:
    with pytest.raises(InvalidInput, match=words) as raised:
        check_apart((parse_location(source, field="s"),), parse_location(destination, field="d"))
    assert raised.value.field == "destination"


@pytest.mark.parametrize(
    ("source", "destination"),
    [("/data/dicom", "/data/dicom-nifti"), ("/data/dicom", "/data/nifti"), ("/data/dicom", "drive://1AbCdEfGhIjKl")],
)
def test_neighbours_are_fine(source: str, destination: str) -> None:
    check_apart((parse_location(source, field="s"),), parse_location(destination, field="d"))
