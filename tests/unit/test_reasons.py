"""Reasons that name what to fix (issue 13): dcm2niix's own message with the file it means — by path in
local mode, never by name in the cloud — and paths too long for the file system refused with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomflow.adapters.local.files import OS_MAX_PATH_BYTES, LocalFolderSink, PathTooLong
from dicomflow.domain.conversion import ConversionFailed
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.series import FileRef
from dicomflow.services.explain import name_what_failed

pytestmark = pytest.mark.unit

CONSOLE = """Chris Rorden's dcm2niiX version v1.0.20260724
Found 3 DICOM file(s)
FileSize < (ImageSize+HeaderSize): 2488 < (2048+1464)
Warning: File not large enough to store image data: {folder}/{name}
"""


def _keep(text: str) -> str:
    return text


def _error() -> ConversionFailed:
    return ConversionFailed("dcm2niix could not convert this series (exit code 1).")


# Items keep files by reference and position only (model.positioned): `path` is "1", "2", ...
def test_locally_the_reason_names_the_file_in_the_source_folder_used_in_place() -> None:
    files = [FileRef(f"/data/Smith_John/ct/IM{n}.dcm", str(n + 1), 10) for n in range(3)]
    console = CONSOLE.format(folder="/data/Smith_John/ct", name="IM1.dcm")
    error = name_what_failed(_error(), console, Path("/data/Smith_John/ct"), files, names=True, scrub=_keep)
    assert error.reason.endswith(
        "dcm2niix said: File not large enough to store image data: /data/Smith_John/ct/IM1.dcm"
    )
    assert str(error) == error.reason


def test_locally_a_linked_file_is_named_by_its_source_path() -> None:
    files = [FileRef(f"/data/flat/{n:03d}", str(n + 1), 10) for n in range(3)]
    console = CONSOLE.format(folder="/scratch/series-1/in", name="000002.dcm")
    error = name_what_failed(_error(), console, Path("/scratch/series-1/in"), files, names=True, scrub=_keep)
    assert "store image data: /data/flat/002" in error.reason


def test_in_the_cloud_the_reason_gives_position_and_drive_id_and_no_name() -> None:
    files = [FileRef(f"1AbCdEfGhIjK{n}", str(n + 1), 10) for n in range(3)]
    console = CONSOLE.format(folder="/tmp/dicomflow-work/series-1/in", name="000001.dcm")
    error = name_what_failed(
        _error(), console, Path("/tmp/dicomflow-work/series-1/in"), files, names=False, scrub=_keep
    )
    assert "store image data: file 2 of 3, Drive id 1AbCdEfGhIjK1" in error.reason
    assert "Smith" not in error.reason and "IM1" not in error.reason and "/tmp" not in error.reason


def test_a_path_outside_the_series_folder_is_never_quoted() -> None:
    files = [FileRef("/data/ct/IM0.dcm", "1", 10)]
    console = "Error: Unable to write /home/Smith_John/out/x.nii\n"
    error = name_what_failed(_error(), console, Path("/data/ct"), files, names=True, scrub=_keep)
    assert error.reason.endswith("dcm2niix said: Unable to write <path>")


def test_a_console_without_complaints_leaves_the_reason_alone() -> None:
    error = name_what_failed(_error(), "Found 3 DICOM file(s)\n", Path("/in"), [], names=True, scrub=_keep)
    assert error.reason == _error().reason


def test_an_output_path_longer_than_the_file_system_accepts_is_refused_before_writing(tmp_path: Path) -> None:
    output = tmp_path / "3_T1.nii.gz"
    output.write_bytes(b"nifti")
    deep = "/".join(["a" * 200] * (OS_MAX_PATH_BYTES // 200 + 1))
    with pytest.raises(PathTooLong, match="choose a destination with a shorter path"):
        LocalFolderSink().publish(Location(LocationKind.LOCAL, str(tmp_path / "out")), deep, [output], "key")
    assert not (tmp_path / "out" / ("a" * 200)).exists()  # refused before any folder was made
    assert PathTooLong.permanent


def test_folder_and_file_names_with_spaces_are_recognised_whole() -> None:
    files = [FileRef(f"/data/My Exams/ct/IM {n}.dcm", str(n + 1), 10) for n in range(2)]
    console = CONSOLE.format(folder="/data/My Exams/ct", name="IM 1.dcm")
    error = name_what_failed(_error(), console, Path("/data/My Exams/ct"), files, names=True, scrub=_keep)
    assert error.reason.endswith("store image data: /data/My Exams/ct/IM 1.dcm")


def test_dcm2niix_words_are_scrubbed_and_the_file_label_is_not() -> None:
    # The label is the user's own path (locally) and must survive the scrub that dcm2niix's text gets:
    # a file name like IM-0001-0003.dcm shares digit runs with header dates and IDs.
    files = [FileRef(f"/data/ct/IM-0001-000{n}.dcm", str(n), 10) for n in range(1, 4)]
    console = "Warning: protocol SMITH_T1 unusual in /data/ct/IM-0001-0003.dcm\n"

    def scrub(text: str) -> str:
        assert "IM-0001" not in text  # the file is a placeholder while scrubbing
        return text.replace("SMITH_", "").replace("0", "")

    error = name_what_failed(_error(), console, Path("/data/ct"), files, names=True, scrub=scrub)
    assert error.reason.endswith("dcm2niix said: protocol T1 unusual in /data/ct/IM-0001-0003.dcm")
