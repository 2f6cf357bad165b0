"""domain/grouping.py: a dcm2niix run over several series is taken apart exactly, or not at all."""

from __future__ import annotations

import pytest

from dicomflow.domain.conversion import parse_console
from dicomflow.domain.grouping import GroupMember, split_group

pytestmark = pytest.mark.unit

A = GroupMember("1.2.3", "3_T1w", 4)
B = GroupMember("1.2.3.4", "7_bold", 2)

CONSOLE = """Chris Rorden's dcm2niiX version v1.0.20260724
Advanced feature: '-m 2' ignores Series Instance UID.
Found 6 DICOM file(s)
Convert 2 DICOM as /w/out/1.2.3 (64x64x2x1)
Convert 2 DICOM as /w/out/1.2.3_e2 (64x64x2x1)
Convert 2 DICOM as /w/out/1.2.3.4 (64x64x1x2)
Conversion required 0.01 seconds (0.01 for core code).
"""
FILES = ["1.2.3.json", "1.2.3.nii", "1.2.3_e2.json", "1.2.3_e2.nii", "1.2.3.4.json", "1.2.3.4.nii", "1.2.3.4.bval"]


def test_each_series_gets_its_files_under_its_own_name_and_a_console_as_if_alone() -> None:
    result = split_group(0, CONSOLE, FILES, [A, B])
    assert not isinstance(result, str), result
    first, second = result
    assert dict(first.renames) == {
        "1.2.3.json": "3_T1w.json",
        "1.2.3.nii": "3_T1w.nii",
        "1.2.3_e2.json": "3_T1w_e2.json",
        "1.2.3_e2.nii": "3_T1w_e2.nii",
    }
    # The UID 1.2.3 is a prefix of 1.2.3.4: the dot keeps B's files out of A's.
    assert dict(second.renames) == {
        "1.2.3.4.json": "7_bold.json",
        "1.2.3.4.nii": "7_bold.nii",
        "1.2.3.4.bval": "7_bold.bval",
    }
    alone = parse_console(first.console)
    assert alone.found == 4 and [(r.name, r.images, r.dims) for r in alone.converted] == [
        ("3_T1w", 2, (64, 64, 2, 1)),
        ("3_T1w_e2", 2, (64, 64, 2, 1)),
    ]
    assert parse_console(second.console).found == 2


def test_a_clash_letter_stays_with_its_series() -> None:
    console = "Found 4 DICOM file(s)\nConvert 2 DICOM as o/1.2.3 (4x4x2)\nConvert 2 DICOM as o/1.2.3a (4x4x2)\n"
    (only,) = split_group(0, console, ["1.2.3.nii", "1.2.3a.nii"], [A])  # type: ignore[misc]
    assert dict(only.renames) == {"1.2.3.nii": "3_T1w.nii", "1.2.3a.nii": "3_T1wa.nii"}


def test_every_doubt_refuses_the_group() -> None:
    assert split_group(8, CONSOLE, FILES, [A, B]) == "dcm2niix exited with 8"
    warned = CONSOLE.replace("Found 6", "Warning: Missing images? Expected 3\nFound 6")
    assert split_group(0, warned, FILES, [A, B]) == "dcm2niix printed a warning or an error"
    assert "listed 6 DICOM files" in str(split_group(0, CONSOLE, FILES, [A, GroupMember("1.2.3.4", "7_bold", 3)]))
    # dcm2niix's -m 2 may merge across SeriesInstanceUIDs: a volume using files of two series shows in the count.
    merged = CONSOLE.replace("Convert 2 DICOM as /w/out/1.2.3.4 (64x64x1x2)\n", "").replace(
        "Convert 2 DICOM as /w/out/1.2.3_e2", "Convert 4 DICOM as /w/out/1.2.3_e2"
    )
    assert "used 6 DICOM files, the series has 4" in str(split_group(0, merged, FILES, [A, B]))
    stray = [*FILES, "9.9.nii"]
    assert split_group(0, CONSOLE, stray, [A, B]) == "an output file belongs to no single series of the group"
    unknown = CONSOLE.replace("/w/out/1.2.3.4 ", "/w/out/5.5 ")
    assert "belongs to no single series" in str(split_group(0, unknown, FILES, [A, B]))
    twins = [A, GroupMember("1.2.3", "4_T1w", 2)]
    assert split_group(0, CONSOLE, FILES, twins) == "two series of the group share a SeriesInstanceUID"
    syntax = CONSOLE + "Warning: Unsupported transfer syntax '1.2.840.10008.1.2.4.51' (see www.nitrc.org)\n"
    assert isinstance(split_group(0, syntax, FILES, [A, B]), str)
