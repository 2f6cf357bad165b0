"""Accounting for every volume of a dcm2niix run (domain/conversion.py), on console text recorded from the
pinned dcm2niix 1.0.20260724 (tests/integration/test_volumes.py checks the same on real runs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

import pytest

from dicomflow.domain.conversion import (
    ConversionVerdict,
    UnsupportedTransferSyntax,
    VolumeLost,
    assess,
    collision_groups,
    deterministic_names,
    parse_console,
    split_name,
)
from dicomflow.domain.failures import ConversionFailed, ConverterCrashed, SeriesChanged

pytestmark = pytest.mark.unit

BANNER = "Chris Rorden's dcm2niiX version v1.0.20260724  (JP2:OpenJPEG) (JP-LS:CharLS) GCC10.2.1 x86-64\n"


@dataclass(frozen=True)
class Run:
    exit_code: int
    outputs: tuple[PurePath, ...]
    console: str


def run(exit_code: int, names: list[str], lines: list[str]) -> Run:
    return Run(exit_code, tuple(PurePath("/w/out") / n for n in names), BANNER + "\n".join(lines) + "\n")


def test_the_console_lines_that_account_for_volumes_are_parsed() -> None:
    report = parse_console(
        BANNER
        + "Found 7 DICOM file(s)\n"
        + "Convert 2 DICOM as /tmp/a b/out/x (10x10x1x2)Error: RLE header corrupted 0 != 4\n"
        + "Warning: Overwriting existing file with the name /tmp/a b/out/y\n"
        + "Warning: Missing images? Expected 4 images, but instance number (0020,0013) ranges from 18 to 182\n"
        + "Error: Converted 2 of 7 files\n"
    )
    assert report.found == 7
    assert [(r.name, r.images, r.dims) for r in report.converted] == [("x", 2, (10, 10, 1, 2))]
    assert report.clobbered == ("y",)
    assert report.missing_images and report.converted_of == (2, 7)


def test_a_multi_echo_series_is_three_volumes() -> None:
    names = [f"5_T1_e{e}.{x}" for e in (1, 2, 3) for x in ("json", "nii.gz")]
    lines = ["Found 18 DICOM file(s)"] + [f"Convert 6 DICOM as /w/out/5_T1_e{e} (16x16x6x1)" for e in (2, 3, 1)]
    result = assess(run(0, names, lines), files=18)
    assert result.verdict is ConversionVerdict.CONVERTED and not result.incomplete
    assert [v.name for v in result.volumes] == ["5_T1_e1", "5_T1_e2", "5_T1_e3"]
    assert all(v.images == 6 and len(v.files) == 2 for v in result.volumes)


def test_an_overwrite_fails_the_series_permanently() -> None:
    lines = [
        "Found 8 DICOM file(s)",
        "Convert 4 DICOM as /w/out/9_x (16x16x4x1)",
        "Warning: Overwriting existing file with the name /w/out/9_x",
        "Convert 4 DICOM as /w/out/9_x (16x16x4x1)",
    ]
    with pytest.raises(VolumeLost) as info:
        assess(run(0, ["9_x.json", "9_x.nii.gz"], lines), files=8)
    assert info.value.permanent and info.value.code == "volume_lost"
    assert "/w/out" not in info.value.reason + info.value.detail  # no paths: they may name the patient


def test_a_reported_volume_missing_from_the_outputs_fails_the_series() -> None:
    lines = [
        "Found 8 DICOM file(s)",
        "Convert 4 DICOM as /w/out/9_x (4x4x4x1)",
        "Convert 4 DICOM as /w/out/9_xa (4x4x4x1)",
    ]
    with pytest.raises(VolumeLost) as info:
        assess(run(0, ["9_x.json", "9_x.nii.gz", "9_xa.json"], lines), files=8)
    assert info.value.detail == "9_xa"


def test_one_name_reported_twice_fails_the_series() -> None:
    lines = ["Convert 4 DICOM as /w/out/9_x (4x4x4x1)", "Convert 4 DICOM as /w/out/9_x (4x4x4x1)"]
    with pytest.raises(VolumeLost):
        assess(run(0, ["9_x.nii.gz"], lines), files=8)


def test_derived_outputs_belong_to_the_volume_they_were_derived_from() -> None:
    lines = [
        "Found 4 DICOM file(s)",
        "Warning: Missing images? Expected 4 images, but instance number (0020,0013) ranges from 18 to 182",
        "Convert 4 DICOM as /w/out/2_x (16x16x4x1)",
    ]
    result = assess(run(0, ["2_x.json", "2_x.nii.gz", "2_x_Eq_1.nii.gz"], lines), files=4)
    assert [(v.name, v.derived_from) for v in result.volumes] == [("2_x", ""), ("2_x_Eq_1", "2_x")]
    assert result.incomplete and any("missing images" in w for w in result.warnings)


def test_an_enhanced_file_giving_two_volumes_is_not_a_changed_folder() -> None:
    """One multi-frame file used for two outputs: more images than files, deterministic, never retried."""
    lines = [
        "Found 1 DICOM file(s)",
        "Convert 1 DICOM as /w/out/1_x (16x16x4x1)",
        "Convert 1 DICOM as /w/out/1_x_ph (16x16x4x1)",
    ]
    result = assess(run(0, ["1_x.nii.gz", "1_x_ph.nii.gz"], lines), files=1)
    assert len(result.volumes) == 2 and not result.incomplete


def test_more_files_in_the_folder_than_in_the_series_means_it_changed_while_converting() -> None:
    lines = ["Found 9 DICOM file(s)", "Convert 9 DICOM as /w/out/1_x (16x16x9x1)"]
    with pytest.raises(SeriesChanged) as info:
        assess(run(0, ["1_x.nii.gz"], lines), files=8)
    assert not info.value.permanent


@pytest.mark.parametrize(("code", "note"), [(8, "only part"), (10, "incomplete volumes")])
def test_partial_conversions_keep_their_volumes_and_are_flagged(code: int, note: str) -> None:
    lines = ["Found 7 DICOM file(s)", "Convert 2 DICOM as /w/out/1_x (10x10x1x2)", "Error: Converted 2 of 7 files"]
    result = assess(run(code, ["1_x.json", "1_x.nii.gz"], lines), files=7)
    assert result.verdict is ConversionVerdict.CONVERTED and result.incomplete
    assert any(note in w for w in result.warnings)


def test_exit_one_is_a_failure_even_with_a_file_written() -> None:
    """A 4D series with a missing slice: dcm2niix writes a NIfTI and exits 1 (measured)."""
    lines = ["Found 14 DICOM file(s)", "Convert 14 DICOM as /w/out/x (8x8x14x1)"]
    with pytest.raises(ConversionFailed):
        assess(run(1, ["x.nii.gz"], lines), files=14)


@pytest.mark.parametrize("code", [0, 2, 11])
def test_a_report_only_series_is_nothing_to_convert(code: int) -> None:
    result = assess(run(code, [], ["Found 1 DICOM file(s)"]), files=1)
    assert result.verdict is ConversionVerdict.NOTHING_TO_CONVERT and result.skip_reason


def test_an_unsupported_transfer_syntax_is_a_failure_not_a_skip() -> None:
    warning = (
        "Warning: Unsupported transfer syntax '1.2.840.10008.1.2.1.99' (inflate files with 'dcmconv +te gz.dcm "
        "raw.dcm' or 'gdcmconv -w gz.dcm raw.dcm)'"
    )
    with pytest.raises(UnsupportedTransferSyntax) as info:
        assess(run(2, [], ["Found 5 DICOM file(s)", warning]), files=5)
    assert info.value.permanent and "Deflated" in info.value.reason


def test_crashes_stay_transient() -> None:
    with pytest.raises(ConverterCrashed):
        assess(run(-9, [], []), files=3)


def test_output_names_split_on_the_extensions_dcm2niix_writes() -> None:
    assert split_name("3_T1_e2.nii.gz") == ("3_T1_e2", ".nii.gz")
    assert split_name("3_DWI.bvec") == ("3_DWI", ".bvec")
    assert split_name("x.v2.json") == ("x.v2", ".json")


def test_clashing_names_are_found_by_dcm2niix_letter_suffixes() -> None:
    names = ["9_x", "9_xa", "9_xb", "9_x_e2", "9_x_e2a", "9_x_ph"]
    assert collision_groups(names) == [("9_x", "9_xa", "9_xb"), ("9_x_e2", "9_x_e2a")]
    assert collision_groups(["5_T1_e1", "5_T1_e2", "5_T1_ph"]) == []


def test_clashing_volumes_are_named_by_their_content_whatever_order_dcm2niix_met_them() -> None:
    keys: dict[str, tuple[object, ...]] = {"9_x": (10, False, "bb"), "9_xa": (9, False, "aa"), "9_xb": (9, True, "cc")}
    moves = deterministic_names([("9_x", "9_xa", "9_xb")], keys)
    # SeriesNumber 9 (original) first, then 9 (derived), then 10: a cycle of three renames.
    assert moves == {"9_xa": "9_x", "9_xb": "9_xa", "9_x": "9_xb"}
    in_order = deterministic_names([("9_x", "9_xa")], {"9_x": (9, False, "a"), "9_xa": (10, False, "b")})
    assert in_order == {}


def test_files_dcm2niix_did_not_list_make_the_series_incomplete() -> None:
    lines = ["Found 7 DICOM file(s)", "Convert 7 DICOM as /w/out/1_x (16x16x7x1)"]
    result = assess(run(0, ["1_x.json", "1_x.nii.gz"], lines), files=8)
    assert result.incomplete and "found only 7 of the 8 files" in result.warnings[-1]
